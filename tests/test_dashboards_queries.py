"""Every panel query of every generated dashboard, rendered as Grafana renders it, against a real InfluxDB
holding simulator data.

The demo cells run in simulated time for the last 26 hours (Site.advance every 2 minutes, no waiting);
every published point is encoded into its device's registers and decoded as the gateway decodes it, and
written in the collector's schema (one measurement per device class). Each gateway's batches go to
`kwwk_batches` as the collector writes them, plus the two health fields the fleet dashboard proposes
(`outbox_depth`, `read_errors`). The balance comes from `kwwk balance recompute`, the real engine.
Lindenau's gateway goes silent 20 minutes before now; Musterdorf's loses three batches, one of which is
re-sent later. Then each target's query gets Grafana's macros and variables substituted
(dashboards/render.py), runs over POST /query, and must return the series its panel expects.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from typer.testing import CliRunner

from collector.lineprotocol import Row, encode
from collector.storage import InfluxSettings, V1Writer
from dashboards.board import Built
from dashboards.build import build_all, dashboard_json
from dashboards.render import RenderedQuery, rendered_queries
from edge.cell import CellConfig, load_cells
from edge.profile import Point, Profile
from edge.sim.image import RegisterImage
from edge.sim.site import Site
from kwwk.cli import app
from kwwk.dev.localservers import InfluxDB1
from tests.conftest import CELLS, ROOT

pytestmark = pytest.mark.integration

STEP_S = 120
HOURS = 26
SILENT_S = 20 * 60  # lindenau's gateway stops this long before now
LOST_SEQS = (100, 101, 102)  # musterdorf batches the broker lost
RESENT_SEQ = 101  # … of which the collector's audit got this one back
DATASOURCES = ROOT / "dashboards" / "provisioning" / "datasources" / "influxdb.yaml"


def _read(profile: Profile, image: RegisterImage, point: Point) -> float | None:
    """Decode one point from the register image the way the gateway does (scale factors included)."""
    value = profile.decode_points(image.tables, profile.with_scale_factors([point])).values.get(point.name)
    return value if isinstance(value, float) else None


def _simulate(cfg: CellConfig, now: int, writer: V1Writer) -> None:
    start = now - HOURS * 3600
    site = Site(cfg, start)
    images = {d: RegisterImage(cfg.profiles[d]) for d in site.devices}
    points = {d.id: [p for p in cfg.published_points(d) if p.numeric] for _, d in cfg.devices()}
    silent_from = now - SILENT_S if cfg.cell.id == "lindenau" else now + 1
    seq = {g.id: 0 for g in cfg.gateways}
    read_errors = {g.id: 0 for g in cfg.gateways}
    rows: list[Row] = []
    for t in range(start, now + 1, STEP_S):
        site.advance(t)
        if t >= silent_from:
            continue
        for gw in cfg.gateways:
            readings = 0
            for d in gw.devices:
                images[d.id].update(site.state[d.id])
                fields = {p.name: v for p in points[d.id]
                          if (v := _read(cfg.profiles[d.id], images[d.id], p)) is not None}
                readings += len(fields)
                rows.append((cfg.profiles[d.id].device_class,
                             (("cell", cfg.cell.id), ("device", d.id), ("gateway", gw.id)), t * 1000, fields))
            s = seq[gw.id]
            seq[gw.id] += 1
            if t % (50 * STEP_S) == 0 and cfg.cell.id == "musterdorf":
                read_errors[gw.id] += 1  # a device timed out now and then
            if cfg.cell.id == "musterdorf" and s in LOST_SEQS:
                continue
            rows.append(("kwwk_batches", (("cell", cfg.cell.id), ("gateway", gw.id), ("stream", "a1b2")), t * 1000 + 300,
                         {"seq": float(s), "readings": float(readings), "replay": 0.0,
                          "outbox_depth": 800.0 if s == LOST_SEQS[-1] + 1 else 0.0,
                          "read_errors": float(read_errors[gw.id])}))
            if t == now - 30 * 60 and cfg.cell.id == "musterdorf":  # the audit's resend arrives
                rows.append(("kwwk_batches", (("cell", cfg.cell.id), ("gateway", gw.id), ("stream", "a1b2")),
                             t * 1000 + 900, {"seq": float(RESENT_SEQ), "readings": 40.0, "replay": 1.0,
                                              "outbox_depth": 0.0, "read_errors": float(read_errors[gw.id])}))
        if len(rows) >= 5000:
            writer.write(encode(rows))
            rows = []
    writer.write(encode(rows))


def _recompute(influxdb: InfluxDB1, now: int) -> None:
    tz = ZoneInfo("Europe/Berlin")
    first = datetime.fromtimestamp(now - HOURS * 3600, UTC).astimezone(tz).date()
    last = datetime.fromtimestamp(now, UTC).astimezone(tz).date() + timedelta(days=1)
    result = CliRunner().invoke(app, ["balance", "recompute", "--cell", "musterdorf", "--cell", "lindenau",
                                      "--from", first.isoformat(), "--to", last.isoformat(), "--cells", str(CELLS),
                                      "--influx-url", influxdb.url, "--influx-db", influxdb.database])
    assert result.exit_code == 0, result.output


def _min_interval() -> str:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return next(d for d in sources if d["uid"] == "kwwk-influxdb")["jsonData"]["timeInterval"]


def _run(influxdb: InfluxDB1, rq: RenderedQuery) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(series, error) as InfluxDB answers Grafana's POST /query."""
    try:
        body = influxdb.query(rq.query, method="POST")
    except Exception as err:  # noqa: BLE001 - an HTTP 400 for a syntax error, with InfluxDB's message
        detail = err.read().decode() if hasattr(err, "read") else str(err)
        return None, detail
    result = body["results"][0]
    if "error" in result:
        return None, result["error"]
    return result.get("series", []), None


