"""Where balance rows live: InfluxDB (written as line protocol through the collector's writers, read with
InfluxQL). A row rewritten with the same measurement, tags and start overwrites the one before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from collector.lineprotocol import Row, encode
from collector.query import InfluxQL, ident, literal
from collector.storage import Writer

__all__ = ["BalanceStore", "InfluxBalanceStore"]

_WRITE_CHUNK = 5000


class BalanceStore(Protocol):
    async def write(self, rows: Sequence[Row]) -> None: ...

    async def read(self, measurement: str, cell: str, period: str, start_ms: int, end_ms: int) -> list[Row]:
        """Rows of one cell and period with start ≤ time < end."""
        ...


class InfluxBalanceStore:
    def __init__(self, db: InfluxQL, writer: Writer | None = None) -> None:
        self.db = db
        self.writer = writer

    async def write(self, rows: Sequence[Row]) -> None:
        if self.writer is None:
            msg = "this balance store reads only (no writer)"
            raise RuntimeError(msg)
        for i in range(0, len(rows), _WRITE_CHUNK):
            await asyncio.to_thread(self.writer.write, encode(rows[i:i + _WRITE_CHUNK]))

    async def read(self, measurement: str, cell: str, period: str, start_ms: int, end_ms: int) -> list[Row]:
        (series,) = await self.db.query(
            f"SELECT * FROM {ident(measurement)} WHERE {ident('cell')} = {literal(cell)} "
            f"AND {ident('period')} = {literal(period)} AND time >= {start_ms}ms AND time < {end_ms}ms GROUP BY *")
        rows: list[Row] = []
        for s in series:
            tags = tuple(sorted((k, v) for k, v in s.tags.items() if v != ""))
            for values in s.values:
                fields = {c: float(v) for c, v in zip(s.columns, values, strict=True) if c != "time" and v is not None}
                if fields:
                    rows.append((measurement, tags, int(values[0]), fields))
        rows.sort(key=lambda r: (r[2], r[1]))
        return rows
