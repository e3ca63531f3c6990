"""The outbox: every reading is kept until the broker acknowledged it, and reaches the SD card only when the
broker does not take it in time.

Where a reading is, and what survives what (the defaults: write window 5 s, sync interval 1 s):
- Broker connected: readings wait in RAM and are published at once. Those the broker acknowledges within
  `write_window_s` never touch the card. What is still unacknowledged after the window (a slow or hung
  broker) is committed, in one group commit per tick. SIGKILL or a crash loses the readings the broker had
  not acknowledged and that were taken less than `write_window_s` ago (normally the last poll's, which the
  broker acknowledges within milliseconds; at most the window's). A power cut loses the same, plus what was
  committed in the last `sync_interval_s`.
- Broker unreachable (never connected, or the connection dropped): everything in RAM is committed at once,
  and each poll's readings are committed before the poll returns (polls that finish together share one
  commit). SIGKILL or a crash loses nothing; a power cut loses at most the last `sync_interval_s` of
  commits (`sync_interval_s: 0`: nothing, at one fsync per commit).
- A clean stop (SIGTERM) commits everything in RAM first: it loses nothing.
- Acknowledged batches stay in RAM (`Archive`), compressed, for the collector's resend requests: a broker may
  lose a message it acknowledged (Mosquitto drops queued messages past its per-client limit, and loses
  shared-subscription messages around its own restart). The trade-off: the archive costs no write per
  reading but is bounded (`keep_sent_s`, `archive_bytes`) and gone after a restart; a request for a batch it
  no longer has is counted (kwwk_gateway_resend_missing_total) and the collector reports the gap.

All disk work runs on the outbox's own thread (gateway/store.py), never on the event loop that polls devices
and pets systemd's watchdog.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from edge.ratelimit import summarised
from edge.telemetry import Reading
from gateway.store import Store, pack, unpack

__all__ = ["Archive", "Batch", "Outbox", "OverflowPolicy"]

log = structlog.get_logger("kwwk.gateway.outbox")
OverflowPolicy = Literal["drop_oldest", "drop_newest"]
T = TypeVar("T")
Key = tuple[str, int]  # stream, seq


@dataclass(frozen=True, slots=True)
class Batch:
    stream: str
    seq: int
    replay: bool
    readings: list[Reading]

    @property
    def key(self) -> Key:
        return self.stream, self.seq


@dataclass(slots=True)
class _Staged:
    at: float  # monotonic time the readings entered the outbox
    readings: list[Reading]


@dataclass(slots=True)
class _Flight:
    batch: Batch
    at: float  # when its oldest reading entered the outbox (monotonic)
    ids: list[int] | None = None  # its chunks on disk (holding all its readings); None while only in RAM


class Archive:
    """Acknowledged batches, compressed in RAM, newest kept: for the collector's resend requests."""

    def __init__(self, keep_s: float, max_bytes: int) -> None:
        self.keep_s = keep_s
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evicted = 0
        self._kept: OrderedDict[Key, tuple[float, bytes]] = OrderedDict()

    def put(self, key: Key, readings: Sequence[Reading], now: float | None = None) -> None:
        blob = pack(readings)
        self._kept[key] = (now if now is not None else time.monotonic(), blob)
        self.bytes += len(blob)
        self.prune(now)

    def get(self, key: Key) -> list[Reading] | None:
        kept = self._kept.get(key)
        return unpack(kept[1]) if kept else None

    def prune(self, now: float | None = None) -> None:
        limit = (now if now is not None else time.monotonic()) - self.keep_s
        while self._kept:
            key, (at, blob) = next(iter(self._kept.items()))
            if at >= limit and self.bytes <= self.max_bytes:
                break
            del self._kept[key]
            self.bytes -= len(blob)
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._kept)


@dataclass
class OutboxStats:
    """What the outbox wrote, for /metrics: the card's wear is counted, not guessed."""

    commits: int = 0
    committed: dict[str, int] = field(default_factory=dict)  # readings written to the card, by why


