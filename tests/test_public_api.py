"""The public API on real InfluxDB with simulator data: each cell's figures for today, the last 30 days and
this year equal the balance the operators see, the diagram's flows add up, hidden and unknown cells are
404, answers are cached, and each client address is limited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from collector.api.app import create_app
from collector.api.cache import TTLCache
from collector.api.ratelimit import RateLimiter
from tests.test_api_data import ApiData, api_data  # noqa: F401 - the shared data

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(api_data: ApiData) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    app = create_app(api_data.registry, api_data.settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
        yield c


async def _totals(client: httpx.AsyncClient, auth: dict[str, str], cell: str, start: str, end: str) -> dict:
    r = await client.get("/api/alliance/balance", params={"from": start, "to": end, "cells": cell}, headers=auth)
    assert r.status_code == 200, r.text
    (totals,) = r.json()["cells"]
    return totals["loops"]


async def test_public_cells_are_the_public_ones(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/public/cells")
    assert r.status_code == 200
    assert [(c["id"], c["name"], c["loops"]) for c in r.json()] == [
        ("einzelhof", "Einzelhof", ["electricity", "heat", "water"]),
        ("lindenau", "Lindenau", ["electricity", "heat", "water"]),
        ("musterdorf", "Musterdorf", ["electricity", "heat", "water"])]
    for cell in ("werkhof", "nowhere"):  # a cell that is not public is as unknown as one that does not exist
        r = await client.get(f"/api/public/cells/{cell}/summary")
        assert r.status_code == 404
        assert r.json()["detail"] == f"unknown cell {cell!r}; cells: einzelhof, lindenau, musterdorf"


@pytest.mark.parametrize("cell", ["musterdorf", "lindenau"])
async def test_summary_equals_the_operators_balance(client: httpx.AsyncClient, api_data: ApiData,  # noqa: F811
                                                    cell: str) -> None:
    r = await client.get(f"/api/public/cells/{cell}/summary")
    assert r.status_code == 200, r.text
    s = r.json()
    assert (s["date"], s["timezone"], s["generated_at"]) == ("2026-11-02", "Europe/Berlin", "2026-11-02T14:00:00+01:00")
    # window → (from, to, hours due by 14:00); the data begin on 31 October: 62 hours of it
    windows = {"today": ("2026-11-02", "2026-11-03", 14), "last_30_days": ("2026-10-04", "2026-11-03", 29 * 24 + 14),
               "this_year": ("2026-01-01", "2027-01-01", 305 * 24 + 14)}
    for name, (start, end, due_h) in windows.items():
        w = s[name]
        assert w["start"][:10] == start and w["end"][:10] == end
        assert w["until_ms"] == 1793624400000  # 14:00, the pinned clock
        coverage = round(100 * min(14, due_h) / due_h if name == "today" else 100 * 62 / due_h, 1)
        assert w["coverage_pct"] == dict.fromkeys(("electricity", "heat", "water"), coverage), name
        loops = await _totals(client, api_data.auth, cell, start, end)
        el, heat, water = loops["electricity"], loops["heat"], loops["water"]
        q, m = el["quantities"], el["metrics"]
        assert w["electricity"]["generation"] == pytest.approx(q["generation"], abs=0.001)
        assert w["electricity"]["grid_import"] == pytest.approx(q["grid_import"], abs=0.001)
        assert w["electricity"]["used_in_cell"] == pytest.approx(m["load"], abs=0.001)
        assert w["electricity"]["self_sufficiency_pct"] == pytest.approx(m["self_sufficiency_pct"], abs=0.001)
        assert w["electricity"]["self_consumption_pct"] == pytest.approx(m["self_consumption_pct"], abs=0.001)
        hq = heat["quantities"]
        assert w["heat"]["generation"] == pytest.approx(hq["generation"], abs=0.001)
        assert w["heat"]["local_share_pct"] == 100.0 and w["heat"]["imported"] is None  # no heat import metered
        wq, wm = water["quantities"], water["metrics"]
        assert w["water"]["abstraction"] == pytest.approx(wq["abstraction"], abs=0.001)
        assert w["water"]["pumping_kwh_per_m3"] == pytest.approx(wm["pumping_kwh_per_m3"], abs=0.001)
        if cell == "musterdorf":  # three customer heat meters: their total is public
            assert w["heat"]["delivered"] == pytest.approx(hq["delivery"], abs=0.001)
            assert w["water"]["non_revenue_pct"] == pytest.approx(100 * wm["non_revenue"] / wq["supply"], abs=0.001)
        # 30 days and the year hold the same data here (it starts on 31 October), today a part of it
        assert w["withheld"] == []
    assert s["last_30_days"]["electricity"] == s["this_year"]["electricity"]
    assert s["today"]["electricity"]["generation"] < s["last_30_days"]["electricity"]["generation"]


@pytest.mark.parametrize("cell", ["musterdorf", "lindenau", "einzelhof"])
async def test_the_diagrams_flows_add_up(client: httpx.AsyncClient, cell: str) -> None:
    s = (await client.get(f"/api/public/cells/{cell}/summary")).json()
    for name in ("today", "last_30_days", "this_year"):
        w = s[name]
        el = w["flows"]["electricity"]
        sources = {f["key"]: f for f in el["sources"]}
        assert set(sources) == {"chp", "solar", "grid_import"}
        assert [sources[k]["local"] for k in ("chp", "solar", "grid_import")] == [True, True, False]
        assert sources["chp"]["value"] + sources["solar"]["value"] == pytest.approx(w["electricity"]["generation"],
                                                                                    abs=0.002)
        for loop in ("electricity", "heat", "water"):
            f = w["flows"][loop]
            total_in = sum(x["value"] for x in f["sources"])
            total_out = sum(x["value"] for x in f["uses"])
            assert total_in == pytest.approx(total_out, abs=0.005), (cell, name, loop)
        assert [u["key"] for u in w["flows"]["heat"]["uses"]] == (
            ["network"] if cell == "einzelhof" else ["buildings", "network_loss"])


async def test_answers_are_cached_and_revalidated(client: httpx.AsyncClient) -> None:
    first = await client.get("/api/public/cells/musterdorf/summary")
    assert first.headers["cache-control"] == "public, max-age=60"
    again = await client.get("/api/public/cells/musterdorf/summary")
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    r = await client.get("/api/public/cells/musterdorf/summary", headers={"If-None-Match": first.headers["etag"]})
    assert r.status_code == 304 and r.content == b""


async def test_each_address_is_limited(api_data: ApiData) -> None:  # noqa: F811
    app = create_app(api_data.registry, api_data.settings(public_rate_per_s=0.5, public_burst=3))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 4711)),
                                 base_url="http://api") as c:
        codes = [(await c.get("/api/public/cells")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await c.get("/api/public/cells/musterdorf/summary")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["detail"] == "too many requests: please wait a moment and try again"
        assert (await c.get("/")).status_code == 200  # the page itself is not limited
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.8", 4711)),
                                 base_url="http://api") as other:
        assert (await other.get("/api/public/cells")).status_code == 200  # another address has its own bucket


def test_rate_limiter_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    now[0] = 0.5
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0
    assert RateLimiter(0, 1).take("a") == 0.0  # 0: unlimited


async def test_cache_computes_once_for_concurrent_callers_and_expires() -> None:
    now = [0.0]
    cache: TTLCache[int] = TTLCache(60, clock=lambda: now[0])
    calls = []

    async def compute() -> int:
        calls.append(1)
        await asyncio.sleep(0.05)  # a slow computation: the other callers arrive while it runs
        return len(calls)

    assert await asyncio.gather(*(cache.get("k", compute) for _ in range(20))) == [1] * 20
    now[0] = 59.9
    assert await cache.get("k", compute) == 1
    now[0] = 60.1
    assert await cache.get("k", compute) == 2

    async def broken() -> int:
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError):
        await cache.get("x", broken)
    assert await cache.get("x", compute) == 3  # failures are not cached
