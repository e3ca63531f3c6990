"""The public API, no login: the cells shown to residents and each cell's summary for today, the last
30 days and this year. Aggregates only (collector/api/privacy.py); cached, and limited per client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from collector.api.cache import TTLCache
from collector.api.ratelimit import RateLimiter
from collector.api.summary import PublicSummary, build_summary
from collector.balance.spec import BalanceConfigError, CellSpec, build_cell_spec
from collector.balance.store import InfluxBalanceStore
from collector.query import InfluxQL
from collector.registry import Registry

__all__ = ["PublicCell", "make_public_router"]

log = structlog.get_logger("kwwk.api.public")
PUBLIC_LOOPS = ("electricity", "heat", "water")


class PublicCell(BaseModel):
    id: str
    name: str
    timezone: str
    residents: int | None = None
    loops: list[str] = Field(description="which of electricity, heat and water the cell meters")


def make_public_router(registry: Registry, db: InfluxQL, clock: Callable[[], float], limiter: RateLimiter,
                       cache_ttl_s: float = 60.0) -> APIRouter:
    router = APIRouter(prefix="/api/public", tags=["public"], dependencies=[Depends(limiter)],
                       responses={429: {"description": "too many requests from this address; see Retry-After"}})
    store = InfluxBalanceStore(db)
    cells = {cid: cfg for cid, cfg in sorted(registry.cells.items()) if cfg.cell.public}
    specs: dict[str, CellSpec] = {}
    cache: TTLCache[tuple[bytes, str]] = TTLCache(cache_ttl_s)
    max_age = str(int(cache_ttl_s))

    def spec_of(cell: str) -> CellSpec:
        if cell not in cells:
            raise HTTPException(404, f"unknown cell {cell!r}; cells: {', '.join(cells) or 'none'}")
        if cell not in specs:
            try:
                specs[cell] = build_cell_spec(cells[cell])
            except BalanceConfigError as err:
                log.error("a public cell cannot be balanced", cell=cell, error=str(err))
                raise HTTPException(503, f"the figures of {cell!r} are not available") from None
        return specs[cell]

    @router.get("/cells")
    async def public_cells(response: Response) -> list[PublicCell]:
        """The cells shown on the residents' page."""
        response.headers["Cache-Control"] = f"public, max-age={max_age}"
        out = []
        for cid, cfg in cells.items():
            try:
                loops = [lp for lp in spec_of(cid).loops() if lp in PUBLIC_LOOPS]
            except HTTPException:
                loops = []
            out.append(PublicCell(id=cid, name=cfg.cell.name, timezone=cfg.cell.timezone,
                                  residents=cfg.cell.residents, loops=loops))
        return out

    @router.get("/cells/{cell}/summary", response_model=PublicSummary,
                responses={304: {"description": "unchanged since the ETag sent in If-None-Match"},
                           404: {"description": "no such public cell"}})
    async def summary(cell: str, request: Request) -> Response:
        """Today, the last 30 days and this year: self-sufficiency, the local share of heat, the water
        loop's figures and the flows of the diagram. Totals only; updated at most every minute."""
        spec = spec_of(cell)

        async def compute() -> tuple[bytes, str]:
            built = await build_summary(store, db, spec, int(clock() * 1000))
            body = built.model_dump_json().encode()
            return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

        body, etag = await cache.get(cell, compute)
        headers = {"Cache-Control": f"public, max-age={max_age}", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    return router
