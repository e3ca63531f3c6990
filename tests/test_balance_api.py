"""The balance endpoints on a real InfluxDB: a cell's balance per period, the alliance side by side, and
clear 4xx answers for an unknown cell or an unusable range."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from collector.api.balance import make_router
from collector.registry import Registry
from kwwk.dev.localservers import InfluxDB1
from tests.test_balance_scenarios import DAY, H, Backend, day_readings, make_testdorf

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(influxdb: InfluxDB1) -> AsyncIterator[httpx.AsyncClient]:
    # two cells with the same hand-computed day (see test_balance_scenarios); Zweitdorf gives no connections
    cells = [make_testdorf("testdorf", residents=500, connections=200), make_testdorf("zweitdorf", 250, None)]
    backend = Backend("influx", cells, influxdb.url)
    engine = backend.engine()
    for cfg in cells:
        backend.write(day_readings(), cfg.cell.id)
        await engine.recompute(cfg.cell.id, DAY, DAY + 24 * H)
    app = FastAPI()
    app.include_router(make_router(Registry({c.cell.id: c for c in cells}), backend.db))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
        yield c
    await backend.close()


async def test_cell_balance_per_day_hour_and_quarter(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/cells/testdorf/balance", params={"from": "2026-11-02", "to": "2026-11-03"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["period"], body["timezone"], body["from_ms"], body["to_ms"]) == ("1d", "Europe/Berlin", DAY,
                                                                                DAY + 24 * H)
    (day,) = body["intervals"]
    assert day["start"] == "2026-11-02T00:00:00+01:00"
    el = day["loops"]["electricity"]
    assert el["unit"] == "kWh" and el["complete"] is True
    assert el["quantities"]["generation"] == pytest.approx(540.0, abs=0.0005)
    assert el["metrics"]["self_sufficiency_pct"] == pytest.approx(85.148515)
    assert el["quality"]["n_meters"] == 5.0 and "generation" not in el["metrics"]
    assert day["loops"]["water"]["unit"] == "m³"
    assert day["loops"]["water"]["metrics"]["non_revenue"] == pytest.approx(28.8, abs=0.0005)
    assert set(day["loops"]) == {"electricity", "heat", "water", "fuel", "chp"}

    r = await client.get("/api/cells/testdorf/balance",
                         params={"from": "2026-11-02T09:00", "to": "2026-11-02T11:00", "period": "15m"})
    quarters = r.json()["intervals"]
    assert len(quarters) == 8 and quarters[0]["start"] == "2026-11-02T09:00:00+01:00"
    assert quarters[0]["loops"]["electricity"]["quantities"]["generation"] == pytest.approx(7.5, abs=0.0005)
    r = await client.get("/api/cells/testdorf/balance", params={"from": DAY, "to": DAY + 24 * H, "period": "1h"})
    assert len(r.json()["intervals"]) == 24


@pytest.mark.parametrize(("path", "params", "status", "message"), [
    ("/api/cells/nowhere/balance", {"from": "2026-11-02", "to": "2026-11-03"}, 404,
     "unknown cell 'nowhere'; known cells: testdorf, zweitdorf"),
    ("/api/cells/testdorf/balance", {"from": "last week", "to": "2026-11-03"}, 400, "'last week' is not a time"),
    ("/api/cells/testdorf/balance", {"from": "2026-11-03", "to": "2026-11-02"}, 400,
     "empty range: 'to' (2026-11-02) must be after 'from' (2026-11-03)"),
    ("/api/cells/testdorf/balance", {"from": "2026-01-01", "to": "2027-01-01", "period": "15m"}, 400,
     "range too long for period '15m'"),
    ("/api/alliance/balance", {"from": "2026-11-02", "to": "2026-11-03", "cells": "nowhere"}, 404,
     "unknown cell 'nowhere'"),
    ("/api/alliance/balance", {"from": "2026-11-02", "to": "2026-11-02"}, 400, "empty range"),
])
async def test_clear_4xx(client: httpx.AsyncClient, path: str, params: dict[str, str], status: int,
                         message: str) -> None:
    r = await client.get(path, params=params)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


async def test_bad_period_is_refused_with_the_allowed_values(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/cells/testdorf/balance", params={"from": "2026-11-02", "to": "2026-11-03",
                                                                "period": "1w"})
    assert r.status_code == 422
    assert "'15m', '1h', '1d' or '1mo'" in r.text


async def test_alliance_side_by_side_per_resident_and_connection(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/alliance/balance", params={"from": "2026-11-02", "to": "2026-11-03"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["days"] == 1.0 and [c["cell"] for c in body["cells"]] == ["testdorf", "zweitdorf"]
    testdorf, zweitdorf = body["cells"]
    gen = 540.0
    assert testdorf["loops"]["electricity"]["quantities"]["generation"] == pytest.approx(gen, abs=0.0005)
    assert testdorf["per_resident"]["electricity"]["generation"] == pytest.approx(gen / 500)
    assert testdorf["per_connection"]["water"]["non_revenue"] == pytest.approx(28.8 / 200)
    assert zweitdorf["per_connection"] == {} and zweitdorf["per_resident"]["heat"]["network_loss"] == pytest.approx(
        96.0 / 250)
    alliance = body["alliance"]
    assert alliance["loops"]["electricity"]["quantities"]["generation"] == pytest.approx(2 * gen, abs=0.001)
    # ratios from the sums: the same as each cell's here, since both had the same day
    assert alliance["loops"]["electricity"]["metrics"]["self_sufficiency_pct"] == pytest.approx(85.148515)
    assert alliance["per_resident"]["electricity"]["generation"] == pytest.approx(2 * gen / 750)
    assert "generation" not in alliance["per_connection"].get("electricity", {})  # zweitdorf has no connections
    assert alliance["computed_over"]["water"]["non_revenue"] == ["testdorf", "zweitdorf"]
    assert alliance["loops"]["heat"]["complete"] is True

    r = await client.get("/api/alliance/balance", params={"from": "2026-11-02", "to": "2026-11-04",
                                                          "cells": ["testdorf"]})
    only = r.json()
    assert [c["cell"] for c in only["cells"]] == ["testdorf"]
    # a second day without data: its 96 intervals × 5 electricity meters are missing, and it says so
    el = only["alliance"]["loops"]["electricity"]
    assert el["complete"] is False and el["quality"]["n_missing"] == 480.0
    assert el["quantities"]["generation"] == pytest.approx(gen, abs=0.0005)
