"""A simulated day of both demo cells against the simulator's own ground truth, on a real InfluxDB.

The sites run in simulated time (Site.advance every 60 s, no waiting); every reading is encoded into
the device's registers and decoded as the gateway decodes it (so a CHP's u32 kWh counter has 1 kWh
steps), written in the collector's schema with its simulated timestamp, and balanced by
`kwwk balance recompute`. The day's balance must match the truth (Site.truth deltas) within 0.5 %,
and recomputing changes nothing in the database.
"""

from __future__ import annotations

import asyncio
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner

from collector.balance.alliance import alliance_totals, cell_totals
from collector.balance.metrics import DERIVED, EXTENSIVE_DERIVED, derive
from collector.balance.rows import MEASUREMENT
from collector.balance.spec import CellSpec, build_cell_spec
from collector.balance.store import InfluxBalanceStore
from collector.balance.timegrid import parse_time
from collector.lineprotocol import Row, encode
from collector.query import InfluxQL
from collector.storage import InfluxSettings, V1Writer
from edge.cell import CellConfig, load_cell
from edge.profile import Point, Profile
from edge.sim.image import RegisterImage
from edge.sim.site import Site
from kwwk.cli import app
from kwwk.dev.localservers import InfluxDB1
from tests.conftest import CELLS

pytestmark = pytest.mark.integration

TZ = ZoneInfo("Europe/Berlin")
DAY_S = parse_time("2026-11-02", TZ) // 1000
STEP_S = 60


def _gateway_read(profile: Profile, image: RegisterImage, point: Point) -> float:
    """Decode one point from the register image the way the gateway does (scale factor included)."""
    value = profile.decode_points(image.tables, profile.with_scale_factors([point])).values[point.name]
    assert isinstance(value, float)
    return value


def simulate_day(cfg: CellConfig, writer: V1Writer) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Run the site from 23:00 the day before to 01:00 the day after; return the truth at 00:00 and 24:00."""
    site = Site(cfg, DAY_S - 3600)
    images = {d: RegisterImage(cfg.profiles[d]) for d in site.devices}
    gateway = {d.id: g.id for g, d in cfg.devices()}
    roles = [(d.id, cfg.profiles[d.id].by_name[p]) for _, d in cfg.devices() for p in d.roles]
    truth: dict[int, dict[str, dict[str, float]]] = {}
    rows: list[Row] = []
    for t in range(DAY_S - 3600, DAY_S + 25 * 3600 + 1, STEP_S):
        site.advance(t)
        if t in (DAY_S, DAY_S + 86400):
            truth[t] = {d: dict(v) for d, v in site.truth.items()}
        fields: dict[str, dict[str, float]] = {}
        for device, point in roles:
            images[device].update(site.state[device])
            fields.setdefault(device, {})[point.name] = _gateway_read(cfg.profiles[device], images[device], point)
        rows += [(cfg.profiles[d].device_class, (("cell", cfg.cell.id), ("gateway", gateway[d]), ("device", d)),
                  t * 1000, f) for d, f in fields.items()]
        if len(rows) >= 5000:
            writer.write(encode(rows))
            rows = []
    writer.write(encode(rows))
    return truth[DAY_S], truth[DAY_S + 86400]


def truth_loops(spec: CellSpec, t0: dict[str, dict[str, float]], t1: dict[str, dict[str, float]]) -> dict[
        str, dict[str, float]]:
    """The day's loops as the simulator knows them: each role's exact counter deltas, metrics from those."""
    delta = {s.key: (t1[s.device][s.point] - t0[s.device][s.point]) * s.to_loop for s in spec.series}
    loops: dict[str, dict[str, float]] = {}
    for s in spec.series:
        loops.setdefault(s.loop, {}).setdefault(s.role, 0.0)
        loops[s.loop][s.role] += delta[s.key]
    pumps = [s for s in spec.series if s.loop_role == "electricity.consumption" and s.device_class == "pump"]
    if pumps and "water" in loops:
        loops["water"]["pumping_energy"] = sum(delta[s.key] for s in pumps)
    fuel = [s for s in spec.series if s.loop == "fuel"]
    if fuel:
        loops["fuel"]["input_m3"] = sum(delta[s.key] / s.to_loop for s in fuel if s.native_volume)
    if spec.has_chp:
        loops["chp"] = {"electricity": sum(delta[s.key] for s in spec.series if s.chp and s.loop == "electricity"),
                        "heat": sum(delta[s.key] for s in spec.series if s.chp and s.loop == "heat")}
        if fuel:
            loops["chp"]["fuel"] = sum(delta[s.key] for s in fuel)
    for loop, base in loops.items():
        base.update(derive(loop, base))
    return loops


def resolution(spec: CellSpec) -> dict[tuple[str, str], float]:
    """(loop, field) → one register count of every meter behind the field, in the loop's unit."""
    out: dict[tuple[str, str], float] = {}
    for s in spec.series:
        count = s.abs_res * s.to_loop * 2  # a count at each end of the day
        out[(s.loop, s.role)] = out.get((s.loop, s.role), 0.0) + count
        if s.loop_role == "electricity.consumption" and s.device_class == "pump":
            out[("water", "pumping_energy")] = out.get(("water", "pumping_energy"), 0.0) + count
        if s.chp:
            key = ("chp", "electricity" if s.loop == "electricity" else "heat")
            out[key] = out.get(key, 0.0) + count
        if s.loop == "fuel":
            out[("chp", "fuel")] = out.get(("chp", "fuel"), 0.0) + count
            out[("fuel", "input_m3")] = out.get(("fuel", "input_m3"), 0.0) + s.abs_res * 2
    return out


