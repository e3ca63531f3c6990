"""Balance endpoints: a cell's loops per 15 minutes, hour, day or month, and the alliance's cells side by
side over a time range. Read from the rows the balance engine stored (docs/balance.md); aggregates only,
so no single customer's meter is ever shown.

    app.include_router(make_router(registry, db))
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from collector.balance.alliance import CellTotals, alliance_totals, cell_totals
from collector.balance.metrics import DERIVED
from collector.balance.rows import MEASUREMENT, row_tags
from collector.balance.spec import LOOP_UNITS, BalanceConfigError, CellSpec, build_cell_spec
from collector.balance.store import InfluxBalanceStore
from collector.balance.timegrid import INTERVAL_MS, TimeRangeError, ceil_interval, floor_interval, parse_time
from collector.query import InfluxQL
from collector.registry import Registry
from collector.api.errors import known_cell

__all__ = ["AllianceBalance", "BalanceInterval", "CellBalance", "CellTotalsOut", "LoopBalance", "make_router"]

MAX_ROWS = 3000  # intervals per response
UNITS = {**LOOP_UNITS, "chp": "kWh"}
PeriodParam = Literal["15m", "1h", "1d", "1mo"]
_PERIOD_MS = {"15m": INTERVAL_MS, "1h": 3_600_000, "1d": 86_400_000, "1mo": 28 * 86_400_000}


class LoopBalance(BaseModel):
    unit: str = Field(description="unit of the quantities (kWh, or m³ for water); metrics carry theirs in the name")
    quantities: dict[str, float] = Field(description="per role, plus pumping_energy (kWh), input_m3, chp inputs")
    metrics: dict[str, float] = Field(description="derived from the quantities: *_pct in %, pumping_kwh_per_m3, ...")
    quality: dict[str, float] = Field(description="n_meters, n_intervals, n_missing and n_<flag>: meter-intervals")
    complete: bool = Field(description="every meter had a value in every 15-minute interval")


class BalanceInterval(BaseModel):
    start_ms: int
    start: datetime = Field(description="the interval's start in the cell's local time")
    loops: dict[str, LoopBalance]


class CellBalance(BaseModel):
    cell: str
    name: str
    timezone: str
    period: PeriodParam
    from_ms: int
    to_ms: int
    intervals: list[BalanceInterval]


class CellTotalsOut(BaseModel):
    cell: str
    name: str
    residents: int | None
    connections: int | None
    loops: dict[str, LoopBalance]
    per_resident: dict[str, dict[str, float]] = Field(description="quantities per resident (when known)")
    per_connection: dict[str, dict[str, float]] = Field(description="quantities per service connection (when known)")
    computed_over: dict[str, dict[str, list[str]]] = Field(
        default_factory=dict, description="alliance only: loop → field → the cells that meter it")


class AllianceBalance(BaseModel):
    from_ms: int
    to_ms: int
    days: float
    cells: list[CellTotalsOut]
    alliance: CellTotalsOut


def _loop(loop: str, fields: dict[str, float]) -> LoopBalance:
    quality = {k: v for k, v in fields.items() if k.startswith("n_")}
    return LoopBalance(unit=UNITS.get(loop, ""),
                       quantities={k: v for k, v in fields.items() if not k.startswith("n_") and k not in DERIVED},
                       metrics={k: v for k, v in fields.items() if k in DERIVED},
                       quality=quality, complete=quality.get("n_missing", 0.0) == 0.0)


def _totals_out(t: CellTotals) -> CellTotalsOut:
    return CellTotalsOut(cell=t.cell, name=t.name, residents=t.residents, connections=t.connections,
                         loops={k: _loop(k, v) for k, v in t.loops.items()}, per_resident=t.per_resident,
                         per_connection=t.per_connection, computed_over=t.cells_by_field)


def make_router(registry: Registry, db: InfluxQL) -> APIRouter:
    """The balance endpoints over the balance rows in the database `db` reads from."""
    router = APIRouter(tags=["balance"])
    store = InfluxBalanceStore(db)
    specs: dict[str, CellSpec] = {}

    def spec_of(cell: str) -> CellSpec:
        known_cell(registry, cell)
        if cell not in specs:
            try:
                specs[cell] = build_cell_spec(registry.cells[cell])
            except BalanceConfigError as err:
                raise HTTPException(500, f"the cell config cannot be balanced: {err}") from None
        return specs[cell]

    def span(start: str, end: str, tz: ZoneInfo) -> tuple[int, int]:
        try:
            a, b = parse_time(start, tz), parse_time(end, tz)
        except TimeRangeError as err:
            raise HTTPException(400, str(err)) from None
        a, b = floor_interval(a), ceil_interval(b)
        if b <= a:
            raise HTTPException(400, f"empty range: 'to' ({end}) must be after 'from' ({start})")
        return a, b

    @router.get("/api/cells/{cell}/balance")
    async def cell_balance(
        cell: str,
        start: Annotated[str, Query(alias="from", description="date (local midnight), ISO time or epoch ms")],
        end: Annotated[str, Query(alias="to", description="exclusive; same forms as from")],
        period: PeriodParam = "1d",
    ) -> CellBalance:
        """The cell's loops per period: quantities per role, metrics and quality, one entry per period start."""
        spec = spec_of(cell)
        a, b = span(start, end, spec.tz)
        if (b - a) // _PERIOD_MS[period] > MAX_ROWS:
            raise HTTPException(400, f"range too long for period {period!r}: at most {MAX_ROWS} intervals per "
                                     f"request; ask for a longer period or a shorter range")
        rows = await store.read(MEASUREMENT, cell, period, a, b)
        by_start: dict[int, dict[str, LoopBalance]] = {}
        for r in rows:
            loop = row_tags(r).get("loop", "")
            by_start.setdefault(r[2], {})[loop] = _loop(loop, r[3])
        intervals = [BalanceInterval(start_ms=t, start=datetime.fromtimestamp(t / 1000, UTC).astimezone(spec.tz),
                                     loops=loops) for t, loops in sorted(by_start.items())]
        return CellBalance(cell=cell, name=spec.name, timezone=str(spec.tz), period=period, from_ms=a, to_ms=b,
                           intervals=intervals)

    @router.get("/api/alliance/balance")
    async def alliance_balance(
        start: Annotated[str, Query(alias="from", description="date (local midnight), ISO time or epoch ms")],
        end: Annotated[str, Query(alias="to", description="exclusive; same forms as from")],
        cells: Annotated[list[str] | None, Query(description="cells to compare (default: all)")] = None,
    ) -> AllianceBalance:
        """The cells' totals over [from, to) side by side, per resident and per connection, and summed."""
        chosen = [spec_of(c) for c in (cells or sorted(registry.cells))]
        zones = {str(s.tz) for s in chosen}
        tz = chosen[0].tz if len(zones) == 1 else ZoneInfo("UTC")
        a, b = span(start, end, tz)
        totals = [await cell_totals(store, s, a, b) for s in chosen]
        return AllianceBalance(from_ms=a, to_ms=b, days=(b - a) / 86_400_000,
                               cells=[_totals_out(t) for t in totals], alliance=_totals_out(alliance_totals(totals)))

    return router
