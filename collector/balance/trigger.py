"""Keeping balances current: the collector notes the time span of every batch it stored, per cell; a loop
recomputes what those readings can change (live data: the last interval; a gateway's outbox replay: the
hours or days it fills in, and the interpolated intervals around them).

    dirty = DirtyRanges()
    ingest = Ingest(..., on_stored=dirty.note)            # called from the writer thread after each write
    asyncio.create_task(run_balance_loop(engine, dirty, stop))
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import structlog

from collector.balance.engine import BalanceEngine, RecomputeReport, UnknownCell

__all__ = ["DirtyRanges", "run_balance_loop", "run_pending"]

log = structlog.get_logger("kwwk.balance")


class DirtyRanges:
    """Per cell, the earliest and latest reading timestamp stored since the last balance run (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict[str, tuple[int, int]] = {}

    def note(self, cell: str, min_ts: int, max_ts: int) -> None:
        """Readings of `cell` with timestamps in [min_ts, max_ts] were stored."""
        with self._lock:
            lo, hi = self._ranges.get(cell, (min_ts, max_ts))
            self._ranges[cell] = (min(lo, min_ts), max(hi, max_ts))

    def take(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            out, self._ranges = self._ranges, {}
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._ranges)


async def run_pending(engine: BalanceEngine, dirty: DirtyRanges) -> list[RecomputeReport]:
    """Recompute every cell with stored readings since the last run; a failed cell stays pending."""
    done: list[RecomputeReport] = []
    for cell, (lo, hi) in sorted(dirty.take().items()):
        try:
            report = await engine.recompute_touched(cell, lo, hi)
        except UnknownCell:
            log.warning("readings of a cell the balance engine does not know", cell=cell)
            continue
        except Exception as err:  # noqa: BLE001 - the database may be away; try again next round
            log.warning("balance recompute failed; will retry", cell=cell, error=str(err))
            dirty.note(cell, lo, hi)
            continue
        done.append(report)
        log.debug("balance recomputed", cell=cell, start=report.start_ms, end=report.end_ms,
                  intervals=report.intervals)
    return done


async def run_balance_loop(engine: BalanceEngine, dirty: DirtyRanges, stop: asyncio.Event,
                           interval_s: float = 30.0) -> None:
    """Every interval_s, recompute what was stored since the last round; a last round when stopped."""
    while True:
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(interval_s):
                await stop.wait()
        await run_pending(engine, dirty)
        if stop.is_set():
            return
