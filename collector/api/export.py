"""CSV exports for operators: a cell's balance rows of one loop, and one device's raw readings.

Both are paged by time: at most `limit` rows per answer; when more follow, the answer says where the
next page starts (header `X-Next-Cursor`, and a `Link: <…>; rel="next"` with the full URL).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, Request, Response

from collector.api.timerange import parse_range
from collector.balance.rows import MEASUREMENT
from collector.query import InfluxQL, ident, literal
from collector.registry import Registry
from collector.api.errors import known_cell

__all__ = ["MAX_LIMIT", "MAX_RANGE_DAYS", "make_export_router"]

MAX_LIMIT = 10_000
MAX_RANGE_DAYS = 400
_CSV = {200: {"content": {"text/csv": {}}, "description": "CSV, one header row; see X-Next-Cursor for more"}}
From = Annotated[str, Query(alias="from", description="date (local midnight), ISO time or epoch ms")]
To = Annotated[str, Query(alias="to", description="exclusive; same forms as from")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="rows per page")]
Cursor = Annotated[int | None, Query(ge=0, le=4_102_444_800_000,
                                     description="start of the next page (epoch ms), from X-Next-Cursor")]


def _span(start: str, end: str, cursor: int | None, tz: ZoneInfo) -> tuple[int, int]:
    a, b = parse_range(start, end, tz, MAX_RANGE_DAYS)
    if cursor is not None:
        if not a <= cursor < b:
            raise HTTPException(400, f"cursor {cursor} is outside the range [{a}, {b})")
        a = cursor
    return a, b


def _csv(request: Request, header: list[str], rows: list[list[object]], more_at: int | None,
         filename: str) -> Response:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"}
    if more_at is not None:
        headers["X-Next-Cursor"] = str(more_at)
        headers["Link"] = f'<{request.url.include_query_params(cursor=more_at)}>; rel="next"'
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


def make_export_router(registry: Registry, db: InfluxQL) -> APIRouter:
    router = APIRouter(tags=["export"])

    def tz_of(cell: str) -> ZoneInfo:
        return ZoneInfo(known_cell(registry, cell).cell.timezone)

    @router.get("/api/cells/{cell}/export/balance.csv", response_class=Response, responses=_CSV)
    async def balance_csv(request: Request, cell: str, start: From, end: To,
                          loop: Literal["electricity", "heat", "water", "fuel", "chp"] = "electricity",
                          period: Literal["15m", "1h", "1d", "1mo"] = "15m", limit: Limit = 1000,
                          cursor: Cursor = None) -> Response:
        """One loop's balance rows: start (local and epoch ms), quantities, metrics and quality counts."""
        tz = tz_of(cell)
        a, b = _span(start, end, cursor, tz)
        (series,) = await db.query(
            f"SELECT * FROM {ident(MEASUREMENT)} WHERE {ident('cell')} = {literal(cell)} AND {ident('loop')} = "
            f"{literal(loop)} AND {ident('period')} = {literal(period)} AND time >= {a}ms AND time < {b}ms "
            f"GROUP BY * ORDER BY time ASC LIMIT {limit + 1}")
        values = [v for s in series for v in s.values]
        columns = series[0].columns[1:] if series else []
        keep = [i for i, _c in enumerate(columns, 1) if any(v[i] is not None for v in values)]
        more_at = int(values[limit][0]) if len(values) > limit else None
        rows = [[datetime.fromtimestamp(v[0] / 1000, UTC).astimezone(tz).isoformat(), int(v[0]),
                 *(v[i] for i in keep)] for v in values[:limit]]
        return _csv(request, ["start", "start_ms", *(columns[i - 1] for i in keep)], rows, more_at,
                    f"{cell}-{loop}-{period}.csv")

    @router.get("/api/cells/{cell}/export/readings.csv", response_class=Response, responses=_CSV)
    async def readings_csv(request: Request, cell: str, start: From, end: To,
                           device: Annotated[str, Query(description="device id in the cell")],
                           limit: Limit = 1000, cursor: Cursor = None) -> Response:
        """One device's raw readings as stored: time (UTC and epoch ms) and one column per point."""
        tz = tz_of(cell)
        info = registry.device(cell, device)
        if info is None:
            known = ", ".join(sorted(d.device for d in registry.cell_devices(cell)))
            raise HTTPException(404, f"unknown device {device!r} in cell {cell!r}; devices: {known}")
        a, b = _span(start, end, cursor, tz)
        points = sorted(info.points)
        values: list[list[object]] = []
        if points:
            (series,) = await db.query(
                f"SELECT {', '.join(ident(p) for p in points)} FROM {ident(info.measurement)} "
                f"WHERE {ident('cell')} = {literal(cell)} AND {ident('device')} = {literal(device)} "
                f"AND time >= {a}ms AND time < {b}ms ORDER BY time ASC LIMIT {limit + 1}")
            values = [v for s in series for v in s.values]
        more_at = int(values[limit][0]) if len(values) > limit else None  # type: ignore[call-overload]
        rows = [[datetime.fromtimestamp(int(v[0]) / 1000, UTC).isoformat(timespec="milliseconds"),  # type: ignore[call-overload]
                 v[0], *v[1:]] for v in values[:limit]]
        return _csv(request, ["time", "time_ms", *points], rows, more_at, f"{cell}-{device}.csv")

    return router
