"""Store, then acknowledge: the collector's threads between a received message and its acknowledgement.

One parse thread encodes messages into batches of about `batch_lines` lines; `writers` threads write
batches concurrently (one database connection leaves InfluxDB's cores idle); acknowledgements still go
out in the order the messages came (MQTT 5 §4.6). A batch is retried while the database is away, so
nothing is acknowledged meanwhile: the broker's Receive Maximum bounds what is held here, and the
bounded queue of encoded batches keeps the parse thread from running ahead.

It knows nothing of MQTT but the `ack(mid, qos)` and `deadletter(message, rejection)` callables it is given.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from collector.encode import Encoded, Encoder, Rejection
from collector.metrics import CollectorMetrics
from collector.storage import StorageError, Writer
from edge.backoff import Backoff

__all__ = ["AckingWriter", "Message", "WriterSettings"]

log = structlog.get_logger("kwwk.collector")


@dataclass(frozen=True)
class WriterSettings:
    batch_lines: int = 5000  # InfluxDB's advice for one write
    flush_interval_s: float = 0.5
    writers: int = 2  # batches written at once: one database connection leaves its cores idle
    retry_base_s: float = 0.5  # write retries while the database is away: jittered, doubling, capped
    retry_cap_s: float = 10.0


@dataclass
class Message:
    """A received message, as the broker numbered it."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received: float = field(default_factory=time.time)


@dataclass
class _Item:
    msg: Message
    out: Encoded


