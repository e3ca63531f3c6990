"""The balance engine: recompute a cell's 15-minute balance for a time range from the stored readings,
write it, and roll the touched hours, days and months up again from the stored 15-minute rows.

Idempotent: every row has a fixed timestamp (its interval's start) and fixed tags, and a cell always
writes the same fields, so recomputing a range rewrites identical points.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from collector.balance.counters import FLAGS, IntervalValue, counter_intervals
from collector.balance.rates import rate_intervals
from collector.balance.rows import MEASUREMENT, METER_MEASUREMENT, loop_rows, meter_rows, roll_up
from collector.balance.source import ReadingSource
from collector.balance.spec import CellSpec, build_cell_spec
from collector.balance.store import BalanceStore
from collector.balance.timegrid import (
    INTERVAL_MS, TimeRangeError, ceil_interval, floor_interval, period_end, period_start, period_starts,
)
from edge.cell import CellConfig

__all__ = ["BalanceEngine", "BalanceOptions", "RecomputeReport", "UnknownCell"]


class UnknownCell(LookupError):
    def __init__(self, cell: str, known: Iterable[str]) -> None:
        super().__init__(f"unknown cell {cell!r}; known cells: {', '.join(sorted(known))}")
        self.cell = cell


@dataclass(frozen=True)
class BalanceOptions:
    margin_ms: int = 2 * INTERVAL_MS  # readings read beyond each end of a chunk, for context
    chunk_ms: int = 86_400_000  # raw readings are read and balanced a day at a time
    max_backfill_ms: int = 35 * 86_400_000  # how far late data may reach back (and a gap may be bridged)


@dataclass
class RecomputeReport:
    cell: str
    start_ms: int
    end_ms: int
    intervals: int = 0  # 15-minute intervals with at least one loop row
    rows: int = 0  # rows written, all periods and both measurements
    flags: dict[str, int] = field(default_factory=dict)  # meter-intervals per flag, and "missing"

    def summary(self) -> str:
        flagged = ", ".join(f"{k} {v}" for k, v in self.flags.items() if v) or "none"
        return (f"{self.cell}: {self.intervals} of {(self.end_ms - self.start_ms) // INTERVAL_MS} "
                f"15-minute intervals balanced, {self.rows} rows written; flagged meter-intervals: {flagged}")


class BalanceEngine:
    """Recomputes balances of the cells it knows from a reading source into a balance store."""

    def __init__(self, cells: Mapping[str, CellConfig], source: ReadingSource, store: BalanceStore, *,
                 ratings: Mapping[tuple[str, str, str], float] | None = None,
                 meter_changes: Mapping[str, Iterable[Any]] | None = None,
                 options: BalanceOptions | None = None) -> None:
        """ratings: (cell, device, point) → plausible maximum per hour, overriding profiles and config;
        meter_changes: cell → replacement records, in addition to the cell config's own."""
        self.cells = dict(cells)
        self.source = source
        self.store = store
        self.options = options or BalanceOptions()
        self._ratings = dict(ratings or {})
        self._changes = {k: list(v) for k, v in (meter_changes or {}).items()}
        self._specs: dict[str, CellSpec] = {}

    def spec(self, cell: str) -> CellSpec:
        if cell not in self._specs:
            cfg = self.cells.get(cell)
            if cfg is None:
                raise UnknownCell(cell, self.cells)
            ratings = {(d, p): v for (c, d, p), v in self._ratings.items() if c == cell}
            self._specs[cell] = build_cell_spec(cfg, ratings, self._changes.get(cell))
        return self._specs[cell]

    async def recompute(self, cell: str, start_ms: int, end_ms: int) -> RecomputeReport:
        """Balance [start, end) (widened to whole 15-minute intervals), write it, and roll it up."""
        spec = self.spec(cell)
        start, end = floor_interval(start_ms), ceil_interval(end_ms)
        if end <= start:
            msg = f"empty range: from {start_ms} is not before to {end_ms}"
            raise TimeRangeError(msg)
        report = RecomputeReport(cell, start, end, flags=dict.fromkeys((*FLAGS, "missing"), 0))
        opt = self.options
        for a in range(start, end, opt.chunk_ms):
            b = min(end, a + opt.chunk_ms)
            starts = list(range(a, b, INTERVAL_MS))
            readings = await self.source.readings(cell, spec.series, a - opt.margin_ms, b + opt.margin_ms)
            values: dict[tuple[str, str], list[IntervalValue]] = {}
            for s in spec.series:
                r = readings.get(s.key, [])
                values[s.key] = (counter_intervals(r, s, starts, spec.changes.get(s.key, ())) if s.kind == "counter"
                                 else rate_intervals(r, s, starts))
            rows = []
            for k, st in enumerate(starts):
                interval_rows = loop_rows(spec, st, {key: ivs[k] for key, ivs in values.items()})
                report.intervals += bool(interval_rows)
                rows += interval_rows
            rows += meter_rows(spec, [(s, iv) for s in spec.series for iv in values[s.key]])
            await self.store.write(rows)
            report.rows += len(rows)
            counts: Counter[str] = Counter()
            for ivs in values.values():
                for iv in ivs:
                    counts.update(iv.flags)
                    counts["missing"] += iv.value is None
            for k, v in counts.items():
                report.flags[k] = report.flags.get(k, 0) + v
        report.rows += await self._roll_up(spec, start, end)
        return report

    async def _roll_up(self, spec: CellSpec, start: int, end: int) -> int:
        """Rewrite the hours, days and months that [start, end) touches from the stored shorter rows."""
        tz = spec.tz
        days = period_starts(start, end, "1d", tz)
        months = period_starts(start, end, "1mo", tz)
        first_hour = period_start(start, "1h", tz)
        written = 0
        for measurement in (MEASUREMENT, METER_MEASUREMENT):
            q = await self.store.read(measurement, spec.cell, "15m", days[0], period_end(days[-1], "1d", tz))
            rows = [r for r in roll_up(q, "1h", tz) if first_hour <= r[2] < end] + roll_up(q, "1d", tz)
            await self.store.write(rows)
            written += len(rows)
            d = await self.store.read(measurement, spec.cell, "1d", months[0], period_end(months[-1], "1mo", tz))
            rows = roll_up(d, "1mo", tz)
            await self.store.write(rows)
            written += len(rows)
        return written

    async def recompute_touched(self, cell: str, min_ts: int, max_ts: int) -> RecomputeReport:
        """Recompute what readings stored with timestamps in [min_ts, max_ts] can change: every interval
        between the last reading before them and the first after them (of any of the cell's meters)."""
        spec = self.spec(cell)
        nb = await self.source.neighbours(cell, spec.series, min_ts, max_ts + 1)
        start = min([min_ts, *(b[0] for b, _ in nb.values() if b)])
        end = max([max_ts + 1, *(a[0] for _, a in nb.values() if a)])
        start = max(start, min_ts - self.options.max_backfill_ms)
        end = min(end, max_ts + self.options.max_backfill_ms)
        return await self.recompute(cell, floor_interval(start) - INTERVAL_MS, ceil_interval(end) + INTERVAL_MS)
