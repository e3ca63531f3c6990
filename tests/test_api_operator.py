"""The operator API on real InfluxDB and Mosquitto: cells, devices and latest values, the fleet's health
(a real gateway online, then offline; sequence gaps; outbox depth from the status), CSV exports page by
page, and clear 4xx answers; no stack trace ever reaches a client."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion

from collector.api.app import API_MQTT, ApiSettings, create_app
from collector.api.tokens import issue_token
from collector.ingest import COLLECTOR_MQTT, CollectorSettings
from collector.registry import Registry
from collector.service import run_collector
from collector.storage import InfluxSettings, V1Writer
from edge.cell import load_cell
from edge.telemetry import status_topic
from gateway.service import GatewayService
from gateway.settings import gateway_mqtt
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT, start_simulator
from tests.helpers import wait_for
from tests.test_api_data import NOW_S, SENTINEL_KW, START_S, ApiData, api_data  # noqa: F401

pytestmark = pytest.mark.integration


@asynccontextmanager
async def _client(app: FastAPI, headers: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan (status subscription) running, and a client for it."""
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api", headers=headers) as c:
        yield c


@pytest.fixture
async def client(api_data: ApiData) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    async with _client(create_app(api_data.registry, api_data.settings()), api_data.auth) as c:
        yield c


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def _pages(client: httpx.AsyncClient, url: str, params: dict[str, object]) -> tuple[list[dict[str, str]], int]:
    rows, pages = [], 0
    r = await client.get(url, params=params)
    while True:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/csv; charset=utf-8"
        rows += _csv(r.text)
        pages += 1
        if "x-next-cursor" not in r.headers:
            return rows, pages
        link = r.headers["link"]
        assert link.endswith('>; rel="next"') and f"cursor={r.headers['x-next-cursor']}" in link
        r = await client.get(link[1:link.index(">")])


async def test_cells_devices_and_latest_values(client: httpx.AsyncClient, api_data: ApiData) -> None:  # noqa: F811
    cells = {c["id"]: c for c in (await client.get("/api/cells")).json()}
    assert set(cells) == {"musterdorf", "lindenau", "einzelhof", "werkhof"}
    assert cells["werkhof"]["public"] is False and cells["musterdorf"]["residents"] == 860
    devices = {d["id"]: d for d in (await client.get("/api/cells/musterdorf/devices")).json()}
    assert devices["heat-school"]["consumer"] is True and devices["grid"]["consumer"] is False
    assert devices["grid"]["roles"] == {"energy_import": "electricity.grid_import",
                                        "energy_export": "electricity.grid_export"}
    assert devices["grid"]["points"]["energy_import"] == "kWh"

    latest = {d["id"]: d for d in (await client.get("/api/cells/musterdorf/latest")).json()["devices"]}
    school = latest["heat-school"]["points"]["heat_energy"]
    want = 100_000 + SENTINEL_KW[("musterdorf", "heat-school")] * (NOW_S - START_S) / 3600
    assert school["ts"] == NOW_S * 1000 and school["value"] == pytest.approx(want) and school["unit"] == "kWh"
    stored = api_data.influx.query('SELECT last("energy_import") FROM "electricity_meter" WHERE "cell" = '
                                   "'musterdorf' AND \"device\" = 'grid'")["results"][0]["series"][0]["values"][0]
    assert latest["grid"]["points"]["energy_import"] == {"value": stored[1], "ts": stored[0], "unit": "kWh"}
    roles = [(d.id, p) for _, d in api_data.cells["musterdorf"].devices() for p in d.roles]
    assert all(latest[d]["points"][p]["ts"] == NOW_S * 1000 for d, p in roles)