def check_dashboard(influxdb: InfluxDB1, built: Built, now_ms: int, variables: dict[str, list[str]] | None = None,
                    ) -> tuple[list[str], int]:
    """Run every target; return the failures (each naming dashboard and panel) and how many queries ran."""
    board = json.loads(dashboard_json(built.model))
    failures: list[str] = []
    queries = rendered_queries(board, now_ms, datasource_min_interval=_min_interval(), variables=variables)
    seen = set()
    for rq in queries:
        seen.add((rq.panel_id, rq.ref_id))
        expect = built.expects.get((rq.panel_id, rq.ref_id))
        if expect is None:
            failures.append(f"{rq.where}: no expectation recorded for this target")
            continue
        series, error = _run(influxdb, rq)
        if error is not None:
            failures.append(f"{rq.where}: InfluxDB rejected the query: {error}\n    {rq.query}")
            continue
        assert series is not None
        wanted = expect.series
        if variables and "cell" in variables:  # a narrowed variable narrows what comes back
            wanted = [s for s in wanted if s.get("cell", expect.cell or variables["cell"][0]) in variables["cell"]]
            if not wanted and series:
                failures.append(f"{rq.where}: returned {len(series)} series for a cell outside the selection")
            for s in series:
                if "cell" in (s.get("tags") or {}) and s["tags"]["cell"] not in variables["cell"]:
                    failures.append(f"{rq.where}: returned cell {s['tags']['cell']!r} outside the variable's selection")
        cells = {s["cell"] for s in expect.series if "cell" in s}
        for s in series:
            if cells and (s.get("tags") or {}).get("cell", "") not in cells:
                failures.append(f"{rq.where}: shows cell {s['tags'].get('cell')!r}, which does not meter it")
        for want in wanted:
            match = [s for s in series if all((s.get("tags") or {}).get(k) == v for k, v in want.items())]
            if not match:
                failures.append(f"{rq.where}: no series {want or '(any)'} in {len(series)} returned\n    {rq.query}")
                continue
            for col in expect.columns:
                if not any(col in s["columns"] and any(row[s["columns"].index(col)] is not None for row in s["values"])
                           for s in match):
                    failures.append(f"{rq.where}: series {want or '(any)'} has no value in column {col!r}\n"
                                    f"    {rq.query}")
    for key in built.expects:
        if key not in seen:
            failures.append(f"dashboard {built.title!r}: target {key} was never rendered (hidden or lost)")
    return failures, len(queries)


