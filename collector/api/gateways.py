"""The fleet's health for operators: per gateway online or offline (its retained status), when it was
last heard from, its sequence numbers and their gaps (from `kwwk_batches`, what every collector replica
stored), and its outbox depth when the gateway reports it in its status.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from collector.api.status import StatusWatcher
from collector.encode import BATCH_MEASUREMENT
from collector.query import InfluxQL, ident, literal
from collector.registry import Registry
from collector.api.errors import known_cell

__all__ = ["GatewayHealth", "StreamStats", "make_gateways_router"]


class StreamStats(BaseModel):
    stream: str = Field(description="the gateway's outbox id; sequence numbers count within one stream")
    first_seq: int = Field(description="lowest sequence number stored within the window")
    last_seq: int
    batches: int = Field(description="distinct sequence numbers stored within the window")
    missing: int = Field(description="sequence numbers between first and last never stored (gaps)")
    readings: int = Field(description="readings stored within the window")


class GatewayHealth(BaseModel):
    cell: str
    gateway: str
    name: str | None
    state: str = Field(description="online or offline from the gateway's retained status; unknown when it never "
                                   "reported or the API cannot reach the broker")
    state_since: datetime | None = Field(None, description="when the gateway published its status")
    last_seen: datetime | None = Field(None, description="when its last stored batch was sent")
    last_seen_age_s: float | None = None
    last_seq: int | None = None
    window_s: int = Field(description="the window of the sequence statistics, ending now")
    seq_gaps: int = Field(description="missing sequence numbers within the window, all streams")
    streams: list[StreamStats]
    outbox_readings: int | None = Field(None, description="readings waiting in the gateway's outbox, when its status "
                                                          "reports them; null: unknown")
    outbox_reported: datetime | None = Field(None, description="when that outbox depth was reported")


WindowHours = Annotated[float, Query(gt=0, le=24 * 35, description="hours of sequence statistics, ending now")]


def _dt(ms: float | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def make_gateways_router(registry: Registry, db: InfluxQL, watcher: StatusWatcher | None,
                         clock: Callable[[], float]) -> APIRouter:
    router = APIRouter(tags=["fleet"])

    async def health(cells: list[str], window_h: float) -> list[GatewayHealth]:
        now_ms = int(clock() * 1000)
        window_s = int(window_h * 3600)
        where = f"{ident('cell')} =~ /^({'|'.join(cells)})$/" if len(cells) > 1 else \
            f"{ident('cell')} = {literal(cells[0])}"
        last, sent, stats = await db.query(
            f"SELECT last({ident('seq')}) FROM {ident(BATCH_MEASUREMENT)} WHERE {where} "
            f"GROUP BY {ident('cell')}, {ident('gateway')}",
            # a batch record's time is within RECORD_BLOCK/2 ms of its send (collector/encode.py): the exact
            # instant is its field `sent` (records written before 2026-12 have none: their time is it)
            f"SELECT last({ident('sent')}) FROM {ident(BATCH_MEASUREMENT)} WHERE {where} "
            f"GROUP BY {ident('cell')}, {ident('gateway')}",
            f"SELECT count(distinct({ident('seq')})) AS n, min({ident('seq')}) AS lo, max({ident('seq')}) AS hi, "
            f"sum({ident('readings')}) AS readings FROM {ident(BATCH_MEASUREMENT)} WHERE {where} "
            f"AND time > {now_ms - window_s * 1000}ms AND time <= {now_ms + 60_000}ms "
            f"GROUP BY {ident('cell')}, {ident('gateway')}, {ident('stream')}")
        seen = {(s.tags.get("cell"), s.tags.get("gateway")): s.values[0] for s in last}
        sent_at = {(s.tags.get("cell"), s.tags.get("gateway")): s.values[0][1] for s in sent}
        streams: dict[tuple[str, str], list[StreamStats]] = {}
        for s in stats:
            _t, n, lo, hi, readings = s.values[0]
            streams.setdefault((s.tags.get("cell", ""), s.tags.get("gateway", "")), []).append(StreamStats(
                stream=s.tags.get("stream", ""), first_seq=int(lo), last_seq=int(hi), batches=int(n),
                missing=max(0, int(hi) - int(lo) + 1 - int(n)), readings=int(readings or 0)))
        out = []
        for cell in cells:
            cfg = registry.cells[cell]
            for gw in cfg.gateways:
                key = (cell, gw.id)
                status = watcher.get(cell, gw.id) if watcher is not None else None
                ts, seq = seen.get(key, (None, None))
                ts = sent_at.get(key) or ts
                mine = sorted(streams.get(key, []), key=lambda st: st.last_seq)
                state = status.state if status is not None and status.state in ("online", "offline") else "unknown"
                out.append(GatewayHealth(
                    cell=cell, gateway=gw.id, name=gw.name, state=state,
                    state_since=_dt(status.ts) if status else None, last_seen=_dt(ts),
                    last_seen_age_s=round((now_ms - ts) / 1000, 1) if ts is not None else None,
                    last_seq=int(seq) if seq is not None else None, window_s=window_s,
                    seq_gaps=sum(st.missing for st in mine), streams=mine,
                    outbox_readings=status.outbox_readings if status else None,
                    outbox_reported=_dt(status.ts) if status and status.outbox_readings is not None else None))
        return out

    @router.get("/api/gateways")
    async def gateways(window_h: WindowHours = 24.0) -> list[GatewayHealth]:
        """Every gateway of every cell: online or offline, last seen, sequence gaps, outbox depth."""
        return await health(sorted(registry.cells), window_h)

    @router.get("/api/cells/{cell}/gateways")
    async def cell_gateways(cell: str, window_h: WindowHours = 24.0) -> list[GatewayHealth]:
        """The cell's gateways: online or offline, last seen, sequence gaps, outbox depth."""
        known_cell(registry, cell)
        return await health([cell], window_h)

    return router
