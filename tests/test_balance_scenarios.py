"""Hand-computed days of a small cell through the whole engine: a normal day, a counter reset (and a
rollover), a meter replacement, a gap, and late data from a gateway's outbox. Each runs twice: on the
in-memory fakes and on a real InfluxDB, with readings written as the collector writes them (line
protocol through V1Writer: measurement = device class, tags cell/gateway/device, one field per point).

Testdorf, Monday 2 November 2026 (CET, UTC+1), meters read every 5 minutes, rates constant per hour:
  PV 10 kWh/h 09-15 h; CHP 20 kWh/h electricity, 40 kWh/h heat, 7.5 m³/h gas (Hs 10 kWh/m³, z 1.0)
  grid import 5 kWh/h outside 09-15 h, export 4 kWh/h 09-15 h; pump 3 kWh/h
  heat fed 38 kWh/h, delivered 20 + 14 kWh/h; water abstracted 10, supplied 9.6, consumed 8.4 m³/h
Numbers are matched to the Wh (±0.0005 kWh) and to the litre (±0.0005 m³).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from collector.balance.engine import BalanceEngine
from collector.balance.memory import MemoryBalanceStore, MemoryReadingSource
from collector.balance.rows import MEASUREMENT, METER_MEASUREMENT
from collector.balance.source import InfluxReadingSource
from collector.balance.spec import MeterChange
from collector.balance.store import InfluxBalanceStore
from collector.balance.timegrid import parse_time
from collector.balance.trigger import DirtyRanges, run_pending
from collector.lineprotocol import Row, encode
from collector.query import InfluxQL
from collector.storage import InfluxSettings, V1Writer
from edge.cell import CellConfig

TZ = ZoneInfo("Europe/Berlin")
DAY = parse_time("2026-11-02", TZ)  # local midnight = 2026-11-01T23:00Z
H = 3_600_000
WH = LITRE = 0.0005
GAS_MODULUS = 2**32 * 0.01  # the pulse module's u32 counter × 0.01 m³


def make_testdorf(cell_id: str = "testdorf", residents: int = 500, connections: int = 200) -> CellConfig:
    def dev(id_: str, profile: str, roles: dict[str, str]) -> dict[str, object]:
        return {"id": id_, "profile": profile, "connection": {"host": "127.0.0.1", "port": 1502}, "roles": roles}

    return CellConfig.model_validate({
        "cell": {"id": cell_id, "name": cell_id.title(), "timezone": "Europe/Berlin", "residents": residents,
                 "connections": connections},
        "fuel": {"calorific_value_kwh_m3": 10.0, "correction_factor": 1.0},
        "gateways": [{"id": "gw-test", "poll_interval": 60, "devices": [
            dev("pv", "eastron_sdm630", {"energy_export": "electricity.generation"}),
            dev("chp", "kwenergy_smartblock", {"energy_export": "electricity.generation",
                                               "heat_energy": "heat.generation"}),
            dev("gas", "isma_sfar_1m_4di", {"volume": "fuel.input"}),
            dev("grid", "eastron_sdm630", {"energy_import": "electricity.grid_import",
                                           "energy_export": "electricity.grid_export"}),
            dev("pump", "grundfos_cim500", {"energy_import": "electricity.consumption"}),
            dev("heat-feed", "sontex_supercal5", {"heat_energy": "heat.feed"}),
            dev("heat-a", "sontex_supercal5", {"heat_energy": "heat.delivery"}),
            dev("heat-b", "sontex_supercal5", {"heat_energy": "heat.delivery"}),
            dev("well", "siemens_mag6000", {"volume": "water.abstraction"}),
            dev("net", "siemens_mag6000", {"volume": "water.supply"}),
            dev("homes", "siemens_mag6000", {"volume": "water.consumption"}),
        ]}],
    })


def sunny(h: int) -> bool:
    return 9 <= h < 15


#: (device, point) → (reading at 23:00 the day before, rate per hour as a function of the local hour)
METERS: dict[tuple[str, str], tuple[float, Callable[[int], float]]] = {
    ("pv", "energy_export"): (61_230.0, lambda h: 10.0 if sunny(h) else 0.0),
    ("chp", "energy_export"): (182_340.0, lambda h: 20.0),
    ("chp", "heat_energy"): (351_200.0, lambda h: 40.0),
    ("gas", "volume"): (48_210.0, lambda h: 7.5),
    ("grid", "energy_import"): (90_210.0, lambda h: 0.0 if sunny(h) else 5.0),
    ("grid", "energy_export"): (40_110.0, lambda h: 4.0 if sunny(h) else 0.0),
    ("pump", "energy_import"): (30_120.0, lambda h: 3.0),
    ("heat-feed", "heat_energy"): (349_800.0, lambda h: 38.0),
    ("heat-a", "heat_energy"): (128_400.0, lambda h: 20.0),
    ("heat-b", "heat_energy"): (80_210.0, lambda h: 14.0),
    ("well", "volume"): (512_300.0, lambda h: 10.0),
    ("net", "volume"): (498_700.0, lambda h: 9.6),
    ("homes", "volume"): (246_100.0, lambda h: 8.4),
}


def counted(rate: Callable[[int], float], h: float) -> float:
    """What a meter counted from 23:00 the day before (h = −1) to h hours after local midnight."""
    k = math.floor(h)
    return sum(rate(j % 24) for j in range(-1, k)) + rate(k % 24) * (h - k)


Reading = tuple[str, str, int, float]  # device, point, ts, value


def day_readings(value: Callable[[str, str, float], float] | None = None) -> list[Reading]:
    """Every meter every 5 minutes from 23:00 the day before to 01:00 the day after."""
    out: list[Reading] = []
    for (device, point), (initial, rate) in METERS.items():
        for minute in range(-60, 25 * 60 + 1, 5):
            h = minute / 60
            v = value(device, point, h) if value else None
            out.append((device, point, DAY + minute * 60_000, initial + counted(rate, h) if v is None else v))
    return out


class Backend:
    """The engine on the in-memory fakes, or on a real InfluxDB fed through the collector's write path."""

    def __init__(self, kind: str, cells: list[CellConfig], influx_url: str | None = None,
                 database: str = "kwwk") -> None:
        self.kind = kind
        self.cells = {c.cell.id: c for c in cells}
        if kind == "memory":
            self.source: MemoryReadingSource | InfluxReadingSource = MemoryReadingSource()
            self.store: MemoryBalanceStore | InfluxBalanceStore = MemoryBalanceStore()
        else:
            assert influx_url is not None
            settings = InfluxSettings(url=influx_url, database=database)
            self.writer = V1Writer(settings)
            self.db = InfluxQL(settings)
            self.source = InfluxReadingSource(self.db)
            self.store = InfluxBalanceStore(self.db, self.writer)

    def write(self, readings: list[Reading], cell: str = "testdorf") -> None:
        cfg = self.cells[cell]
        if isinstance(self.source, MemoryReadingSource):
            for device, point, ts, value in readings:
                self.source.add(cell, device, point, ts, value)
            return
        fields: dict[tuple[str, int], dict[str, float]] = {}
        for device, point, ts, value in readings:
            fields.setdefault((device, ts), {})[point] = value
        gw = {d.id: g.id for g, d in cfg.devices()}
        rows: list[Row] = [(cfg.profiles[device].device_class,
                            (("cell", cell), ("gateway", gw[device]), ("device", device)), ts, f)
                           for (device, ts), f in fields.items()]
        self.writer.write(encode(rows))

    def engine(self, **kw: object) -> BalanceEngine:
        return BalanceEngine(self.cells, self.source, self.store, **kw)  # type: ignore[arg-type]

    async def row(self, period: str, loop: str, start: int, cell: str = "testdorf",
                  measurement: str = MEASUREMENT, **tags: str) -> dict[str, float]:
        rows = await self.store.read(measurement, cell, period, start, start + 1)
        found = [r[3] for r in rows if dict(r[1]).get("loop") == loop
                 and all(dict(r[1]).get(k) == v for k, v in tags.items())]
        assert len(found) == 1, f"{len(found)} rows for {period} {loop} {tags} at {start}"
        return found[0]

    async def dump(self, cell: str = "testdorf") -> list[Row]:
        return [r for m in (MEASUREMENT, METER_MEASUREMENT) for p in ("15m", "1h", "1d", "1mo")
                for r in await self.store.read(m, cell, p, 0, 2**52)]

    async def close(self) -> None:
        if self.kind == "influx":
            self.writer.close()
            await self.db.close()


