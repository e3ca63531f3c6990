"""What every generated dashboard shares: the datasource, panel ids and layout, the InfluxQL targets and,
beside each target, what it must return on real data (checked by tests/test_dashboards_queries.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grafana_foundation_sdk.builders.dashboard import Dashboard, DashboardLink, Row, TimePicker
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.folders import BALANCE, FOLDERS, OPERATIONS
from dashboards.influxql import DATASOURCE_TYPE, InfluxQL

__all__ = ["BALANCE", "FOLDERS", "OPERATIONS", "Board", "Built", "Expect", "Target", "cell_variable", "ident",
           "literal", "regex_var"]

DEFAULT_DATASOURCE_UID = "kwwk-influxdb"


def ident(name: str) -> str:
    """A quoted InfluxQL identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal(value: str) -> str:
    """A quoted InfluxQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def regex_var(tag: str, var: str) -> str:
    """`"tag" =~ /^$var$/`: Grafana turns a multi-value variable into `(a|b)`."""
    return f"{ident(tag)} =~ /^${var}$/"


@dataclass
class Expect:
    """What a target must return on the simulator's data (not written to the dashboard JSON).

    series: tag sets each of which must come back (the series the panel shows); columns: value columns each
    of those series carries, with at least one non-null value; kpi: (loop, fn) — for the balance
    engine's row for a period (any of its `kwwk_balance` rows), the value must equal `fn(row)` when the query
    runs over exactly that period; cell: the one cell a target without a cell tag is about (a narrowed
    `cell` variable that leaves it out must make it return nothing)."""

    series: list[dict[str, str]] = field(default_factory=lambda: [{}])
    columns: list[str] = field(default_factory=list)
    kpi: tuple[str, Callable[[dict[str, Any]], float]] | None = None
    cell: str | None = None


@dataclass
class Target:
    query: str
    expect: Expect
    alias: str | None = None
    table: bool = False


@dataclass
class Built:
    folder: str
    uid: str
    title: str
    model: dm.Dashboard
    #: (panel id, refId) → what the target must return
    expects: dict[tuple[int, str], Expect]

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.uid}.json"


class Board:
    """A dashboard under construction: panels get ids in order, targets get the datasource and refIds."""

    def __init__(self, uid: str, title: str, folder: str, *, tags: list[str], description: str,
                 time_from: str = "now-24h", refresh: str = "1m", datasource_uid: str = DEFAULT_DATASOURCE_UID) -> None:
        if folder not in FOLDERS:
            raise ValueError(f"unknown folder {folder!r}")
        self.uid, self.title, self.folder = uid, title, folder
        self.ds = dm.DataSourceRef(type_val=DATASOURCE_TYPE, uid=datasource_uid)
        self.expects: dict[tuple[int, str], Expect] = {}
        self._next_id = 1
        self._row: Row | None = None
        self.db = (Dashboard(title).uid(uid).description(description).tags(["kwwk", *tags])
                   .time(time_from, "now").refresh(refresh).timezone("browser").editable()
                   .tooltip(dm.DashboardCursorSync.CROSSHAIR)
                   .timepicker(TimePicker().refresh_intervals(["30s", "1m", "5m", "15m", "1h"]))
                   .link(DashboardLink("KWWK").type(dm.DashboardLinkType.DASHBOARDS).tags(["kwwk"])
                         .as_dropdown(True).include_vars(False).keep_time(True)))

    def variable(self, variable: cogbuilder.Builder[dm.VariableModel]) -> Board:
        self.db.with_variable(variable)
        return self

    def row(self, title: str, collapsed: bool = False) -> Board:
        """Start a row. An expanded row's panels follow it at the top level (Grafana ignores `panels` of an
        expanded row); a collapsed row carries its panels inside."""
        self._flush_row()
        row = Row(title).id(self._take_id())
        if collapsed:
            self._row = row.collapsed(True)
        else:
            self.db.with_row(row)
        return self

    def _flush_row(self) -> None:
        if self._row is not None:
            self.db.with_row(self._row)
            self._row = None

    def _take_id(self) -> int:
        n = self._next_id
        self._next_id += 1
        return n

    def panel(self, panel: Any, *targets: Target, width: int = 12, height: int = 8) -> Board:
        """Add a panel (an SDK panel builder) with its InfluxQL targets, refIds A, B, …"""
        pid = self._take_id()
        panel.id(pid).datasource(self.ds).span(width).height(height)
        for i, t in enumerate(targets):
            ref = chr(ord("A") + i)
            q = InfluxQL(t.query).ref_id(ref).datasource(self.ds)
            if t.alias:
                q.alias(t.alias)
            if t.table:
                q.as_table()
            panel.with_target(q)
            self.expects[(pid, ref)] = t.expect
        if self._row is not None:
            self._row.with_panel(panel)
        else:
            self.db.with_panel(panel)
        return self

    def build(self) -> Built:
        self._flush_row()
        return Built(self.folder, self.uid, self.title, self.db.build(), self.expects)


def cell_variable(cells: list[str]) -> Any:
    """A custom variable listing the configured cells (multi-value, All selected): the registry is the truth,
    so a cell appears before it has sent anything, and the dashboard needs no datasource to list cells."""
    from grafana_foundation_sdk.builders.dashboard import CustomVariable

    return (CustomVariable("cell").label("Cell").values(",".join(cells)).multi(True).include_all(True)
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
            .options([dm.VariableOption(selected=True, text="All", value="$__all"),
                      *[dm.VariableOption(selected=False, text=c, value=c) for c in cells]]))