@pytest.fixture(scope="module")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    """conftest's `influxdb`, started once for this module: every test here reads the same loaded day."""
    server = InfluxDB1(tmp_path_factory.mktemp("influxdb"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def loaded(influxdb: InfluxDB1) -> tuple[InfluxDB1, dict[str, CellConfig], int]:
    cells = load_cells(CELLS)
    now = int(time.time()) // STEP_S * STEP_S
    writer = V1Writer(InfluxSettings(url=influxdb.url, database=influxdb.database))
    for cfg in cells.values():
        _simulate(cfg, now, writer)
    writer.close()
    _recompute(influxdb, now)
    return influxdb, cells, int(time.time() * 1000)


def test_every_panel_query_returns_its_series(loaded: tuple[InfluxDB1, dict[str, CellConfig], int]) -> None:
    influxdb, cells, now_ms = loaded
    built = build_all(cells)
    failures: list[str] = []
    total = 0
    for b in built:
        f, n = check_dashboard(influxdb, b, now_ms)
        failures += f
        total += n
        if any(v["name"] == "cell" for v in (json.loads(dashboard_json(b.model)).get("templating") or {}).get("list", [])):
            f, n = check_dashboard(influxdb, b, now_ms, variables={"cell": ["lindenau"]})
            failures += f
            total += n
    assert not failures, f"{len(failures)} of {total} queries failed:\n" + "\n".join(failures)
    assert total > 250


def _value(influxdb: InfluxDB1, query: str) -> float:
    series = influxdb.query(query, method="POST")["results"][0]["series"]
    assert len(series) == 1 and len(series[0]["values"]) == 1, series
    return float(series[0]["values"][0][1])


def test_figures_over_a_range_equal_the_engines_period_rows(loaded: tuple[InfluxDB1, dict[str, CellConfig], int],
                                                             ) -> None:
    """A KPI panel sums 15-minute rows and derives the figure in InfluxQL; over exactly one hour it must
    equal what the balance engine derived for that hour's row (collector/balance/metrics.py)."""
    influxdb, cells, now_ms = loaded
    hour = (now_ms // 3_600_000 - 3) * 3_600_000
    checked = 0
    for b in build_all(cells):
        board = json.loads(dashboard_json(b.model))
        for rq in rendered_queries(board, now_ms, datasource_min_interval=_min_interval(),
                                   time_range=(hour, hour + 3_600_000 - 1)):
            expect = b.expects[(rq.panel_id, rq.ref_id)]
            if expect.kpi is None:
                continue
            loop, engine = expect.kpi
            cell = b.uid.removeprefix("kwwk-balance-")
            rows = influxdb.query(f"SELECT * FROM kwwk_balance WHERE cell = '{cell}' AND loop = '{loop}' "
                                  f"AND period = '1h' AND time = {hour}ms", method="POST")["results"][0]["series"]
            row = dict(zip(rows[0]["columns"], rows[0]["values"][0], strict=True))
            got, want = _value(influxdb, rq.query), engine(row)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9), f"{rq.where}: panel {got}, engine {want}"
            checked += 1
    assert checked >= 15


def _panel_query(built: list[Built], uid: str, title: str, now_ms: int) -> RenderedQuery:
    b = next(x for x in built if x.uid == uid)
    board = json.loads(dashboard_json(b.model))
    return next(q for q in rendered_queries(board, now_ms, datasource_min_interval=_min_interval())
                if q.panel == title)


def test_fleet_panels_show_offline_gateways_gaps_and_replays(loaded: tuple[InfluxDB1, dict[str, CellConfig], int]
                                                              ) -> None:
    influxdb, cells, now_ms = loaded
    built = build_all(cells)

    def by_gateway(title: str) -> dict[str, list[Any]]:
        series, error = _run(influxdb, _panel_query(built, "kwwk-fleet", title, now_ms))
        assert error is None, error
        return {s["tags"]["gateway"]: [row[1] for row in s["values"]] for s in series or []}

    online = by_gateway("Gateways online")
    assert online["gw-musterdorf-1"][-1] >= 2  # a batch every 2 minutes: online (green)
    assert online["gw-lindenau-1"][-1] == 0  # silent for 20 minutes: 0 → "offline" (red)
    assert by_gateway("Sequence numbers missing") == {"gw-musterdorf-1": [2], "gw-lindenau-1": [0]}
    assert sum(by_gateway("Replayed batches")["gw-musterdorf-1"]) == 1
    assert max(v for v in by_gateway("Outbox depth")["gw-musterdorf-1"] if v is not None) == 800
    errors = by_gateway("Read errors")
    assert sum(v for v in errors["gw-musterdorf-1"] if v) >= 5 and not any(errors["gw-lindenau-1"])


def test_a_broken_query_fails_naming_its_dashboard_and_panel(loaded: tuple[InfluxDB1, dict[str, CellConfig], int]
                                                               ) -> None:
    influxdb, cells, now_ms = loaded
    good = next(b for b in build_all(cells) if b.uid == "kwwk-balance-musterdorf")
    broken = copy.deepcopy(good)
    flows = next(p for p in broken.model.panels or [] if getattr(p, "title", "") == "Electricity per interval")
    flows.targets[0].query = flows.targets[0].query.replace('sum("grid_export")', 'sum("grid_exprot")')
    typo = next(p for p in broken.model.panels or [] if getattr(p, "title", "") == "Heat per interval")
    typo.targets[0].query = typo.targets[0].query.replace("GROUP BY", "GROUP")
    failures, _ = check_dashboard(influxdb, broken, now_ms)
    assert len(failures) == 2, failures
    name = "dashboard 'Musterdorf: energy, heat and water balance'"
    assert failures[0].startswith(f"{name}, panel 'Electricity per interval'") and "'grid_export'" in failures[0]
    assert failures[1].startswith(f"{name}, panel 'Heat per interval'") and "InfluxDB rejected" in failures[1]


def test_generated_files_are_what_was_checked() -> None:
    """The queries above ran on freshly built dashboards; the committed files must be the same build."""
    built = build_all(load_cells(CELLS))
    for b in built:
        path = Path(ROOT / "dashboards" / "json" / b.path)
        assert path.read_text(encoding="utf-8") == dashboard_json(b.model), f"{path} is stale: kwwk dashboards build"
