"""No public answer holds a single customer's value.

Every customer meter (`consumer: true`) in the shared data counts at a sentinel rate, so what it
counted per 15 minutes, hour, day, month and window is known exactly (tests/test_api_data.py).
This test walks every public endpoint the OpenAPI spec lists, for every cell (public, hidden and
unknown), plus the page and every file it loads, and the operator endpoints as an anonymous client
sees them; no number in any answer may be one of those values (or one per resident), and no answer
may name a customer's meter. Einzelhof has a single customer heat meter: its delivery would be that
customer's consumption, so it must be withheld (and the detector is shown to find it where it is).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from collector.api.app import create_app
from collector.api.page import STATIC_DIR
from collector.storage import InfluxSettings, V1Writer
from tests.test_api_data import NOW_S, ApiData, api_data, live_api  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.integration


def _numbers(value: object) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _sentinels(data: ApiData) -> dict[float, str]:
    out = {}
    for (cell, device), values in data.consumer_values.items():
        residents = data.cells[cell].cell.residents or 1
        for v in values:
            out[v] = f"{cell}/{device}"
            if v / residents >= 0.05:  # tinier ones would match any small figure within the rounding
                out[v / residents] = f"{cell}/{device} per resident"
    return out


def _leaks(body: object, sentinels: dict[float, str]) -> list[str]:
    """Numbers within the public rounding (3 decimals) of a customer meter's value."""
    return [f"{x} ≈ {who} ({s})" for x in _numbers(body) for s, who in sentinels.items() if abs(x - s) <= 6e-4]


def _names(data: ApiData) -> list[str]:
    return [n for cfg in data.cells.values() for _, d in cfg.devices() if d.consumer for n in (d.id, d.name) if n]


def test_no_public_answer_holds_a_single_customers_value(live_api: str, api_data: ApiData) -> None:  # noqa: F811
    spec = httpx.get(f"{live_api}/openapi.json").json()
    public = [p for p, ops in spec["paths"].items() if "public" in ops["get"]["tags"]]
    operator = [p for p, ops in spec["paths"].items() if ops["get"].get("security")]
    assert public and all(p.startswith("/api/public/") for p in public)
    cells = [*api_data.cells, "nowhere"]
    answers: dict[str, httpx.Response] = {}
    for path in public + operator:
        for cell in cells if "{cell}" in path else [None]:
            url = path.replace("{cell}", cell) if cell else path
            assert "{" not in url, f"{path}: a path parameter this walk does not fill"
            r = httpx.get(f"{live_api}{url}", params={"from": "2026-10-31", "to": "2026-11-03", "device": "heat-school"})
            answers[url] = r
            if path in operator:
                assert r.status_code == 401, url  # anonymous: nothing but the refusal
    for f in sorted(STATIC_DIR.iterdir()):
        answers[f"/static/{f.name}"] = httpx.get(f"{live_api}/static/{f.name}")
    answers["/"] = httpx.get(f"{live_api}/")
    assert all(r.status_code in (200, 401, 404) for r in answers.values())
    summaries = [u for u in answers if u.endswith("/summary") and answers[u].status_code == 200]
    assert sorted(summaries) == [f"/api/public/cells/{c}/summary" for c in ("einzelhof", "lindenau", "musterdorf")]

    sentinels = _sentinels(api_data)
    names = _names(api_data)
    assert len(sentinels) >= 30 and "Wärme Schule" in names and "heat-consumers" in names
    found = []
    for url, r in answers.items():
        if r.headers["content-type"].startswith("application/json"):
            body = r.json()
            found += [f"{url}: {leak}" for leak in _leaks(body, sentinels)]
            text = json.dumps(body, ensure_ascii=False)
        else:
            text = r.text
        found += [f"{url}: names {n!r}" for n in names if n in text]
    assert not found, "\n".join(found)

    einzelhof = answers["/api/public/cells/einzelhof/summary"].json()
    for window in ("today", "last_30_days", "this_year"):
        w = einzelhof[window]
        assert w["heat"]["delivered"] is None and w["heat"]["network_loss"] is None
        assert w["withheld"] == ["heat.delivered", "heat.network_loss", "heat.network_loss_pct"]
        assert w["flows"]["heat"]["withheld"] is True
        assert w["heat"]["fed"] is not None  # the utility's own feed meter stays public


def test_the_detector_finds_a_customers_value_where_operators_may_see_it(live_api: str,  # noqa: F811
                                                                         api_data: ApiData) -> None:  # noqa: F811
    r = httpx.get(f"{live_api}/api/cells/einzelhof/balance", params={"from": "2026-11-02", "to": "2026-11-03"},
                  headers=api_data.auth)
    leaks = _leaks(r.json(), _sentinels(api_data))
    assert any("einzelhof/heat-consumers" in leak for leak in leaks), "the sentinel must be findable"
    r = httpx.get(f"{live_api}/api/cells/musterdorf/devices", headers=api_data.auth)
    assert any(n in r.text for n in _names(api_data))


async def test_a_customer_meter_lagging_behind_withholds_its_total(api_data: ApiData) -> None:  # noqa: F811
    """Answers 15 minutes apart give that quarter's total: when the school's heat meter has not reported
    14:00-14:15 while the loop and the two other customers have, the delivery total is withheld."""
    t = NOW_S * 1000
    meter = ("kwwk_balance_meter,cell=musterdorf,device={d},loop=heat,period=15m,point=heat_energy,role=delivery "
             "value={v},n_intervals=1,n_missing=0 " + str(t))
    lines = [(f"kwwk_balance,cell=musterdorf,loop=heat,period=15m delivery=8.06,feed=19.8,generation=19.8,"
              f"n_meters=5,n_missing=1,n_intervals=1 {t}"),
             meter.format(d="heat-townhall", v=3.3948), meter.format(d="heat-housing", v=4.66983)]
    writer = V1Writer(InfluxSettings(url=api_data.influx.url, database=api_data.influx.database))
    writer.write("\n".join(lines) + "\n")
    writer.close()
    try:
        async def summary(clock_s: int) -> dict:
            app = create_app(api_data.registry, api_data.settings(clock=lambda: float(clock_s)))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
                return (await client.get("/api/public/cells/musterdorf/summary")).json()

        later = await summary(NOW_S + 1800)  # 14:30: the 14:00 quarter counts, and the school is missing from it
        for window in ("today", "last_30_days", "this_year"):
            w = later[window]
            assert w["heat"]["delivered"] is None and w["heat"]["network_loss_pct"] is None, window
            assert "heat.delivered" in w["withheld"] and w["heat"]["generation"] is not None
        before = await summary(NOW_S)  # 14:00: every customer meter has every quarter so far
        assert before["today"]["heat"]["delivered"] is not None and before["today"]["withheld"] == []
    finally:
        for measurement in ("kwwk_balance", "kwwk_balance_meter"):
            api_data.influx.query(f"DELETE FROM \"{measurement}\" WHERE \"cell\" = 'musterdorf' "
                                  f"AND time >= {t}ms AND time <= {t}ms", method="POST")
