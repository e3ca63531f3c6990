"""Dashboards as code: the InfluxQL query type, the generated JSON (round trip through the SDK's models,
up to date with the builders), Grafana's macro rendering, provisioning, and the cell registry driving it
all (a device added to a cell file appears with no other change)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dashboards.build import build_all, dashboard_json, parse_dashboard
from dashboards.cli import app
from dashboards.folders import FOLDERS, JSON_DIR, load_dir
from dashboards.influxql import InfluxQL, InfluxQLQuery
from dashboards.render import (
    calculate_interval,
    format_interval,
    interpolate,
    parse_time,
    rendered_queries,
    variable_values,
)
from edge.cell import load_cells
from tests.conftest import CELLS, ROOT

PROVISIONING = ROOT / "dashboards" / "provisioning"
COMPOSE = ROOT / "docker-compose.yml"


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels") or []
    return out


def _files() -> dict[str, dict[str, Any]]:
    return {d["uid"]: d for _, d in load_dir(JSON_DIR)}


# -- the query type ------------------------------------------------------------------------------------
def test_influxql_query_type_serialises_like_grafana_and_reads_back() -> None:
    q = InfluxQL('SELECT mean("power") FROM "pump" WHERE $timeFilter GROUP BY time($__interval)').ref_id("B") \
        .alias("$col").as_table().build()
    data = q.to_json()
    assert data == {"refId": "B", "query": 'SELECT mean("power") FROM "pump" WHERE $timeFilter GROUP BY time($__interval)',
                    "rawQuery": True, "resultFormat": "table", "alias": "$col"}
    assert InfluxQLQuery.from_json(data).to_json() == data
    # a target from Grafana's visual editor keeps its parts
    edited = {"refId": "A", "datasource": {"type": "influxdb", "uid": "kwwk-influxdb"}, "policy": "default",
              "measurement": "pump", "resultFormat": "time_series", "orderByTime": "ASC",
              "select": [[{"type": "field", "params": ["power"]}, {"type": "mean", "params": []}]],
              "groupBy": [{"type": "time", "params": ["$__interval"]}, {"type": "fill", "params": ["null"]}],
              "tags": [{"key": "device::tag", "operator": "=", "value": "well-pump"}]}
    again = InfluxQLQuery.from_json(edited).to_json()
    assert again == edited


def test_generated_json_round_trips_through_the_sdk_models() -> None:
    files = _files()
    assert len(files) == 2 * len(load_cells(CELLS)) + 2
    for uid, board in files.items():
        model = parse_dashboard(board)
        targets = [t for p in model.panels or [] for t in (getattr(p, "targets", None) or [])]
        targets += [t for p in model.panels or [] for q in (getattr(p, "panels", None) or [])
                    for t in (q.targets or [])]
        assert targets and all(isinstance(t, InfluxQLQuery) for t in targets), uid
        assert json.loads(dashboard_json(model)) == board, f"{uid} changes on a round trip through the SDK"


def test_committed_json_is_what_the_builders_make(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["build", "--check", "--cells", str(CELLS)])
    assert result.exit_code == 0, result.output + "\nrun `kwwk dashboards build` and commit dashboards/json"
    assert "6 unchanged, 0 removed" in result.output
    stale = JSON_DIR / "KWWK Operations" / "kwwk-devices-oldcell.json"
    out = tmp_path / "json"
    shutil.copytree(JSON_DIR, out)
    (out / "KWWK Operations" / "kwwk-devices-oldcell.json").write_text("{}")
    result = CliRunner().invoke(app, ["build", "--check", "--cells", str(CELLS), "--dir", str(out)])
    assert result.exit_code == 1 and "would remove" in result.output and not stale.exists()
    result = CliRunner().invoke(app, ["build", "--cells", str(CELLS), "--dir", str(out)])
    assert result.exit_code == 0 and not (out / "KWWK Operations" / "kwwk-devices-oldcell.json").exists()


# -- the registry drives the dashboards ------------------------------------------------------------------
NEW_DEVICES = {
    "musterdorf": """      - id: pv2
        name: PV Schuldach 20 kWp
        profile: sunspec_inverter_103
        connection: {host: 127.0.0.1, port: 15029}
        roles: {energy_export: electricity.generation}
""",
    # lindenau meters no consumption yet: its first consumer water meter brings non-revenue water
    "lindenau": """      - id: water-village
        name: Ortsnetz gesamt
        profile: siemens_mag6000
        connection: {host: 127.0.0.1, port: 15046, unit_id: 3}
        roles: {volume: water.consumption}
