"""Totals of a cell over a time range, and the alliance: several cells side by side and summed, each
quantity also per resident and per connection where the cell config gives those numbers.

An alliance metric is computed over the cells that meter it: a ratio from the summed quantities of
those cells, never as an average of the cells' ratios (docs/balance.md, "The alliance").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from collector.balance.metrics import DERIVED, EXTENSIVE_DERIVED, derive
from collector.balance.rows import MEASUREMENT, row_tags, sum_fields
from collector.balance.spec import CellSpec
from collector.balance.store import BalanceStore
from collector.balance.timegrid import INTERVAL_MS, Period, period_start

__all__ = ["ALLIANCE", "CellTotals", "alliance_totals", "cell_totals", "normalised", "tiling_period"]

ALLIANCE = "alliance"


@dataclass
class CellTotals:
    cell: str
    name: str
    residents: int | None
    connections: int | None
    start_ms: int
    end_ms: int
    #: loop → field → value (quantities, metrics, n_* quality counts)
    loops: dict[str, dict[str, float]]
    #: for the alliance: field → the cells it was computed over, per loop
    cells_by_field: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    per_resident: dict[str, dict[str, float]] = field(default_factory=dict)
    per_connection: dict[str, dict[str, float]] = field(default_factory=dict)


def tiling_period(start_ms: int, end_ms: int, tz: ZoneInfo) -> Period:
    """The longest period whose rows tile [start, end) exactly."""
    for period in ("1mo", "1d", "1h"):
        if period_start(start_ms, period, tz) == start_ms and period_start(end_ms, period, tz) == end_ms:
            return period
    return "15m"


def _extensive(name: str) -> bool:
    return not name.startswith("n_") and (name not in DERIVED or name in EXTENSIVE_DERIVED)


def _loop_members(spec: CellSpec) -> dict[str, int]:
    meters: dict[str, int] = {}
    for s in spec.series:
        meters[s.loop] = meters.get(s.loop, 0) + 1
    if spec.has_chp:
        meters["chp"] = sum(1 for s in spec.series if (s.chp and s.role == "generation") or s.loop == "fuel")
    return meters


async def cell_totals(store: BalanceStore, spec: CellSpec, start_ms: int, end_ms: int) -> CellTotals:
    """A cell's loops summed over [start, end) (whole 15-minute intervals), from the stored balance rows."""
    period = tiling_period(start_ms, end_ms, spec.tz)
    rows = await store.read(MEASUREMENT, spec.cell, period, start_ms, end_ms)
    expected = (end_ms - start_ms) // INTERVAL_MS
    loops: dict[str, dict[str, float]] = {}
    for loop, meters in _loop_members(spec).items():
        members = [{"n_meters": float(meters)}] + [r[3] for r in rows if row_tags(r).get("loop") == loop]
        loops[loop] = sum_fields(members, expected, loop)
    totals = CellTotals(spec.cell, spec.name, spec.residents, spec.connections, start_ms, end_ms, loops)
    totals.per_resident, totals.per_connection = normalised(loops, spec.residents, spec.connections)
    return totals


def normalised(loops: dict[str, dict[str, float]], residents: int | None, connections: int | None,
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Every quantity (not ratios, not counts) divided by residents and by connections, when known."""
    def per(n: int | None) -> dict[str, dict[str, float]]:
        if not n:
            return {}
        return {loop: {k: v / n for k, v in f.items() if _extensive(k)} for loop, f in loops.items()}
    return per(residents), per(connections)


def alliance_totals(cells: Sequence[CellTotals]) -> CellTotals:
    """The cells summed: quantities added over the cells that meter them, metrics derived from those sums,
    per-resident and per-connection figures over the cells that give those numbers and meter the quantity."""
    loops: dict[str, dict[str, float]] = {}
    contributors: dict[str, dict[str, list[str]]] = {}
    per_res: dict[str, dict[str, float]] = {}
    per_conn: dict[str, dict[str, float]] = {}
    for loop in sorted({loop for c in cells for loop in c.loops}):
        members = [c for c in cells if loop in c.loops]
        out: dict[str, float] = {}
        who: dict[str, list[str]] = {}
        names = sorted({k for c in members for k in c.loops[loop]})
        for k in names:
            having = [c for c in members if k in c.loops[loop]]
            who[k] = [c.cell for c in having]
            if k in DERIVED:
                base: dict[str, float] = {}
                for c in having:
                    for bk, bv in c.loops[loop].items():
                        if bk not in DERIVED and not bk.startswith("n_"):
                            base[bk] = base.get(bk, 0.0) + bv
                value = derive(loop, base).get(k)
                if value is not None:
                    out[k] = value
            elif k == "n_intervals":
                out[k] = max(c.loops[loop][k] for c in having)
            else:
                out[k] = sum(c.loops[loop][k] for c in having)
        loops[loop] = out
        contributors[loop] = who
        for k, v in out.items():
            if not _extensive(k):
                continue
            having = [c for c in members if c.cell in who[k]]
            if all(c.residents for c in having):
                per_res.setdefault(loop, {})[k] = v / sum(c.residents or 0 for c in having)
            if all(c.connections for c in having):
                per_conn.setdefault(loop, {})[k] = v / sum(c.connections or 0 for c in having)
    start = min((c.start_ms for c in cells), default=0)
    end = max((c.end_ms for c in cells), default=0)
    residents = sum(c.residents or 0 for c in cells) if all(c.residents for c in cells) else None
    connections = sum(c.connections or 0 for c in cells) if all(c.connections for c in cells) else None
    return CellTotals(ALLIANCE, "Alliance", residents, connections, start, end, loops, contributors, per_res, per_conn)
