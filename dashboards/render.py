"""Turn a panel's InfluxQL target into the statement Grafana 11 sends to InfluxDB, so every query of every
dashboard can be run against a real database (tests/test_dashboards_queries.py).

What Grafana does, step by step:
- the time range: `now-24h` … `now` in epoch ms; a panel's relative time (`timeFrom`) replaces it;
- the interval (rangeutil.calculateInterval): range / max data points, rounded by roundInterval, raised to
  the panel's min interval (`interval`) or else the datasource's (`jsonData.timeInterval`);
- template variables (frontend, influxdb datasource interpolateQueryExpr): a multi-value or include-all
  variable becomes a regex-escaped value, several values `(a|b)`; "All" without a custom all value means
  every option; `$__interval` and `$__interval_ms` are scoped variables;
- the backend (pkg/tsdb/influxdb/models/query.go Build): `$timeFilter` → `time >= <from>ms and time <= <to>ms`,
  `$interval`/`$__interval` → gtime.FormatInterval, `$__interval_ms` → milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["RenderedQuery", "calculate_interval", "format_interval", "interpolate", "parse_time",
           "rendered_queries", "round_interval", "variable_values"]

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
             "M": 2_592_000_000, "y": 31_536_000_000}
_ROUND = [  # (below, result) in ms: Grafana's roundInterval
    (10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
    (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
    (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
    (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000), (32400000, 21600000),
    (86400000, 43200000), (604800000, 86400000), (1814400000, 604800000), (3628800000, 2592000000),
]
DEFAULT_MAX_DATA_POINTS = 800  # Grafana uses the panel's width in pixels


def interval_ms(text: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|[smhdwMy])", text.strip())
    if not m:
        raise ValueError(f"not an interval: {text!r}")
    return int(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_time(expr: str, now_ms: int) -> int:
    """`now`, `now-6h`, `now-7d` (Grafana's relative times without rounding)."""
    expr = expr.strip()
    if expr == "now":
        return now_ms
    m = re.fullmatch(r"now-(\d+(?:ms|[smhdwMy]))", expr)
    if not m:
        raise ValueError(f"unsupported time {expr!r}")
    return now_ms - interval_ms(m.group(1))


def round_interval(ms: float) -> int:
    for below, result in _ROUND:
        if ms < below:
            return result
    return 31_536_000_000


def format_interval(ms: int) -> str:
    """gtime.FormatInterval: the largest whole unit."""
    for unit, size in (("y", 31_536_000_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{max(1, ms)}ms"


def calculate_interval(range_ms: int, max_data_points: int, min_interval: str | None) -> int:
    ms = round_interval(range_ms / max_data_points)
    low = interval_ms(min_interval) if min_interval else 1
    return max(ms, low)


def _escape_regex(value: str) -> str:
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\1", value)


@dataclass(frozen=True)
class Variable:
    name: str
    values: list[str]
    multi_or_all: bool

    def render(self) -> str:
        if not self.multi_or_all:
            return self.values[0] if self.values else ""
        escaped = [_escape_regex(v) for v in self.values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def variable_values(dashboard: dict[str, Any], overrides: dict[str, list[str]] | None = None) -> dict[str, Variable]:
    """The dashboard's template variables at their current values (or `overrides`), as Grafana resolves them."""
    out: dict[str, Variable] = {}
    for v in (dashboard.get("templating") or {}).get("list", []):
        name = v["name"]
        options = [o["value"] for o in v.get("options", []) if o.get("value") != "$__all"]
        if overrides and name in overrides:
            values = overrides[name]
        else:
            current = (v.get("current") or {}).get("value", [])
            values = current if isinstance(current, list) else [current]
        if "$__all" in values:
            values = [v["allValue"]] if v.get("allValue") else options
        out[name] = Variable(name, list(values), bool(v.get("multi") or v.get("includeAll")))
    return out


_VAR = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?::([^}]+))?\}")


def interpolate(query: str, *, from_ms: int, to_ms: int, interval: int, variables: dict[str, Variable]) -> str:
    scoped = {"__interval": format_interval(interval), "__interval_ms": str(interval)}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name in scoped:
            return scoped[name]
        if name in variables:
            return variables[name].render()
        return m.group(0)  # $timeFilter and unknown names are left for the backend

    text = _VAR.sub(repl, query)
    text = text.replace("$timeFilter", f"time >= {from_ms}ms and time <= {to_ms}ms")
    text = text.replace("$interval", format_interval(interval))
    text = text.replace("$__interval_ms", str(interval))
    return text.replace("$__interval", format_interval(interval))


@dataclass(frozen=True)
class RenderedQuery:
    dashboard: str
    panel_id: int
    panel: str
    ref_id: str
    raw: str
    query: str
    result_format: str
    from_ms: int
    to_ms: int
    interval_ms: int

    @property
    def where(self) -> str:
        return f"dashboard {self.dashboard!r}, panel {self.panel!r} (id {self.panel_id}), query {self.ref_id}"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        if p.get("type") == "row":
            yield from _panels(p.get("panels") or [])
        else:
            yield p


def rendered_queries(dashboard: dict[str, Any], now_ms: int, *, datasource_min_interval: str | None = None,
                     variables: dict[str, list[str]] | None = None, time_range: tuple[int, int] | None = None,
                     max_data_points: int = DEFAULT_MAX_DATA_POINTS) -> list[RenderedQuery]:
    """Every InfluxQL target of the dashboard as Grafana would send it at `now_ms` with the dashboard's default
    time range (or `time_range`), its variables' current values (or `variables`)."""
    vars_ = variable_values(dashboard, variables)
    if time_range is None:
        t = dashboard.get("time") or {"from": "now-6h", "to": "now"}
        time_range = (parse_time(t["from"], now_ms), parse_time(t["to"], now_ms))
    out: list[RenderedQuery] = []
    for p in _panels(dashboard.get("panels") or []):
        start, end = time_range
        if p.get("timeFrom"):
            start, end = now_ms - interval_ms(p["timeFrom"]), now_ms
        ival = calculate_interval(end - start, int(p.get("maxDataPoints") or max_data_points),
                                  p.get("interval") or datasource_min_interval)
        for t in p.get("targets") or []:
            if t.get("hide") or (t.get("datasource") or p.get("datasource") or {}).get("type") != "influxdb":
                continue
            out.append(RenderedQuery(dashboard.get("title", ""), p.get("id", 0), p.get("title", ""), t["refId"],
                                     t.get("query", ""),
                                     interpolate(t.get("query", ""), from_ms=start, to_ms=end, interval=ival,
                                                 variables=vars_),
                                     t.get("resultFormat", "time_series"), start, end, ival))
    return out