""",
}


def _build(cells_dir: Path, out: Path) -> str:
    result = CliRunner().invoke(app, ["build", "--cells", str(cells_dir), "--dir", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_device_added_to_a_cell_config_appears_in_the_dashboards(tmp_path: Path) -> None:
    cells_dir = tmp_path / "cells"
    shutil.copytree(CELLS, cells_dir)
    out = tmp_path / "json"
    _build(cells_dir, out)
    before = {p.relative_to(out): p.read_text() for p in out.rglob("*.json")}
    for cell, text in NEW_DEVICES.items():
        path = cells_dir / f"{cell}.yaml"
        path.write_text(path.read_text().rstrip("\n") + "\n" + text)
    output = _build(cells_dir, out)
    after = {p.relative_to(out): p.read_text() for p in out.rglob("*.json")}
    changed = {str(k) for k in after if after[k] != before.get(k)}

    devices = json.loads(after[Path("KWWK Operations/kwwk-devices-musterdorf.json")])
    rows = [p["title"] for p in devices["panels"] if p["type"] == "row"]
    assert any(r.startswith("PV Schuldach 20 kWp (pv2): ") for r in rows), rows
    queries = [t["query"] for p in _panels(devices) for t in p.get("targets", [])]
    pv2 = [q for q in queries if "\"device\" = 'pv2'" in q]
    assert len(pv2) >= 5 and all(q.startswith("SELECT") and 'FROM "pv_inverter"' in q for q in pv2)
    assert any('mean("power")' in q for q in pv2) and any('last("energy_export")' in q for q in pv2)

    lindenau = json.loads(after[Path("KWWK Balance/kwwk-balance-lindenau.json")])
    assert "Non-revenue water" in [p["title"] for p in _panels(lindenau)]
    water = next(p for p in _panels(lindenau) if p["title"] == "Water per interval")
    assert 'sum("consumption") AS "consumption"' in water["targets"][0]["query"]
    # nothing else had to change by hand; the builders changed exactly these dashboards
    assert changed == {"KWWK Operations/kwwk-devices-musterdorf.json", "KWWK Operations/kwwk-devices-lindenau.json",
                       "KWWK Balance/kwwk-balance-lindenau.json", "KWWK Balance/kwwk-alliance.json"}, output


def test_a_cell_added_to_the_registry_gets_its_dashboards_and_joins_the_fleet(tmp_path: Path) -> None:
    cells_dir = tmp_path / "cells"
    shutil.copytree(CELLS, cells_dir)
    text = (CELLS / "lindenau.yaml").read_text().replace("id: lindenau", "id: tannhof").replace(
        "name: Lindenau", "name: Tannhof").replace("gw-lindenau-1", "gw-tannhof-1")
    (cells_dir / "tannhof.yaml").write_text(text)
    built = {b.uid: b for b in build_all(load_cells(cells_dir))}
    assert {"kwwk-balance-tannhof", "kwwk-devices-tannhof"} <= set(built)
    fleet = json.loads(dashboard_json(built["kwwk-fleet"].model))
    cell_var = fleet["templating"]["list"][0]
    assert cell_var["query"] == "lindenau,musterdorf,tannhof"
    online = next(p for p in _panels(fleet) if p["title"] == "Gateways online")
    assert {"cell": "tannhof", "gateway": "gw-tannhof-1"} in built["kwwk-fleet"].expects[(online["id"], "A")].series


# -- what operators see -------------------------------------------------------------------------------------
def test_public_cell_dashboards_take_no_variables_and_show_no_single_customer() -> None:
    files = _files()
    cells = load_cells(CELLS)
    consumers = [d.id for cfg in cells.values() for _, d in cfg.devices() if d.consumer]
    assert consumers
    for cell in cells:
        board = files[f"kwwk-balance-{cell}"]
        assert not (board.get("templating") or {}).get("list"), "public dashboards cannot have template variables"
        assert "public" in board["tags"] and f"cell:{cell}" in board["tags"]
        text = json.dumps(board)
        assert not any(re.search(rf"\b{re.escape(c)}\b", text) for c in consumers)
        assert "kwwk_balance_meter" not in text  # per-meter rows hold customers' meters
        assert "public" not in files[f"kwwk-devices-{cell}"]["tags"]
    for uid in ("kwwk-fleet", "kwwk-alliance"):
        assert [v["name"] for v in files[uid]["templating"]["list"]] == ["cell"]
    heat_school = [p for p in _panels(files["kwwk-devices-musterdorf"]) if "(heat-school)" in p["title"]]
    assert heat_school and heat_school[0]["title"].endswith("customer meter")


def test_units_and_thresholds_an_operator_expects() -> None:
    files = _files()
    bal = {p["title"]: p for p in _panels(files["kwwk-balance-musterdorf"])}
    unit = {t: p.get("fieldConfig", {}).get("defaults", {}).get("unit") for t, p in bal.items()}
    assert unit["Electricity per interval"] == "kwatth" and unit["Heat per interval"] == "kwatth"
    assert unit["Water per interval"] == "m3" and unit["Gas volume per interval"] == "m3"
    assert unit["Self-sufficiency"] == unit["Heat network loss"] == unit["Electricity: daily ratios"] == "percent"
    assert unit["Pumping energy per m³"] == "suffix: kWh/m³"

    def steps(panel: dict[str, Any]) -> list[tuple[float | None, str]]:
        return [(s["value"], s["color"]) for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert steps(bal["Heat residual"]) == [(None, "red"), (-10.0, "orange"), (-5.0, "green"), (5.0, "orange"),
                                           (10.0, "red")]
    assert steps(bal["Water closure residual, hourly"])[-1] == (10.0, "red")
    assert steps(bal["Electricity residual"]) == [(None, "red"), (-5.0, "green")]  # unmetered households
    fleet = {p["title"]: p for p in _panels(files["kwwk-fleet"])}
    online = fleet["Gateways online"]
    assert steps(online) == [(None, "red"), (1, "green")]
    assert online["fieldConfig"]["defaults"]["mappings"][0]["options"]["0"] == {"text": "offline", "color": "red",
                                                                              "index": 0}
    assert steps(fleet["Sequence numbers missing"])[-1] == (1, "red")
    dev = {p["title"]: p for p in _panels(files["kwwk-devices-musterdorf"])}
    assert dev["heat-feed: Temperatures"]["fieldConfig"]["defaults"]["unit"] == "celsius"
    assert dev["heat-feed: Flow"]["fieldConfig"]["defaults"]["unit"] == "suffix: m³/h"
    assert dev["grid: Power"]["fieldConfig"]["defaults"]["unit"] == "watt"
    overrides = {o["matcher"]["options"]: o["properties"][0]["value"]
                 for o in dev["heat-feed: meter readings"]["fieldConfig"]["overrides"]}
    assert overrides == {"heat_energy": "kwatth", "volume": "m3"}


# -- Grafana's rendering of a target -------------------------------------------------------------------------
def test_interval_as_grafana_computes_it() -> None:
    day, week = 86_400_000, 604_800_000
    assert calculate_interval(day, 800, "10s") == 120_000  # 108 s rounds to 2 min
    assert calculate_interval(week, 800, "10s") == 900_000  # 756 s rounds to 15 min
    assert calculate_interval(3_600_000, 800, "10s") == 10_000  # 4.5 s → 5 s, raised to the 10 s minimum
    assert calculate_interval(3_600_000, 800, None) == 5_000
    assert calculate_interval(day, 800, "15m") == 900_000  # a panel's min interval
    assert [format_interval(ms) for ms in (500, 10_000, 120_000, 900_000, 3_600_000, 86_400_000, week)] == \
        ["500ms", "10s", "2m", "15m", "1h", "1d", "7d"]
    assert parse_time("now-7d", 10 * week) == 9 * week


def test_variables_and_macros_substituted_as_grafana_does() -> None:
    board = _files()["kwwk-fleet"]
    values = variable_values(board)
    assert values["cell"].render() == "(lindenau|musterdorf)"  # All: every option, as a regex group
    assert variable_values(board, {"cell": ["musterdorf"]})["cell"].render() == "musterdorf"
    text = interpolate('SELECT count("seq") * 60000 / $__interval_ms FROM "b" WHERE "cell" =~ /^$cell$/ AND '
                       '$timeFilter GROUP BY time($__interval), "gateway" ${cell}',
                       from_ms=1000, to_ms=2000, interval=120_000, variables=values)
    assert text == ('SELECT count("seq") * 60000 / 120000 FROM "b" WHERE "cell" =~ /^(lindenau|musterdorf)$/ AND '
                    'time >= 1000ms and time <= 2000ms GROUP BY time(2m), "gateway" (lindenau|musterdorf)')
    queries = rendered_queries(board, 100 * 86_400_000, datasource_min_interval="10s")
    assert queries and all("$" not in q.query.replace("$/", "") for q in queries), [q.query for q in queries]
    assert {q.interval_ms for q in queries} == {120_000}


# -- provisioning --------------------------------------------------------------------------------------------
def _compose_grafana() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]


def _host_path(container_path: str) -> Path:
    """Where a path inside the Grafana container comes from on the host, through the compose volumes."""
    best: tuple[str, str] | None = None
    for vol in _compose_grafana()["volumes"]:
        src, dst = vol.split(":")[:2]
        inside = container_path == dst or container_path.startswith(dst + "/")
        if src.startswith(".") and inside and (best is None or len(dst) > len(best[1])):
            best = (src, dst)
    assert best is not None, f"{container_path} is not mounted into the grafana service"
    return (ROOT / best[0] / container_path[len(best[1]):].lstrip("/")).resolve()


def test_provisioning_parses_and_refers_only_to_files_that_exist() -> None:
    assert _host_path("/etc/grafana/provisioning") == PROVISIONING.resolve()
    sources = yaml.safe_load((PROVISIONING / "datasources" / "influxdb.yaml").read_text())
    assert sources["apiVersion"] == 1
    by_uid = {d["uid"]: d for d in sources["datasources"]}
    assert set(by_uid) == {"kwwk-influxdb", "kwwk-influxdb-v1"}
    for d in by_uid.values():
        assert d["type"] == "influxdb" and d["jsonData"]["version"] == "InfluxQL" and d["jsonData"]["dbName"] == "kwwk"
    v2 = by_uid["kwwk-influxdb"]
    assert v2["jsonData"]["httpHeaderName1"] == "Authorization"
    assert v2["secureJsonData"]["httpHeaderValue1"] == "Token ${KWWK_INFLUX_TOKEN}"
    # Grafana expands $VAR / ${VAR} from its environment (os.ExpandEnv), and knows no ${VAR:-default}
    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    raw = " ".join(s for p in PROVISIONING.rglob("*.yaml") for s in strings(yaml.safe_load(p.read_text())))
    names = set(re.findall(r"\$\{?([A-Za-z_]\w*)", raw))
    assert not re.search(r"\$\{[^}]*:-", raw)
    env = _compose_grafana()["environment"]
    assert names <= set(env), f"not passed to the grafana service: {names - set(env)}"

    providers = yaml.safe_load((PROVISIONING / "dashboards" / "kwwk.yaml").read_text())
    assert providers["apiVersion"] == 1
    (p,) = providers["providers"]
    assert p["type"] == "file" and not p["allowUiUpdates"] and p["options"]["foldersFromFilesStructure"]
    assert "folder" not in p and "folderUid" not in p  # Grafana: leave them unset with foldersFromFilesStructure
    root = _host_path(p["options"]["path"])
    assert root == JSON_DIR.resolve()
    # each subdirectory becomes a folder of its name; every dashboard file sits in one of ours
    assert {d.name for d in root.iterdir() if d.is_dir()} == set(FOLDERS)
    assert {f.relative_to(root).parts[0] for f in root.rglob("*.json")} == set(FOLDERS)
    assert len(list(root.rglob("*.json"))) == len(_files())
    used = {t["datasource"]["uid"] for b in _files().values() for p in _panels(b) for t in p.get("targets", [])}
    assert used == {"kwwk-influxdb"} and used <= set(by_uid)


def test_cli_build_fails_on_a_broken_cell_config(tmp_path: Path) -> None:
    cells_dir = tmp_path / "cells"
    shutil.copytree(CELLS, cells_dir)
    path = cells_dir / "lindenau.yaml"
    path.write_text(path.read_text().replace("profile: siemens_mag6000", "profile: siemens_mag9999", 1))
    result = CliRunner().invoke(app, ["build", "--cells", str(cells_dir), "--dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "lindenau.yaml" in result.output and "siemens_mag9999" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uid", ["kwwk-balance-musterdorf", "kwwk-fleet"])
def test_every_target_has_an_expectation(uid: str) -> None:
    built = next(b for b in build_all(load_cells(CELLS)) if b.uid == uid)
    board = json.loads(dashboard_json(built.model))
    keys = {(p["id"], t["refId"]) for p in _panels(board) for t in p.get("targets", [])}
    assert keys == set(built.expects)
    ids = [p["id"] for p in _panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
