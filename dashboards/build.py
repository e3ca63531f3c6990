"""Build every dashboard from the cell registry and write them as JSON, one file per dashboard, under
`dashboards/json/<folder>/<uid>.json` (the folders Grafana's provisioning reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from dashboards.alliance import alliance_dashboard
from dashboards.balance import balance_dashboard
from dashboards.board import DEFAULT_DATASOURCE_UID, Built
from dashboards.devices import device_dashboard
from dashboards.fleet import fleet_dashboard
from dashboards.folders import FOLDERS, JSON_DIR, load_dir
from dashboards.influxql import register
from edge.cell import CellConfig

__all__ = ["JSON_DIR", "WriteReport", "build_all", "dashboard_json", "load_dir", "parse_dashboard", "write_all"]


def build_all(cells: dict[str, CellConfig], datasource_uid: str = DEFAULT_DATASOURCE_UID) -> list[Built]:
    """Every dashboard of the alliance: per cell its balance and its devices, plus the fleet and the alliance."""
    built: list[Built] = []
    for cell_id in sorted(cells):
        built.append(balance_dashboard(cells[cell_id], datasource_uid))
        built.append(device_dashboard(cells[cell_id], datasource_uid))
    built.append(fleet_dashboard(cells, datasource_uid))
    built.append(alliance_dashboard(cells, datasource_uid))
    uids = [b.uid for b in built]
    if len(set(uids)) != len(uids):
        raise ValueError(f"two dashboards share a uid: {sorted(u for u in uids if uids.count(u) > 1)}")
    return built


def dashboard_json(model: Dashboard) -> str:
    """The file text: sorted keys, two-space indent, a final newline (stable diffs)."""
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(model) + "\n"


def parse_dashboard(data: dict[str, Any]) -> Dashboard:
    """A dashboard JSON read back into the SDK's model (InfluxDB targets as InfluxQLQuery)."""
    register_default_plugins()
    register()
    return Dashboard.from_json(data)


@dataclass
class WriteReport:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)


def write_all(built: list[Built], out: Path = JSON_DIR, check: bool = False) -> WriteReport:
    """Write the dashboards under `out`; remove dashboard files no longer built. With check, change nothing
    and only report what writing would do."""
    report = WriteReport()
    wanted: dict[Path, str] = {out / b.path: dashboard_json(b.model) for b in built}
    for path, text in sorted(wanted.items()):
        rel = str(path.relative_to(out))
        if path.exists() and path.read_text(encoding="utf-8") == text:
            report.unchanged.append(rel)
            continue
        report.written.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for folder in FOLDERS:
        for path in sorted((out / folder).glob("*.json")):
            if path not in wanted:
                report.removed.append(str(path.relative_to(out)))
                if not check:
                    path.unlink()
    return report
