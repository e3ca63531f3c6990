"""Simulator data in a real InfluxDB, shared by the API, public-page and browser tests, and a live server.

The demo cells run in simulated time (Site.advance every 60 s, no waiting) from Friday 30 October 2026,
23:00 to Monday 2 November 2026, 14:00 (Europe/Berlin), written in the collector's schema and balanced
by the engine. The API's clock is pinned to that Monday 14:00, so "today" is the 2nd and "this year"
holds October and November. Two more cells: Einzelhof (Lindenau's plant, but its one heat customer
meter is a single household's) and Werkhof (not public). Every customer meter (`consumer: true`)
counts at a sentinel rate, so the privacy test can look for its exact values in public answers.

Other test modules use `api_data` and `live_api`; both are built once per test session.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from collector.api.app import API_MQTT, ApiSettings, create_app
from collector.api.tokens import issue_token
from collector.balance.wiring import InfluxEngine
from collector.lineprotocol import Row, encode
from collector.registry import Registry
from collector.storage import InfluxSettings, V1Writer
from edge.cell import CellConfig
from edge.sim.site import Site
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import CELLS
from tests.helpers import LiveServer

pytestmark = pytest.mark.integration

TZ = ZoneInfo("Europe/Berlin")
NOW_S = int(datetime(2026, 11, 2, 14, 0, tzinfo=TZ).timestamp())
START_S = int(datetime(2026, 10, 31, 0, 0, tzinfo=TZ).timestamp()) - 3600
STEP_S = 60
DEMO_CELLS = ("lindenau", "musterdorf")
#: consumer meters' heat rates (kWh/h): sentinels nothing else in the data comes near
SENTINEL_KW = {("musterdorf", "heat-school"): 21.3791, ("musterdorf", "heat-townhall"): 13.5792,
               ("musterdorf", "heat-housing"): 18.6793, ("einzelhof", "heat-consumers"): 11.2837}


@dataclass
class ApiData:
    influx: InfluxDB1
    mosquitto: Mosquitto
    cells: dict[str, CellConfig]
    tokens_file: Path
    token: str
    #: (cell, device) → exact quantities of each consumer meter: per day, per month row, per window
    consumer_values: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    @property
    def registry(self) -> Registry:
        return Registry(self.cells)

    def settings(self, **kw: object) -> ApiSettings:
        base: dict[str, object] = {"tokens_file": self.tokens_file, "mqtt": API_MQTT.replace(port=self.mosquitto.port),
                                   "watch_status": False, "clock": lambda: float(NOW_S), "public_rate_per_s": 0.0}
        return ApiSettings(InfluxSettings(url=self.influx.url, database=self.influx.database), **{**base, **kw})

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> None:
        self.influx.stop()
        self.mosquitto.stop()


def _variant(src: str, cell_id: str, name: str, public: bool = True, consumers: tuple[str, ...] = ()) -> CellConfig:
    data = yaml.safe_load((CELLS / f"{src}.yaml").read_text())
    data["cell"].update(id=cell_id, name=name, public=public)
    for gw in data["gateways"]:
        gw["id"] = gw["id"].replace(src, cell_id)
        for dev in gw["devices"]:
            if dev["id"] in consumers:
                dev["consumer"] = True
    return CellConfig.model_validate(data)


def make_cells() -> dict[str, CellConfig]:
    cells = {c: CellConfig.model_validate(yaml.safe_load((CELLS / f"{c}.yaml").read_text())) for c in DEMO_CELLS}
    cells["einzelhof"] = _variant("lindenau", "einzelhof", "Einzelhof", consumers=("heat-consumers",))
    cells["werkhof"] = _variant("lindenau", "werkhof", "Werkhof", public=False)
    return cells


def _simulate(cfg: CellConfig, writer: V1Writer, cell_ids: tuple[str, ...]) -> None:
    """Run the site from START_S to NOW_S; write its role counters (sentinels for customer meters) under
    every id in cell_ids, and every point once at NOW_S (for /latest)."""
    site = Site(cfg, START_S)
    roles = [(g.id, d.id, p) for g, d in cfg.devices() for p in d.roles]
    rows: list[Row] = []
    for t in range(START_S, NOW_S + 1, STEP_S):
        site.advance(t)
        for cell in cell_ids:
            fields: dict[tuple[str, str], dict[str, float]] = {}
            for gw, dev, point in roles:
                rate = SENTINEL_KW.get((cell, dev))
                value = 100_000.0 + rate * (t - START_S) / 3600 if rate else site.state[dev][point]
                fields.setdefault((gw, dev), {})[point] = value
            if t == NOW_S:
                for (gw, dev), f in fields.items():
                    f.update({k: v for k, v in site.state[dev].items() if k not in f})
            rows += [(cfg.profiles[dev].device_class,
                      (("cell", cell), ("gateway", gw.replace(cfg.cell.id, cell)), ("device", dev)), t * 1000, f)
                     for (gw, dev), f in fields.items()]
        if len(rows) >= 20_000:
            writer.write(encode(rows))
            rows = []
    writer.write(encode(rows))


def _consumer_values() -> dict[tuple[str, str], list[float]]:
    """What each customer meter counted: per 15 minutes, hour, day of the data, month row, and window."""
    hours = {"15m": 0.25, "1h": 1.0, "day": 24.0, "today": 14.0, "data": (NOW_S - START_S - 3600) / 3600,
             "october": 24.0, "november": 38.0}
    return {key: [rate * h for h in hours.values()] for key, rate in SENTINEL_KW.items()}


def build(tmp: Path) -> ApiData:
    influx = InfluxDB1(tmp / "influxdb")
    influx.start()
    mosquitto = Mosquitto(tmp / "mosquitto")
    mosquitto.start()
    cells = make_cells()
    settings = InfluxSettings(url=influx.url, database=influx.database)
    writer = V1Writer(settings)
    _simulate(cells["musterdorf"], writer, ("musterdorf",))
    _simulate(cells["lindenau"], writer, ("lindenau", "einzelhof"))
    writer.close()

    async def balance() -> None:
        async with InfluxEngine(cells, settings) as engine:
            for cell in ("musterdorf", "lindenau", "einzelhof"):
                await engine.recompute(cell, (START_S + 3600) * 1000, NOW_S * 1000)

    asyncio.run(balance())
    tokens = tmp / "api-tokens"
    token = issue_token(tokens, "tests")
    return ApiData(influx, mosquitto, cells, tokens, token, _consumer_values())


# built once per session however many modules import the fixtures (each import is a fixture of its own)
_shared: dict[str, object] = {}
_lock = threading.Lock()


@pytest.fixture(scope="session")
def api_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiData]:
    with _lock:
        owner = "data" not in _shared
        if owner:
            _shared["data"] = build(tmp_path_factory.mktemp("api-data"))
    data = _shared["data"]
    assert isinstance(data, ApiData)
    yield data
    if owner:
        _shared.pop("data", None)
        data.stop()


@pytest.fixture(scope="session")
def live_api(api_data: ApiData) -> Iterator[str]:
    """Base URL of the API (no rate limit, clock pinned) serving the shared data."""
    with _lock:
        owner = "live" not in _shared
        if owner:
            server = LiveServer(create_app(api_data.registry, api_data.settings(watch_status=True)))
            _shared["live"] = server.__enter__()
    live = _shared["live"]
    assert isinstance(live, LiveServer)
    yield live.url
    if owner:
        _shared.pop("live", None)
        live.__exit__()


def test_the_shared_data_holds_two_days_and_today_of_every_public_cell(api_data: ApiData, live_api: str) -> None:
    for cell in ("musterdorf", "lindenau", "einzelhof"):
        body = httpx.get(f"{live_api}/api/cells/{cell}/balance", params={"from": "2026-10-31", "to": "2026-11-03"},
                         headers=api_data.auth).json()
        days = [i["start"][:10] for i in body["intervals"]]
        assert days == ["2026-10-31", "2026-11-01", "2026-11-02"], cell
        assert [i["loops"]["electricity"]["complete"] for i in body["intervals"]] == [True, True, False]
        today = body["intervals"][2]["loops"]["electricity"]["quality"]
        assert today["n_missing"] == (96 - 56) * today["n_meters"], "00:00-14:00 balanced, the rest of the day due"
