"""The engine wired to InfluxDB: readings and balance rows read with InfluxQL, rows written through the
collector's writer (v1 /write or v2)."""

from __future__ import annotations

from collections.abc import Mapping

from collector.balance.engine import BalanceEngine, BalanceOptions
from collector.balance.source import InfluxReadingSource
from collector.balance.store import InfluxBalanceStore
from collector.query import InfluxQL
from collector.storage import InfluxSettings, make_writer
from edge.cell import CellConfig

__all__ = ["InfluxEngine"]


class InfluxEngine:
    """`async with InfluxEngine(cells, settings) as engine: await engine.recompute(...)`"""

    def __init__(self, cells: Mapping[str, CellConfig], settings: InfluxSettings,
                 options: BalanceOptions | None = None) -> None:
        self.db = InfluxQL(settings)
        self.writer = make_writer(settings)
        self.engine = BalanceEngine(cells, InfluxReadingSource(self.db), InfluxBalanceStore(self.db, self.writer),
                                    options=options)

    async def __aenter__(self) -> BalanceEngine:
        return self.engine

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        await self.db.close()
