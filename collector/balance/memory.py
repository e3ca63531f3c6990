"""In-memory reading source and balance store, with InfluxDB's semantics (a point rewritten with the same
series and time merges its fields over the old ones). For pure-logic tests and benchmarks.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from collector.balance.source import Neighbours, Readings
from collector.balance.spec import SeriesSpec
from collector.lineprotocol import Row

__all__ = ["MemoryBalanceStore", "MemoryReadingSource"]


class MemoryReadingSource:
    def __init__(self, lookaround_ms: int = 35 * 86_400_000) -> None:
        self.data: dict[tuple[str, str, str], dict[int, float]] = {}
        self.lookaround_ms = lookaround_ms

    def add(self, cell: str, device: str, point: str, ts: int, value: float) -> None:
        self.data.setdefault((cell, device, point), {})[int(ts)] = float(value)

    def _sorted(self, cell: str, key: tuple[str, str]) -> list[tuple[int, float]]:
        return sorted(self.data.get((cell, *key), {}).items())

    async def neighbours(self, cell: str, series: Sequence[SeriesSpec], start_ms: int, end_ms: int) -> Neighbours:
        out: Neighbours = {}
        for s in series:
            pts = self._sorted(cell, s.key)
            times = [t for t, _ in pts]
            i = bisect_left(times, start_ms)
            before = pts[i - 1] if i > 0 and pts[i - 1][0] >= start_ms - self.lookaround_ms else None
            j = bisect_left(times, end_ms)
            after = pts[j] if j < len(pts) and pts[j][0] < end_ms + self.lookaround_ms else None
            out[s.key] = (before, after)
        return out

    async def readings(self, cell: str, series: Sequence[SeriesSpec], start_ms: int, end_ms: int) -> Readings:
        nb = await self.neighbours(cell, series, start_ms, end_ms)
        out: Readings = {}
        for s in series:
            inside = [(t, v) for t, v in self._sorted(cell, s.key) if start_ms <= t < end_ms]
            before, after = nb[s.key]
            out[s.key] = ([before] if before else []) + inside + ([after] if after else [])
        return out


class MemoryBalanceStore:
    def __init__(self) -> None:
        self.points: dict[tuple[str, tuple[tuple[str, str], ...], int], dict[str, float]] = {}

    async def write(self, rows: Sequence[Row]) -> None:
        for measurement, tags, ts, fields in rows:
            key = (measurement, tuple(sorted(tags)), ts)
            self.points.setdefault(key, {}).update(fields)

    async def read(self, measurement: str, cell: str, period: str, start_ms: int, end_ms: int) -> list[Row]:
        rows: list[Row] = []
        for (m, tags, ts), fields in self.points.items():
            t = dict(tags)
            if m == measurement and t.get("cell") == cell and t.get("period") == period and start_ms <= ts < end_ms:
                rows.append((m, tags, ts, dict(fields)))
        rows.sort(key=lambda r: (r[2], r[1]))
        return rows