async def test_a_real_gateway_is_online_then_offline(tmp_path: Path, mosquitto: Mosquitto,
                                                     influxdb: InfluxDB1) -> None:
    sim, path = await start_simulator(ROOT / "tests/data/tinycell.yaml", tmp_path / "cells")
    cfg = load_cell(path)
    registry = Registry({cfg.cell.id: cfg})
    gw_stop, collector_stop = asyncio.Event(), asyncio.Event()
    gw = GatewayService(cfg, "gw-tiny", gateway_mqtt(port=mosquitto.port), tmp_path / "outbox.sqlite")
    influx = InfluxSettings(url=influxdb.url, database=influxdb.database)
    collector = CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="test-collector"),
                                  flush_interval_s=0.2)
    tasks = [asyncio.create_task(gw.run(gw_stop)),
             asyncio.create_task(run_collector(collector, influx, registry, stop=collector_stop))]
    token = issue_token(tmp_path / "api-tokens", "ops")
    app = create_app(registry, ApiSettings(influx, mqtt=API_MQTT.replace(port=mosquitto.port),
                                           tokens_file=tmp_path / "api-tokens"))
    try:
        async with _client(app, {"Authorization": f"Bearer {token}"}) as client:

            async def gateway() -> dict[str, object]:
                (one,) = (await client.get("/api/gateways")).json()
                return one

            g = await wait_for(lambda: _when(gateway(), lambda x: x["state"] == "online" and x["last_seq"]), 15,
                               "the gateway online with a stored batch")
            assert g["cell"] == "tinycell" and g["gateway"] == "gw-tiny" and g["seq_gaps"] == 0
            assert g["last_seen_age_s"] < 15 and g["streams"][0]["batches"] >= 1
            # the gateway reports its outbox depth in its retained status (a connected gateway's is small)
            assert isinstance(g["outbox_readings"], int) and g["outbox_readings"] < 100
            gw_stop.set()
            await asyncio.gather(tasks[0], return_exceptions=True)
            g = await wait_for(lambda: _when(gateway(), lambda x: x["state"] == "offline"), 10, "the gateway offline")
            assert g["state_since"] is not None
            same = (await client.get("/api/cells/tinycell/gateways")).json()
            assert [x["state"] for x in same] == ["offline"]
    finally:
        gw_stop.set()
        collector_stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sim.stop()


async def _when(awaitable: object, ok: object) -> object:
    value = await awaitable  # type: ignore[misc]
    return value if ok(value) else None  # type: ignore[operator]