@pytest.fixture(params=["memory", pytest.param("influx", marks=pytest.mark.integration)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    url = request.getfixturevalue("influxdb").url if request.param == "influx" else None
    b = Backend(request.param, [make_testdorf()], url)
    yield b
    await b.close()


def approx_wh(x: float) -> object:
    return pytest.approx(x, abs=WH)


async def test_normal_day(backend: Backend) -> None:
    backend.write(day_readings())
    report = await backend.engine().recompute("testdorf", DAY, DAY + 24 * H)
    assert report.intervals == 96 and report.flags["missing"] == 0

    el = await backend.row("1d", "electricity", DAY)
    # generation: PV 6 h × 10 = 60 + CHP 24 h × 20 = 480 → 540 kWh; import 18 h × 5 = 90; export 6 h × 4 = 24;
    # pump 24 h × 3 = 72; load 90 + 540 − 24 = 606; residual (unmetered) 606 − 72 = 534
    assert el["generation"] == approx_wh(540.0) and el["grid_import"] == approx_wh(90.0)
    assert el["grid_export"] == approx_wh(24.0) and el["consumption"] == approx_wh(72.0)
    assert el["load"] == approx_wh(606.0) and el["residual"] == approx_wh(534.0)
    assert el["self_sufficiency_pct"] == pytest.approx(85.148515)  # (1 − 90/606) × 100
    assert el["self_consumption_pct"] == pytest.approx(95.555556)  # (1 − 24/540) × 100
    assert (el["n_meters"], el["n_intervals"], el["n_missing"], el["n_interpolated"]) == (5.0, 96.0, 0.0, 0.0)

    heat = await backend.row("1d", "heat", DAY)
    # 24 h × 40 = 960 generated, × 38 = 912 fed, × (20 + 14) = 816 delivered: loss 96 = 10.526 %, residual 48
    assert (heat["generation"], heat["feed"], heat["delivery"]) == (approx_wh(960), approx_wh(912), approx_wh(816))
    assert heat["network_loss"] == approx_wh(96.0) and heat["residual"] == approx_wh(48.0)
    assert heat["network_loss_pct"] == pytest.approx(10.526316)

    water = await backend.row("1d", "water", DAY)
    # 24 h × 10 = 240 abstracted, × 9.6 = 230.4 supplied, × 8.4 = 201.6 consumed: non-revenue 28.8 m³,
    # treatment 9.6 m³; pumps 72 kWh / 230.4 m³ = 0.3125 kWh/m³
    assert water["abstraction"] == pytest.approx(240.0, abs=LITRE)
    assert water["supply"] == pytest.approx(230.4, abs=LITRE)
    assert water["consumption"] == pytest.approx(201.6, abs=LITRE)
    assert water["non_revenue"] == pytest.approx(28.8, abs=LITRE)
    assert water["residual"] == pytest.approx(9.6, abs=LITRE)
    assert water["pumping_energy"] == approx_wh(72.0) and water["pumping_kwh_per_m3"] == pytest.approx(0.3125)

    fuel = await backend.row("1d", "fuel", DAY)
    chp = await backend.row("1d", "chp", DAY)
    # 24 h × 7.5 m³ = 180 m³ × 10 kWh/m³ × 1.0 = 1800 kWh; η_el 480/1800, η_th 960/1800, total 80 %, P/H 0.5
    assert fuel["input_m3"] == pytest.approx(180.0, abs=LITRE) and fuel["input"] == approx_wh(1800.0)
    assert (chp["electricity"], chp["heat"], chp["fuel"]) == (approx_wh(480), approx_wh(960), approx_wh(1800))
    assert chp["eta_el_pct"] == pytest.approx(26.666667) and chp["eta_th_pct"] == pytest.approx(53.333333)
    assert chp["eta_total_pct"] == pytest.approx(80.0) and chp["power_to_heat"] == pytest.approx(0.5)

    hour = await backend.row("1h", "electricity", DAY + 9 * H)
    # 09-10 h: generation 10 + 20 = 30, export 4, no import, pump 3 → load 26; 100 % self-sufficient,
    # self-consumption (1 − 4/30) = 86.667 %
    assert hour["load"] == approx_wh(26.0) and hour["self_sufficiency_pct"] == 100.0
    assert hour["self_consumption_pct"] == pytest.approx(86.666667) and hour["n_intervals"] == 4.0
    quarter = await backend.row("15m", "electricity", DAY + 9 * H)
    assert quarter["generation"] == approx_wh(7.5) and quarter["grid_export"] == approx_wh(1.0)

    month = await backend.row("1mo", "heat", parse_time("2026-11-01", TZ))
    # November has 30 × 96 = 2880 intervals; one day balanced: 2784 intervals × 4 heat meters (CHP, feed,
    # two deliveries) = 11136 meter-intervals missing
    assert month["delivery"] == approx_wh(816.0) and (month["n_intervals"], month["n_missing"]) == (2880.0, 11136.0)
    meter = await backend.row("1d", "heat", DAY, measurement=METER_MEASUREMENT, device="heat-a")
    assert meter["value"] == approx_wh(480.0) and meter["n_intervals"] == 96.0


async def test_counter_reset_and_rollover(backend: Backend) -> None:
    reset_h = 5 + 2.5 / 60  # the grid meter's import register restarts from 0 at 05:02:30
    gas_start = GAS_MODULUS - 50.0  # 50 m³ before the pulse counter wraps: at 23:00 + 50/7.5 h = 05:40

    def value(device: str, point: str, h: float) -> float | None:
        if (device, point) == ("grid", "energy_import") and h >= reset_h:
            rate = METERS[(device, point)][1]
            return counted(rate, h) - counted(rate, reset_h)  # counted from zero since the reset
        if device == "gas":
            return (gas_start + 7.5 * (h + 1)) % GAS_MODULUS
        return None

    backend.write(day_readings(value))
    await backend.engine().recompute("testdorf", DAY, DAY + 24 * H)
    el = await backend.row("1d", "electricity", DAY)
    # the reading at 05:05 shows 5 kWh/h × 2.5 min = 0.208333 kWh counted since the reset; the 0.208333 kWh
    # counted between 05:00 and the reset are lost with the register: 90 − 0.208333 = 89.791667 kWh
    assert el["grid_import"] == approx_wh(89.791667) and el["n_reset"] == 1.0
    q = await backend.row("15m", "electricity", DAY + 5 * H, measurement=METER_MEASUREMENT, device="grid",
                          point="energy_import")
    assert q["value"] == approx_wh(1.25 - 0.208333) and q["n_reset"] == 1.0  # 05:00-05:15
    fuel = await backend.row("1d", "fuel", DAY)
    # the gas counter wraps at 05:40 (42949672.96 m³ → 0): still 24 h × 7.5 = 180 m³ = 1800 kWh
    assert fuel["input_m3"] == pytest.approx(180.0, abs=LITRE) and fuel["input"] == approx_wh(1800.0)
    assert fuel["n_rollover"] == 1.0
    wrap = await backend.row("15m", "fuel", DAY + 5 * H + H // 2)  # 05:30-05:45
    assert wrap["input_m3"] == pytest.approx(1.875, abs=LITRE) and wrap["n_rollover"] == 1.0


async def test_meter_replacement(backend: Backend) -> None:
    swap_h = 12 + 7 / 60  # heat-a replaced at 12:07; the new meter starts at 0.5 kWh
    old_final = 128_400.0 + 20.0 * (swap_h + 1)  # 128400 + 20 × 13.116667 = 128662.333333

    def value(device: str, point: str, h: float) -> float | None:
        return 0.5 + 20.0 * (h - swap_h) if device == "heat-a" and h >= swap_h else None

    backend.write(day_readings(value))
    change = MeterChange("heat-a", "heat_energy", datetime(2026, 11, 2, 12, 7, tzinfo=TZ), old_final, 0.5)
    await backend.engine(meter_changes={"testdorf": [change]}).recompute("testdorf", DAY, DAY + 24 * H)
    meter = await backend.row("1d", "heat", DAY, measurement=METER_MEASUREMENT, device="heat-a")
    # old meter 00:00 → 12:07 = 242.333333 kWh, new meter 12:07 → 24:00 = 237.666667 kWh: 480 kWh
    assert meter["value"] == approx_wh(480.0) and meter["n_meter_change"] == 1.0
    q = await backend.row("15m", "heat", DAY + 12 * H, measurement=METER_MEASUREMENT, device="heat-a")
    assert q["value"] == approx_wh(5.0)  # 12:00-12:15: 7 min old + 8 min new at 20 kWh/h
    heat = await backend.row("1d", "heat", DAY)
    assert heat["delivery"] == approx_wh(816.0) and heat["network_loss"] == approx_wh(96.0)


def gap(reading: Reading) -> bool:
    """The gateway was offline from 08:00 to 10:00: no readings strictly between."""
    return DAY + 8 * H < reading[2] < DAY + 10 * H


async def test_gap_is_interpolated_and_flagged(backend: Backend) -> None:
    backend.write([r for r in day_readings() if not gap(r)])
    await backend.engine().recompute("testdorf", DAY, DAY + 24 * H)
    # across 08:00 → 10:00 each counter's rise is spread evenly over the 8 intervals:
    # PV 0 + 10 = 10 kWh → 1.25 per interval (truly 0 before 09:00, 2.5 after); CHP 40 → 5.0 (exact);
    # import 5 + 0 = 5 → 0.625; export 0 + 4 = 4 → 0.5
    q = await backend.row("15m", "electricity", DAY + 8 * H)
    assert q["generation"] == approx_wh(6.25) and q["grid_import"] == approx_wh(0.625)
    assert q["grid_export"] == approx_wh(0.5) and q["n_interpolated"] == 5.0
    before = await backend.row("15m", "electricity", DAY + 7 * H + 3 * H // 4)  # 07:45: boundary at a reading
    assert before["n_interpolated"] == 0.0
    el = await backend.row("1d", "electricity", DAY)
    # counters lose nothing: the day is exact; 8 intervals × 5 meters are flagged
    assert el["generation"] == approx_wh(540.0) and el["grid_import"] == approx_wh(90.0)
    assert el["n_interpolated"] == 40.0 and el["n_missing"] == 0.0


async def test_late_data_recomputes_the_intervals_it_touches(backend: Backend, request: pytest.FixtureRequest) -> None:
    readings = day_readings()
    live = [r for r in readings if not gap(r)]
    late = [r for r in readings if gap(r)]
    engine = backend.engine()
    dirty = DirtyRanges()
    backend.write(live)
    dirty.note("testdorf", min(r[2] for r in live), max(r[2] for r in live))  # what the collector would call
    (first,) = await run_pending(engine, dirty)
    assert (await backend.row("15m", "electricity", DAY + 8 * H))["n_interpolated"] == 5.0

    backend.write(late)  # the gateway's outbox replays 08:05 .. 09:55
    dirty.note("testdorf", min(r[2] for r in late), max(r[2] for r in late))
    (report,) = await run_pending(engine, dirty)
    # the replay changes the intervals between the readings around it (08:00 and 10:00), one interval of
    # context on each side: 07:45 .. 10:15
    assert (report.start_ms, report.end_ms) == (DAY + 7 * H + 3 * H // 4, DAY + 10 * H + H // 4)
    q = await backend.row("15m", "electricity", DAY + 8 * H)
    # 08:00-08:15 as it was: CHP 5.0, no PV; import 1.25, no export
    assert q["generation"] == approx_wh(5.0) and q["grid_import"] == approx_wh(1.25)
    assert q["grid_export"] == approx_wh(0.0) and q["n_interpolated"] == 0.0
    el = await backend.row("1d", "electricity", DAY)
    assert el["n_interpolated"] == 0.0 and el["generation"] == approx_wh(540.0)

    # and the result is exactly what balancing the complete day from scratch gives
    if backend.kind == "memory":
        fresh = Backend("memory", list(backend.cells.values()))
    else:
        influx = request.getfixturevalue("influxdb")
        influx.query('CREATE DATABASE "fresh"', method="POST")
        fresh = Backend("influx", list(backend.cells.values()), influx.url, database="fresh")
    try:
        fresh.write(readings)
        await fresh.engine().recompute("testdorf", first.start_ms, first.end_ms)
        assert await backend.dump() == await fresh.dump()
    finally:
        await fresh.close()


async def test_unknown_cell_and_empty_range_are_refused() -> None:
    from collector.balance.engine import UnknownCell
    from collector.balance.timegrid import TimeRangeError

    engine = Backend("memory", [make_testdorf()]).engine()
    with pytest.raises(UnknownCell, match="unknown cell 'nowhere'; known cells: testdorf"):
        await engine.recompute("nowhere", DAY, DAY + H)
    with pytest.raises(TimeRangeError, match="empty range"):
        await engine.recompute("testdorf", DAY + H, DAY)