class Outbox:
    def __init__(self, path: Path | str, *, max_readings: int = 10_000_000, max_age_s: float = 60 * 86400,
                 max_bytes: int = 512 * 2**20, overflow: OverflowPolicy = "drop_oldest",
                 write_window_s: float = 5.0, sync_interval_s: float = 1.0, replay_after_s: float = 10.0,
                 keep_sent_s: float = 3600.0, archive_bytes: int = 4 * 2**20, chunk_readings: int = 500) -> None:
        self.path = Path(path)
        self.max_readings = max_readings
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_s * 1000)
        self.overflow = overflow
        self.write_window_s = write_window_s
        self.replay_after_ms = int(replay_after_s * 1000)
        self.chunk_readings = chunk_readings
        self.archive = Archive(keep_sent_s, archive_bytes)
        self.dropped: dict[str, int] = {}
        self.stats = OutboxStats()
        self.errors = 0  # disk writes that failed (a full or failing card), retried
        #: set by the uplink: while False, every reading is committed before append() returns
        self.online = False
        # the WAL's cap: an eighth of the budget (a checkpoint copies at most that), 16 KiB .. 4 MiB
        self._wal_cap = max(16 * 1024, min(4 * 2**20, max_bytes // 8))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kwwk-outbox")
        self._store: Store = self._pool.submit(Store, self.path, sync_interval_s=sync_interval_s,
                                               wal_cap=self._wal_cap).result()
        self.stream = self._store.stream
        self._stage: deque[_Staged] = deque()
        self._staged = 0
        self._limbo = 0  # readings on their way to the disk (a commit in progress)
        self._on_disk = (self._store.waiting_n, self._store.numbered_n)  # as of the last disk operation
        self._pending_n = 0  # readings waiting for the next group commit (broker unreachable)
        self._flights: dict[Key, _Flight] = {}
        now = time.monotonic()
        for chunk, ids in self._pool.submit(self._store.in_flight).result():
            assert chunk.stream is not None and chunk.seq is not None  # noqa: S101 (in_flight's rows have both)
            batch = Batch(chunk.stream, chunk.seq, chunk.replay, chunk.readings)
            self._flights[batch.key] = _Flight(batch, now, ids)
        self._oldest_disk = self._pool.submit(self._store.oldest_ts).result()
        self._fresh_turn = True
        self._pending: list[list[Reading]] = []
        self._pending_done: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run disk work on the outbox thread; the event loop goes on polling meanwhile. The store's counts
        are taken on that thread with the result, and applied in the same step as the caller's own
        bookkeeping: `depth` never counts a reading twice (on disk and still on its way) or not at all."""
        store = self._store

        def call() -> tuple[T, tuple[int, int]]:
            return fn(*args), (store.waiting_n, store.numbered_n)

        result, self._on_disk = await asyncio.get_running_loop().run_in_executor(self._pool, call)
        return result

    # -- state -----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Readings not yet acknowledged by the broker, wherever they are."""
        ram_flights = sum(len(f.batch.readings) for f in self._flights.values() if f.ids is None)
        return self._staged + self._limbo + self._pending_n + ram_flights + sum(self._on_disk)

    @property
    def in_ram(self) -> int:
        """Readings held only in RAM (lost on SIGKILL while the broker is connected: see the module doc)."""
        return self._staged + sum(len(f.batch.readings) for f in self._flights.values() if f.ids is None)

    def oldest_ts(self) -> int | None:
        ram = [min(r.ts for r in f.batch.readings) for f in self._flights.values() if f.batch.readings]
        if self._stage:
            ram.append(self._stage[0].readings[0].ts)
        known = [t for t in [*ram, self._oldest_disk] if t is not None]
        return min(known) if known else None

    def disk_bytes(self) -> int:
        return self._store.disk_bytes()

    # -- writing ---------------------------------------------------------------------------------
    async def append(self, readings: Iterable[Reading]) -> int:
        """Take readings (apply the overflow policy); return how many were kept. While the broker is not
        connected, they are committed before this returns."""
        rows = list(readings)
        if not rows:
            return 0
        excess = max(0, self.depth + len(rows) - self.max_readings)  # also a backlog above a lowered bound
        if excess and self.overflow == "drop_newest":
            keep = max(0, len(rows) - excess)
            self._drop("full_drop_newest", len(rows) - keep)
            rows, excess = rows[:keep], 0
        if not rows:
            return 0
        n = len(rows)
        self._limbo += n  # counted from now on: a poll finishing meanwhile sees them in depth
        try:
            if excess:
                await self._drop_oldest(excess, "full_drop_oldest")
        finally:
            self._limbo -= n
        if self.online:
            self._stage.append(_Staged(time.monotonic(), rows))
            self._staged += n
        else:
            await self._write_through(rows)
        return n

    async def _write_through(self, rows: list[Reading]) -> None:
        """Group commit: polls that finish while a commit is under way share the next one."""
        self._pending.append(rows)
        self._pending_n += len(rows)
        fut = self._pending_done
        if fut is None:
            fut = self._pending_done = asyncio.get_running_loop().create_future()
            self._spawn(self._flush_pending(fut))
        await asyncio.shield(fut)

    async def _flush_pending(self, fut: asyncio.Future[None]) -> None:
        await asyncio.sleep(0)  # let the polls finishing in this moment join
        groups, self._pending, self._pending_done = self._pending, [], None
        n = sum(len(g) for g in groups)
        try:
            await self._commit(self._chunks(groups), "offline")
        except BaseException as err:  # noqa: BLE001 (the appenders waiting for this commit get the error)
            self._pending_n -= n
            if not fut.done():
                fut.set_exception(err)
            return
        self._pending_n -= n  # the same step that took the store's new counts: never counted twice
        fut.set_result(None)

    def _chunks(self, groups: Iterable[list[Reading]]) -> list[tuple[str | None, int | None, bool, list[Reading]]]:
        """Waiting readings as chunks of at most chunk_readings (a chunk is later sent as one batch)."""
        out: list[tuple[str | None, int | None, bool, list[Reading]]] = []
        current: list[Reading] = []
        for group in groups:
            for r in group:
                current.append(r)
                if len(current) >= self.chunk_readings:
                    out.append((None, None, False, current))
                    current = []
        if current:
            out.append((None, None, False, current))
        return out

    async def _commit(self, chunks: list[tuple[str | None, int | None, bool, list[Reading]]],
                      why: str) -> list[int]:
        """One group commit, within the size budget (the overflow policy makes room or refuses)."""
        if not chunks:
            return []
        ids, dropped, oldest = await self._run(self._commit_on_thread, chunks)
        for reason, n in dropped.items():
            self._drop(reason, n, deleted=True)
        self._oldest_disk = oldest
        self.stats.commits += 1
        kept = sum(len(c[3]) for c, i in zip(chunks, ids, strict=True) if i)
        self.stats.committed[why] = self.stats.committed.get(why, 0) + kept
        return ids

    def _commit_on_thread(self, chunks: list[tuple[str | None, int | None, bool, list[Reading]]]
                          ) -> tuple[list[int], dict[str, int], int | None]:
        """(ids, 0 for a chunk refused by the budget; readings dropped by reason; oldest ts on disk)."""
        store = self._store
        budget = self.max_bytes - self._wal_cap - 4096  # the WAL may fill to its cap; .seq file and slack
        packed = [pack(c[3]) for c in chunks]
        need = sum(store.cost(b) for b in packed)
        dropped: dict[str, int] = {}
        over = store.live_bytes() + need - budget
        if over > 0 and self.overflow == "drop_oldest":
            while over > 0 and store.waiting_n:
                per_reading = max(1, store.live_bytes() // max(1, store.waiting_n + store.numbered_n))
                gone = store.drop(max(1, over // per_reading + 1), newest=False)
                if not gone:
                    break
                dropped["size_drop_oldest"] = dropped.get("size_drop_oldest", 0) + gone
                over = store.live_bytes() + need - budget
        keep = [True] * len(chunks)
        # what still does not fit is refused by the policy: the newest first under drop_newest, else the
        # oldest; a numbered batch (in flight, its number known to the collector) is always kept
        order = range(len(chunks) - 1, -1, -1) if self.overflow == "drop_newest" else range(len(chunks))
        for i in order:
            if over <= 0:
                break
            if chunks[i][1] is None:
                keep[i] = False
                reason = f"size_{self.overflow}"
                dropped[reason] = dropped.get(reason, 0) + len(chunks[i][3])
                over -= store.cost(packed[i])
        kept = [i for i in range(len(chunks)) if keep[i]]
        ids_kept = iter(store.insert([chunks[i] for i in kept], [packed[i] for i in kept]))
        ids = [next(ids_kept) if k else 0 for k in keep]
        store.checkpoint_if_due()
        store.sync_if_due()
        return ids, dropped, store.oldest_ts()

    async def _drop_oldest(self, n: int, reason: str) -> None:
        gone = 0
        if self._on_disk[0]:
            gone = await self._run(functools.partial(self._store.drop, n, newest=False))
            self._oldest_disk = await self._run(self._store.oldest_ts)
        while gone < n and self._stage:
            group = self._stage.popleft()
            self._staged -= len(group.readings)
            gone += len(group.readings)
        self._drop(reason, gone, deleted=True)

    def _drop(self, reason: str, n: int, deleted: bool = False) -> None:
        if n <= 0:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        # while it overflows: the first drop, then a summary a minute, not a line per poll
        summarised(log, "outbox overflow: readings dropped", reason, count=n, reason=reason, policy=self.overflow,
                   limit=self.max_readings, max_bytes=self.max_bytes, deleted=deleted)

    async def commit_overdue(self, force: bool = False) -> None:
        """Commit what has waited for the broker's acknowledgement longer than the write window (all, if
        force): readings not yet sent, and batches sent but not acknowledged (with their numbers)."""
        cutoff = float("inf") if force else time.monotonic() - self.write_window_s
        groups = []
        while self._stage and self._stage[0].at <= cutoff:
            group = self._stage.popleft()
            self._staged -= len(group.readings)
            groups.append(group.readings)
        flights = [f for f in self._flights.values() if f.ids is None and f.at <= cutoff]
        chunks = [(f.batch.stream, f.batch.seq, f.batch.replay, f.batch.readings) for f in flights]
        waiting = self._chunks(groups)
        n = sum(len(g) for g in groups) + sum(len(f.batch.readings) for f in flights)
        if not n:
            return
        for f in flights:
            f.ids = []  # being committed: not again, and counted in _limbo meanwhile
        self._limbo += n
        try:
            ids = await self._commit(chunks + waiting, "offline" if force else "window")
        except BaseException:
            for back in reversed(groups):  # nothing was written: all of it waits in RAM again, in order
                self._stage.appendleft(_Staged(time.monotonic() - self.write_window_s, back))
                self._staged += len(back)
            for f in flights:
                if f.ids == []:
                    f.ids = None
            raise
        finally:
            self._limbo -= n
        orphans: list[_Flight] = []
        for f, cid in zip(flights, ids, strict=False):
            if self._flights.get(f.batch.key) is f:
                f.ids = [cid]
            else:  # acknowledged while it was being written: not needed on disk any more
                orphans.append(f)
                f.ids = [cid]
        if orphans:
            await self._run(self._store.delete_numbered, [i for f in orphans for i in f.ids or []],
                            sum(len(f.batch.readings) for f in orphans))

    async def go_offline(self) -> None:
        """The broker is gone: from now on every reading is committed at once, and RAM goes to disk now."""
        self.online = False
        await self.commit_overdue(force=True)

    # -- publishing ------------------------------------------------------------------------------
    def in_flight(self) -> list[Batch]:
        """Batches numbered but not acknowledged (after a reconnect or restart: re-sent first, same numbers)."""
        return [f.batch for f in sorted(self._flights.values(), key=lambda f: f.batch.key)]

    async def next_batch(self, max_readings: int, now_ms: int | None = None) -> Batch | None:
        """Number the next readings to send. Alternates fresh readings and the backlog on disk so that, after
        an outage, the backlog drains oldest first while current values keep flowing."""
        now_ms = now_ms or int(time.time() * 1000)
        replay_before = now_ms - self.replay_after_ms
        order = [self._next_fresh, self._next_backlog]
        if not self._fresh_turn:
            order.reverse()
        self._fresh_turn = not self._fresh_turn
        for source in order:
            batch = await source(max_readings, replay_before)
            if batch is not None:
                return batch
        return None

    async def _next_fresh(self, max_readings: int, replay_before: int) -> Batch | None:
        if not self._stage:
            return None
        rows: list[Reading] = []
        at = self._stage[0].at
        while self._stage and len(rows) < max_readings:
            group = self._stage[0]
            take = group.readings[: max_readings - len(rows)]
            rows.extend(take)
            if len(take) == len(group.readings):
                self._stage.popleft()
            else:
                group.readings = group.readings[len(take):]
            self._staged -= len(take)
        self._limbo += len(rows)
        try:
            seq = await self._run(self._store.assign_seq)
        finally:
            self._limbo -= len(rows)
        batch = Batch(self.stream, seq, min(r.ts for r in rows) < replay_before, rows)
        self._flights[batch.key] = _Flight(batch, at)
        return batch

    async def _next_backlog(self, max_readings: int, replay_before: int) -> Batch | None:
        if not self._on_disk[0]:
            return None
        taken = await self._run(self._store.take_waiting, max_readings, replay_before)
        if taken is None:
            return None
        chunk, ids = taken
        assert chunk.stream is not None and chunk.seq is not None  # noqa: S101 (take_waiting numbers it)
        batch = Batch(chunk.stream, chunk.seq, chunk.replay, chunk.readings)
        self._flights[batch.key] = _Flight(batch, time.monotonic(), ids)
        return batch

    async def ack(self, key: Key) -> None:
        """The broker has the batch: into the archive, and off the disk if it was there."""
        flight = self._flights.pop(key, None)
        if flight is None:
            return
        self.archive.put(key, flight.batch.readings)
        if flight.ids:
            await self._run(self._store.delete_numbered, flight.ids, len(flight.batch.readings))
            self._oldest_disk = await self._run(self._store.oldest_ts)

    def sent_batch(self, key: Key) -> Batch | None:
        """An acknowledged batch from the archive, to send again on the collector's request."""
        readings = self.archive.get(key)
        return None if readings is None else Batch(key[0], key[1], True, readings)

    # -- upkeep ----------------------------------------------------------------------------------
    async def maintain(self, now_ms: int | None = None) -> None:
        """Drop waiting readings past the age limit (counted), forget old archived batches, keep the size."""
        now_ms = now_ms or int(time.time() * 1000)
        if self._on_disk[0]:
            expired = await self._run(functools.partial(self._store.drop, 0, newest=False,
                                                        cutoff_ts=now_ms - self.max_age_ms))
            self._drop("expired", expired, deleted=True)
        self.archive.prune()
        self._oldest_disk = await self._run(self._store.oldest_ts)

    async def run(self, tick: float | None = None) -> None:
        """Commit what outlived the write window, fsync on the sync interval, upkeep every 5 s.

        Each round runs as a task of its own that a cancellation of run() does not interrupt: a commit under
        way on the outbox thread finishes either way, and so must its bookkeeping (else the readings it wrote
        would count as still in RAM, and close() would write them a second time)."""
        tick = tick or max(0.05, min(0.5, self.write_window_s / 4))
        upkeep = [time.monotonic()]
        while True:
            await asyncio.sleep(tick)
            work = asyncio.ensure_future(self._round(upkeep))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait([work])
                raise

    async def _round(self, upkeep: list[float]) -> None:
        try:
            await self.commit_overdue()
            if self._store.unsynced:
                await self._run(self._store.sync_if_due)
            if time.monotonic() - upkeep[0] >= 5:
                upkeep[0] = time.monotonic()
                await self.maintain()
        except (OSError, sqlite3.Error) as err:  # a full or failing card: keep what is in RAM, try again
            self.errors += 1
            summarised(log, "outbox: the disk refused a write; readings stay in RAM", type(err).__name__,
                       error=str(err), in_ram=self.in_ram, path=str(self.path))

    async def close(self) -> None:
        """A clean stop: everything in RAM is committed (a stop loses nothing), then the files are closed."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.commit_overdue(force=True)
            await self._run(self._store.close)
        finally:
            self._pool.shutdown(wait=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