class AckingWriter:
    """`put` messages in; each is acknowledged (through `ack`) once stored or dead-lettered."""

    def __init__(self, settings: WriterSettings, encoder: Encoder, writer: Writer, metrics: CollectorMetrics, *,
                 ack: Callable[[int, int], None], deadletter: Callable[[Message, Rejection], None],
                 on_stored: Callable[[str, int, int], None] | None = None) -> None:
        self.s = settings
        self.encoder = encoder
        self.writer = writer
        self.metrics = metrics
        self.ack = ack
        self.deadletter = deadletter
        self.on_stored = on_stored  # (cell, first ts, last ts) of each stored message: late data for the balance
        self._queue: queue.Queue[Message] = queue.Queue()  # bounded by the broker: Receive Maximum
        # encoded batches, numbered: written concurrently, acknowledged in the order they came
        self._ready: queue.Queue[tuple[int, list[_Item]] | None] = queue.Queue(maxsize=settings.writers)
        self._turn = threading.Condition()
        self._next_ack = 0
        self._stop = threading.Event()
        self._abandoned = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_write_ok: float | None = None  # when the database last accepted a write
        self.database_up = True  # False from a failed write until the next accepted one
        self.stored_readings = 0

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._parse_loop, name="kwwk.collector.parse", daemon=True)] + [
            threading.Thread(target=self._write_loop, name=f"kwwk.collector.write-{i}", daemon=True)
            for i in range(self.s.writers)]
        for t in self._threads:
            t.start()

    def put(self, message: Message) -> None:
        self._queue.put(message)
        self.metrics.queue_depth.set(self._queue.qsize())

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Store what can be stored within `timeout`; what cannot stays unacknowledged, for redelivery."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.writer.close()

    # -- the parse thread: encode, batch --------------------------------------------------------------
    def _parse_loop(self) -> None:
        """Encode messages into batches of about `batch_lines` lines, or what came within the flush interval."""
        number = 0
        while not self._abandoned.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    break
                continue
            batch = [self._encode(first)]
            lines = batch[0].out.lines.count("\n")
            deadline = time.monotonic() + self.s.flush_interval_s
            while lines < self.s.batch_lines and (timeout := deadline - time.monotonic()) > 0:
                try:
                    item = self._encode(self._queue.get(timeout=timeout))
                except queue.Empty:
                    break
                batch.append(item)
                lines += item.out.lines.count("\n")
            self._hand_over((number, batch))
            number += 1
        self._hand_over(None)

    def _hand_over(self, batch: tuple[int, list[_Item]] | None) -> None:
        while not self._abandoned.is_set():
            try:
                self._ready.put(batch, timeout=0.2)  # blocks while the database is away: memory stays bounded
                return
            except queue.Full:
                continue

    def _encode(self, m: Message) -> _Item:
        try:
            out = self.encoder.encode(m.topic, m.payload)
        except Exception as err:  # a bug of ours: keep the message (dead letter) and the collector running
            log.exception("could not encode a message", topic=m.topic)
            out = Encoded.refused(m.topic, "collector_error", f"{type(err).__name__}: {err}")
        if out.unreadable:
            self.metrics.readings.labels("bad_quality").inc(out.unreadable)
        if out.rejected:
            self.metrics.readings.labels("rejected").inc(out.rejected)
        if out.repeat:
            self.metrics.seq_duplicates.labels(out.cell, out.gateway).inc()
        return _Item(m, out)

    # -- the writer threads: store, then acknowledge in arrival order -----------------------------------
    def _write_loop(self) -> None:
        while (item := self._ready.get()) is not None:
            number, batch = item
            try:
                self._write(batch)
            except _Abandon:
                self._abandoned.set()
                log.warning("stopped while the database is away; messages stay unacknowledged for redelivery",
                            messages=len(batch) + self._queue.qsize())
                return
            with self._turn:  # MQTT wants acknowledgements in the order the messages came
                while self._next_ack != number:
                    if self._abandoned.is_set():
                        return  # an earlier batch was not stored: this one is redelivered with it
                    self._turn.wait(0.2)
                self._settle(batch)
                self._next_ack += 1
                self._turn.notify_all()
            self.metrics.queue_depth.set(self._queue.qsize())
        self._ready.put(None)  # the end, for the other writers too

    def _write(self, batch: list[_Item]) -> None:
        """One write for the whole batch; a batch the database refuses is tried message by message."""
        body = "".join(i.out.lines for i in batch)
        if body and not self._write_with_retry(body):
            for i in batch:
                if i.out.lines and not self._write_with_retry(i.out.lines):
                    i.out = i.out.storage_refused()

    def _settle(self, batch: list[_Item]) -> None:
        """Dead letters, metrics, then the acknowledgement of each message of a stored batch."""
        now = time.time()
        for i in batch:
            out = i.out
            for rejection in out.rejections:
                self.metrics.rejects.labels(rejection.reason).inc()
                log.warning("dead-lettered", reason=rejection.reason, detail=str(rejection.detail)[:300],
                            topic=i.msg.topic)
                self.deadletter(i.msg, rejection)
            if out.readings:
                self.metrics.readings.labels("stored").inc(out.readings)
                self.stored_readings += out.readings
            if out.stamps is not None:
                self.metrics.lag_seconds.observe(max(0.0, now - out.stamps[0] / 1000))
                if self.on_stored is not None:
                    try:
                        self.on_stored(out.cell, *out.stamps)
                    except Exception:  # the hook (late data for the balance) must never stop ingest
                        log.exception("on_stored hook failed", cell=out.cell)
            self.metrics.messages.labels("stored" if out.lines and not out.rejections else
                                         "partial" if out.lines else "dead_lettered").inc()
            self.ack(i.msg.mid, i.msg.qos)

    def _write_with_retry(self, lines: str) -> bool:
        """True when stored; False when the database rejects the data itself. Retries outages forever."""
        backoff = Backoff(self.s.retry_base_s, self.s.retry_cap_s)
        while True:
            t0 = time.perf_counter()
            try:
                self.writer.write(lines)
            except StorageError as err:
                self.metrics.write_errors.labels(str(err.retryable).lower()).inc()
                if not err.retryable:
                    log.error("database rejected a batch", error=str(err))
                    return False
                self.database_up = False
                self.metrics.database_up.set(0)
                delay = backoff.failure()
                if backoff.failures == 1 or backoff.failures % 10 == 0:
                    log.warning("database unavailable; holding messages unacknowledged", error=str(err),
                                attempt=backoff.failures, queued=self._queue.qsize())
                if self._stop.wait(delay) and backoff.failures > 3:
                    # stopping while the database is away: leave the messages unacknowledged for redelivery
                    raise _Abandon from err
                continue
            self.metrics.write_seconds.observe(time.perf_counter() - t0)
            self.database_up = True
            self.metrics.database_up.set(1)
            self.last_write_ok = time.time()
            if backoff.failures:
                log.info("database back; writing resumed", attempts=backoff.failures)
            return True


class _Abandon(Exception):  # noqa: N818 - internal control flow
    pass