def _publish_retained(port: int, messages: dict[str, bytes]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for topic, payload in messages.items():
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


async def test_sequence_gaps_last_seen_and_the_outbox_depth_a_status_reports(api_data: ApiData) -> None:  # noqa: F811
    now_ms = NOW_S * 1000
    old = now_ms - 30 * 3_600_000  # before the 24 h window
    lines = [f"kwwk_batches,cell=musterdorf,gateway=gw-musterdorf-1,stream=old seq=100,readings=5,replay=0 {old}"]
    sent = [0, 1, 2, 5, 6, 8, 9, 5]  # 3, 4 and 7 never arrived; 5 came twice (a replay)
    for i, seq in enumerate(sent):
        lines.append(f"kwwk_batches,cell=musterdorf,gateway=gw-musterdorf-1,stream=s1 seq={seq},readings=10,"
                     f"replay={int(i == 7)} {now_ms - (60 - i) * 60_000}")
    writer = V1Writer(InfluxSettings(url=api_data.influx.url, database=api_data.influx.database))
    writer.write("\n".join(lines) + "\n")
    writer.close()
    topics = {status_topic("musterdorf", "gw-musterdorf-1"): json.dumps(
                  {"schema": "kwwk.telemetry/1", "state": "online", "ts": now_ms - 5000, "outbox_readings": 1234}),
              status_topic("lindenau", "gw-lindenau-1"): json.dumps({"state": "offline", "ts": now_ms - 7000})}
    _publish_retained(api_data.mosquitto.port, {t: p.encode() for t, p in topics.items()})
    try:
        async with _client(create_app(api_data.registry, api_data.settings(watch_status=True)),
                           api_data.auth) as client:

            async def fleet() -> dict[str, dict[str, object]] | None:
                body = {g["cell"]: g for g in (await client.get("/api/gateways")).json()}
                return body if body["lindenau"]["state"] == "offline" else None

            gws = await wait_for(fleet, 10, "the retained statuses")
            m = gws["musterdorf"]
            assert (m["state"], m["outbox_readings"], m["last_seq"], m["seq_gaps"]) == ("online", 1234, 5, 3)
            assert m["streams"] == [{"stream": "s1", "first_seq": 0, "last_seq": 9, "batches": 7, "missing": 3,
                                     "readings": 80}]
            assert m["last_seen_age_s"] == pytest.approx(53 * 60) and m["window_s"] == 86400
            assert m["state_since"] == m["outbox_reported"] == "2026-11-02T12:59:55Z"
            assert gws["lindenau"]["outbox_readings"] is None and gws["lindenau"]["last_seen"] is None
            assert gws["einzelhof"]["state"] == "unknown" and gws["einzelhof"]["seq_gaps"] == 0
            wide = {g["cell"]: g for g in (await client.get("/api/gateways", params={"window_h": 48})).json()}
            assert [s["stream"] for s in wide["musterdorf"]["streams"]] == ["s1", "old"]
    finally:
        _publish_retained(api_data.mosquitto.port, dict.fromkeys(topics, b""))  # clear the retained messages


async def test_balance_csv_pages_hold_the_balance(client: httpx.AsyncClient) -> None:
    params = {"from": "2026-11-01", "to": "2026-11-02", "loop": "electricity", "period": "15m", "limit": 40}
    rows, pages = await _pages(client, "/api/cells/musterdorf/export/balance.csv", params)
    assert (len(rows), pages) == (96, 3)
    assert rows[0]["start"] == "2026-11-01T00:00:00+01:00" and rows[-1]["start"] == "2026-11-01T23:45:00+01:00"
    assert len({r["start_ms"] for r in rows}) == 96
    body = (await client.get("/api/cells/musterdorf/balance", params={
        "from": "2026-11-01", "to": "2026-11-02", "period": "15m"})).json()
    for row, interval in zip(rows, body["intervals"], strict=True):
        el = interval["loops"]["electricity"]
        assert int(row["start_ms"]) == interval["start_ms"]
        assert float(row["generation"]) == el["quantities"]["generation"]
        assert float(row["self_sufficiency_pct"]) == el["metrics"]["self_sufficiency_pct"]
        assert float(row["n_missing"]) == el["quality"]["n_missing"] == 0.0
    days, _ = await _pages(client, "/api/cells/musterdorf/export/balance.csv",
                           {"from": "2026-10-31", "to": "2026-11-03", "loop": "water", "period": "1d"})
    assert [d["start"][:10] for d in days] == ["2026-10-31", "2026-11-01", "2026-11-02"]
    assert {"abstraction", "supply", "consumption", "non_revenue", "pumping_kwh_per_m3"} <= set(days[0])
    assert "generation" not in days[0]  # another loop's fields are not columns here


async def test_readings_csv_pages_hold_the_stored_readings(client: httpx.AsyncClient,
                                                           api_data: ApiData) -> None:  # noqa: F811
    params = {"from": "2026-11-02T13:00", "to": "2026-11-02T14:01", "device": "grid", "limit": 25}
    rows, pages = await _pages(client, "/api/cells/musterdorf/export/readings.csv", params)
    assert (len(rows), pages) == (61, 3)
    stamps = [int(r["time_ms"]) for r in rows]
    assert stamps == list(range((NOW_S - 3600) * 1000, NOW_S * 1000 + 1, 60_000))
    assert rows[0]["time"] == "2026-11-02T12:00:00.000+00:00"
    stored = api_data.influx.query('SELECT "energy_import" FROM "electricity_meter" WHERE "cell" = \'musterdorf\' '
                                   f"AND \"device\" = 'grid' AND time >= {stamps[0]}ms")["results"][0]["series"][0]
    assert [float(r["energy_import"]) for r in rows] == [v[1] for v in stored["values"]]
    assert rows[-1]["voltage_l1"] and not rows[0]["voltage_l1"]  # every point was written only at 14:00


@pytest.mark.parametrize(("path", "params", "status", "message"), [
    ("/api/cells/nowhere/devices", {}, 404, "unknown cell 'nowhere'; known cells: einzelhof, lindenau, musterdorf"),
    ("/api/cells/nowhere/latest", {}, 404, "unknown cell 'nowhere'"),
    ("/api/cells/nowhere/gateways", {}, 404, "unknown cell 'nowhere'"),
    ("/api/cells/nowhere/balance", {"from": "2026-11-01", "to": "2026-11-02"}, 404, "unknown cell 'nowhere'"),
    ("/api/cells/nowhere/export/balance.csv", {"from": "2026-11-01", "to": "2026-11-02"}, 404,
     "unknown cell 'nowhere'"),
    ("/api/cells/musterdorf/export/readings.csv", {"from": "2026-11-01", "to": "2026-11-02", "device": "toaster"},
     404, "unknown device 'toaster' in cell 'musterdorf'; devices: booster-pump, chp1"),
    ("/api/cells/musterdorf/export/balance.csv", {"from": "yesterday", "to": "2026-11-02"}, 400,
     "'yesterday' is not a time: give a date"),
    ("/api/cells/musterdorf/export/balance.csv", {"from": "2026-11-02", "to": "2026-11-01"}, 400,
     "empty range: 'to' (2026-11-01) must be after 'from' (2026-11-02)"),
    ("/api/cells/musterdorf/export/balance.csv", {"from": "2020-01-01", "to": "2026-01-01"}, 400,
     "range too long: at most 400 days"),
    ("/api/cells/musterdorf/export/balance.csv", {"from": "2026-11-01", "to": "2026-11-02", "cursor": 5}, 400,
     "cursor 5 is outside the range"),
    ("/api/cells/musterdorf/export/balance.csv", {"from": "2026-11-01", "to": "2026-11-02", "limit": 100_000}, 422,
     "less than or equal to 10000"),
    ("/api/cells/musterdorf/export/balance.csv", {"from": "2026-11-01", "to": "2026-11-02", "loop": "gas"}, 422,
     "'electricity', 'heat', 'water', 'fuel' or 'chp'"),
    ("/api/cells/musterdorf/balance", {"from": "9999-01-01", "to": "9999-01-02"}, 400,
     "'from': times must lie between 2000-01-01 and 2100-01-01"),
    ("/api/alliance/balance", {"from": "0001-01-01", "to": "2026-01-02"}, 400, "times must lie between"),
    ("/api/gateways", {"window_h": 0}, 422, "greater than 0"),
])
async def test_clear_4xx(client: httpx.AsyncClient, path: str, params: dict[str, object], status: int,
                         message: str) -> None:
    r = await client.get(path, params=params)
    assert r.status_code == status, r.text
    assert message in json.dumps(r.json(), ensure_ascii=False)


async def test_no_stack_trace_reaches_a_client(api_data: ApiData, tmp_path: Path) -> None:  # noqa: F811
    app = create_app(api_data.registry, api_data.settings())

    @app.get("/api/cells/{cell}/boom")
    async def boom(cell: str) -> None:
        secret = "hunter2"  # noqa: F841 - a local a rich traceback would print
        raise RuntimeError(f"internal state of {cell}: password hunter2")

    async with _client(app) as client:
        r = await client.get("/api/cells/musterdorf/boom")
        assert r.status_code == 500
        body = r.json()
        assert body["detail"].startswith("internal error") and len(body["request_id"]) == 12
        assert "hunter2" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text

    # the database away: a 503 that says so, without the database's own words
    down = create_app(api_data.registry, ApiSettings(InfluxSettings(url="http://127.0.0.1:9"), tokens_file=api_data.tokens_file,
                                                     watch_status=False))
    async with _client(down, api_data.auth) as client:
        for path in ("/api/cells/musterdorf/latest", "/api/public/cells/musterdorf/summary"):
            r = await client.get(path)
            assert r.status_code == 503 and r.headers["retry-after"] == "10", path
            assert r.json()["detail"] == "the database is not available; try again later"
            assert "127.0.0.1" not in r.text and "connect" not in r.text.lower()
        health = await client.get("/healthz")
        assert health.status_code == 503 and health.json()["database"] is False
