"""The whole data path on real servers: simulator → gateway → Mosquitto → collector → InfluxDB → API."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from collector.api.app import API_MQTT, ApiSettings, create_app
from collector.api.tokens import issue_token
from collector.ingest import COLLECTOR_MQTT, CollectorSettings
from collector.registry import Registry
from collector.service import run_collector
from collector.storage import InfluxSettings
from edge.cell import load_cell
from gateway.service import GatewayService
from gateway.settings import gateway_mqtt
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT, start_simulator
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


async def test_register_change_reaches_influxdb(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    """A value changed on a simulated meter is decoded, published, stored, and found by InfluxQL."""
    sim, cell = await start_simulator(ROOT / "tests/data/tinycell.yaml", tmp_path / "cells")
    cfg = load_cell(cell)
    stop = asyncio.Event()
    gw = GatewayService(cfg, "gw-tiny", gateway_mqtt(port=mosquitto.port), tmp_path / "outbox.sqlite")
    influx = InfluxSettings(url=influxdb.url, database=influxdb.database)
    collector = CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="test-collector"),
                                  flush_interval_s=0.2)
    tasks = [asyncio.create_task(gw.run(stop)),
             asyncio.create_task(run_collector(collector, influx, Registry({cfg.cell.id: cfg}), stop=stop))]
    try:
        # an unusual, exactly representable value, so finding it proves it came through this path
        sim.pin("tinycell", "grid", "power", -4321.5)

        def found() -> list[list[object]]:
            res = influxdb.query('SELECT "power" FROM "electricity_meter" WHERE "device" = \'grid\' AND '
                                 '"cell" = \'tinycell\' AND "gateway" = \'gw-tiny\' AND "power" = -4321.5')
            series = res["results"][0].get("series", [])
            return series[0]["values"] if series else []

        rows = await wait_for(lambda: found(), 15, "the pinned value in InfluxDB")
        ts = rows[0][0]
        assert abs(ts / 1000 - time.time()) < 30, "stored with the reading's own timestamp (UTC ms)"
        # the other counters arrive as floats with their decoded values
        res = influxdb.query('SELECT last("energy_import") FROM "electricity_meter" WHERE "device" = \'grid\'')
        energy = res["results"][0]["series"][0]["values"][0][1]
        assert energy == pytest.approx(sim.sites["tinycell"].truth["grid"]["energy_import"], abs=0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sim.stop()


async def test_api_latest_matches_simulator(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    """/api/cells/<cell>/latest serves, for every point, what the simulator serves."""
    sim, cell = await start_simulator(ROOT / "tests/data/tinycell.yaml", tmp_path / "cells")
    cfg = load_cell(cell)
    sim.pin("tinycell", "grid", "voltage_l1", 233.25)
    stop = asyncio.Event()
    registry = Registry({cfg.cell.id: cfg})
    gw = GatewayService(cfg, "gw-tiny", gateway_mqtt(port=mosquitto.port), tmp_path / "outbox.sqlite")
    influx = InfluxSettings(url=influxdb.url, database=influxdb.database)
    collector = CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="test-collector"),
                                  flush_interval_s=0.2)
    tasks = [asyncio.create_task(gw.run(stop)),
             asyncio.create_task(run_collector(collector, influx, registry, stop=stop))]
    token = issue_token(tmp_path / "api-tokens", "tests")
    app = create_app(registry, ApiSettings(influx, mqtt=API_MQTT.replace(port=mosquitto.port), tokens_file=tmp_path / "api-tokens"))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            async def latest() -> dict[str, object] | None:
                r = await client.get("/api/cells/tinycell/latest")
                body = r.json()
                pts = body["devices"][0]["points"]
                return body if all(p["value"] is not None for p in pts.values()) else None

            body = await wait_for(latest, 15, "every point in /latest")
            pts = body["devices"][0]["points"]
            assert pts["voltage_l1"]["value"] == 233.25
            assert pts["voltage_l1"]["unit"] == "V"
            assert set(pts) == {p.name for p in cfg.published_points(cfg.device("grid"))}
            assert (await client.get("/api/cells/nowhere/latest")).status_code == 404
            health = (await client.get("/healthz")).json()
            assert health["database"] and health["broker"]
            assert health["gateways"]["tinycell/gw-tiny"]["last_seq"] is not None
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sim.stop()
