"""Where the engine reads meter readings: the collector's InfluxDB schema (one measurement per device
class, tags cell/gateway/device, one float field per point), through InfluxQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from collector.balance.spec import SeriesSpec
from collector.query import InfluxQL, ident, literal

__all__ = ["InfluxReadingSource", "Neighbours", "ReadingSource", "Readings"]

Key = tuple[str, str]  # device, point
Readings = dict[Key, list[tuple[int, float]]]
Neighbours = dict[Key, tuple[tuple[int, float] | None, tuple[int, float] | None]]


class ReadingSource(Protocol):
    async def neighbours(self, cell: str, series: Sequence[SeriesSpec], start_ms: int, end_ms: int) -> Neighbours:
        """Per series, the last reading before start and the first at or after end (None when there is none
        within the source's look-around)."""
        ...

    async def readings(self, cell: str, series: Sequence[SeriesSpec], start_ms: int, end_ms: int) -> Readings:
        """Per series, the readings with start ≤ ts < end, sorted, plus its neighbours outside the range."""
        ...


def _group(series: Sequence[SeriesSpec]) -> dict[str, dict[str, list[str]]]:
    """measurement → field → devices"""
    out: dict[str, dict[str, list[str]]] = {}
    for s in series:
        out.setdefault(s.measurement, {}).setdefault(s.point, []).append(s.device)
    return out


class InfluxReadingSource:
    def __init__(self, db: InfluxQL, lookaround_ms: int = 35 * 86_400_000) -> None:
        self.db = db
        self.lookaround_ms = lookaround_ms

    @staticmethod
    def _devices(devices: list[str]) -> str:
        return "(" + " OR ".join(f"{ident('device')} = {literal(d)}" for d in sorted(set(devices))) + ")"

    async def neighbours(self, cell: str, series: Sequence[SeriesSpec], start_ms: int, end_ms: int) -> Neighbours:
        statements: list[tuple[str, str, str]] = []  # (field, which, statement)
        where = f"{ident('cell')} = {literal(cell)}"
        for meas, fields in _group(series).items():
            for field, devices in fields.items():
                dev = self._devices(devices)
                statements.append((field, "before",
                                   f"SELECT last({ident(field)}) FROM {ident(meas)} WHERE {where} AND {dev} "
                                   f"AND time < {start_ms}ms AND time >= {start_ms - self.lookaround_ms}ms "
                                   f"GROUP BY {ident('device')}"))
                statements.append((field, "after",
                                   f"SELECT first({ident(field)}) FROM {ident(meas)} WHERE {where} AND {dev} "
                                   f"AND time >= {end_ms}ms AND time < {end_ms + self.lookaround_ms}ms "
                                   f"GROUP BY {ident('device')}"))
        out: Neighbours = {s.key: (None, None) for s in series}
        results = await self.db.query(*[st for _, _, st in statements]) if statements else []
        for (field, which, _), result in zip(statements, results, strict=True):
            for s in result:
                key = (s.tags.get("device", ""), field)
                if key not in out or not s.values or s.values[0][1] is None:
                    continue
                point = (int(s.values[0][0]), float(s.values[0][1]))
                before, after = out[key]
                out[key] = (point, after) if which == "before" else (before, point)
        return out

    async def readings(self, cell: str, series: Sequence[SeriesSpec], start_ms: int, end_ms: int) -> Readings:
        groups = _group(series)
        statements: list[tuple[str, list[str], str]] = []
        for meas, fields in groups.items():
            names = sorted(fields)
            devices = [d for f in names for d in fields[f]]
            statements.append((meas, names,
                               f"SELECT {', '.join(ident(f) for f in names)} FROM {ident(meas)} "
                               f"WHERE {ident('cell')} = {literal(cell)} AND {self._devices(devices)} "
                               f"AND time >= {start_ms}ms AND time < {end_ms}ms GROUP BY {ident('device')}"))
        wanted = {s.key for s in series}
        out: Readings = {k: [] for k in wanted}
        results = await self.db.query(*[st for _, _, st in statements]) if statements else []
        for (_meas, _names, _), result in zip(statements, results, strict=True):
            for s in result:
                device = s.tags.get("device", "")
                for col_index, col in enumerate(s.columns):
                    key = (device, col)
                    if col == "time" or key not in wanted:
                        continue
                    lst = out[key]
                    for row in s.values:
                        v = row[col_index]
                        if v is not None:
                            lst.append((int(row[0]), float(v)))
        nb = await self.neighbours(cell, series, start_ms, end_ms)
        for key, (before, after) in nb.items():
            lst = sorted(out[key])
            out[key] = ([before] if before else []) + lst + ([after] if after else [])
        return out