def count_effect(loop: str, base: dict[str, float], name: str, counts: dict[tuple[str, str], float]) -> float:
    """How far one register count on every meter behind a figure can move it. A register of whole kWh is
    off by up to a count at each end of the day whatever the engine does (lindenau's well pump: 35 ± 1 kWh)."""
    if name not in DERIVED:
        return counts.get((loop, name), 0.0)
    want = derive(loop, base)[name]
    return sum(abs(derive(loop, {**base, k: v + counts.get((loop, k), 0.0)})[name] - want) for k, v in base.items())


def dump(influxdb: InfluxDB1) -> object:
    return [influxdb.query(f'SELECT * FROM "{m}" GROUP BY *')["results"]
            for m in ("kwwk_balance", "kwwk_balance_meter")]


def recompute(influxdb: InfluxDB1, start: str, end: str) -> str:
    result = CliRunner().invoke(app, ["balance", "recompute", "--cell", "musterdorf", "--cell", "lindenau",
                                      "--from", start, "--to", end, "--cells", str(CELLS),
                                      "--influx-url", influxdb.url, "--influx-db", influxdb.database])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_simulated_day_matches_ground_truth_and_recomputing_changes_nothing(influxdb: InfluxDB1) -> None:
    settings = InfluxSettings(url=influxdb.url, database=influxdb.database)
    cfgs = {c: load_cell(CELLS / f"{c}.yaml") for c in ("musterdorf", "lindenau")}
    writer = V1Writer(settings)
    truths = {c: simulate_day(cfg, writer) for c, cfg in cfgs.items()}
    writer.close()

    output = recompute(influxdb, "2026-11-02", "2026-11-03")
    assert "musterdorf: 96 of 96 15-minute intervals balanced" in output
    assert "lindenau: 96 of 96 15-minute intervals balanced" in output

    async def balances() -> tuple[dict[str, dict[str, dict[str, float]]], object]:
        db = InfluxQL(settings)
        try:
            store = InfluxBalanceStore(db)
            day = {}
            totals = []
            for c, cfg in cfgs.items():
                rows = await store.read(MEASUREMENT, c, "1d", DAY_S * 1000, DAY_S * 1000 + 1)
                day[c] = {dict(r[1])["loop"]: r[3] for r in rows}
                totals.append(await cell_totals(store, build_cell_spec(cfg), DAY_S * 1000, (DAY_S + 86400) * 1000))
            return day, alliance_totals(totals)
        finally:
            await db.close()

    day, alliance = asyncio.run(balances())
    checked = 0
    expected_alliance: dict[str, dict[str, float]] = {}
    for c, cfg in cfgs.items():
        spec = build_cell_spec(cfg)
        truth = truth_loops(spec, *truths[c])
        counts = resolution(spec)
        assert set(day[c]) == set(truth), c
        for loop, fields in truth.items():
            base = {k: v for k, v in fields.items() if k not in DERIVED}
            scale = max(abs(v) for v in base.values())
            for name, want in fields.items():
                got = day[c][loop][name]
                # 0.5 % (of the loop's largest quantity for residuals and losses, which may be near zero),
                # plus what one register count of each meter behind the figure does to it
                tol = 0.005 * (scale if name in EXTENSIVE_DERIVED else abs(want)) + count_effect(loop, base, name, counts)
                assert abs(got - want) <= tol, f"{c} {loop}.{name}: engine {got}, simulator {want}, ±{tol}"
                checked += 1
            assert day[c][loop]["n_missing"] == 0 and day[c][loop]["n_interpolated"] == 0
            for name, want in base.items():
                expected_alliance.setdefault(loop, {}).setdefault(name, 0.0)
                expected_alliance[loop][name] += want
    assert checked >= 40
    # the alliance adds the cells' quantities; per resident over 860 + 240 residents
    for loop, fields in expected_alliance.items():
        for name, want in fields.items():
            assert alliance.loops[loop][name] == pytest.approx(want, rel=0.005), f"alliance {loop}.{name}"
    assert alliance.per_resident["electricity"]["generation"] == pytest.approx(
        expected_alliance["electricity"]["generation"] / 1100, rel=0.005)

    before = dump(influxdb)
    assert len(str(before)) > 100_000  # the dump holds the balances, not an empty answer
    recompute(influxdb, "2026-11-02", "2026-11-03")
    assert dump(influxdb) == before
    recompute(influxdb, "2026-11-02T06:00", "2026-11-02T13:30")  # a part of the day, rolled up again
    assert dump(influxdb) == before
