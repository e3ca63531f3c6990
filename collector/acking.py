"""Store, then acknowledge: the collector's threads between a received message and its acknowledgement.

One parse thread encodes messages into batches of about `batch_lines` lines; `writers` threads write
batches concurrently (one database connection leaves InfluxDB's cores idle); acknowledgements still go
out in the order the messages came (MQTT 5 §4.6).

What the database says decides what happens to a batch (collector/storage.py classifies its answers): a
refusal of the data itself (a field-type conflict) is tried message by message and what is refused is
dead-lettered; a refused credential (401/403), a missing database (404), a server error or no answer is
the operator's or the server's trouble, not the data's: the batch is retried (jittered backoff) for as long
as it takes, nothing is acknowledged, and `database_state` names the trouble for /healthz.

Memory is bounded here, not by the broker (Mosquitto 2.0.11 stops enforcing Receive Maximum once
acknowledgements flow): `put`, called on paho's network thread, blocks while `max_held_messages` messages
or `max_held_bytes` payload bytes are held (received, not yet acknowledged). The network thread then
stops reading the socket and TCP flow control holds the broker, which keeps the rest in our session.
Acknowledgements only need the writer threads (paho queues them and sends them when the network thread
runs again), and the MQTT dead-letter notice is published from a thread of its own, so nothing that frees
room waits for the blocked network thread.

Dead letters are written durably (collector/deadletters.py, fsync'ed) before the message is acknowledged;
the MQTT notice (`deadletter(message, rejection)`) follows. It knows nothing of MQTT but the `ack(mid, qos)`
and `deadletter` callables it is given.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from collector.deadletters import DeadLetterStore, StoredLetter
from collector.encode import Encoded, Encoder, Rejection
from collector.metrics import CollectorMetrics
from collector.storage import StorageError, Writer
from edge.backoff import Backoff
from edge.ratelimit import summarised

__all__ = ["AckingWriter", "Message", "WriterSettings"]

log = structlog.get_logger("kwwk.collector")
_T = TypeVar("_T")


@dataclass(frozen=True)
class WriterSettings:
    batch_lines: int = 5000  # InfluxDB's advice for one write
    flush_interval_s: float = 0.5
    writers: int = 2  # batches written at once: one database connection leaves its cores idle
    retry_base_s: float = 0.5  # write retries while the database is away: jittered, doubling, capped
    retry_cap_s: float = 10.0
    #: held = received, not yet acknowledged; past either bound `put` blocks (back-pressure on the broker).
    #: Encoding adds about as many bytes again as the payloads held.
    max_held_messages: int = 500
    max_held_bytes: int = 32 << 20
    #: durable dead letters (collector/deadletters.py); None: only the MQTT notice (tests of other parts)
    deadletter_dir: str | None = field(default_factory=lambda: os.environ.get("KWWK_DEADLETTER_DIR",
                                                                              "var/deadletters"))
    deadletter_max_bytes_per_day: int = 256 << 20


@dataclass
class Message:
    """A received message, as the broker numbered it."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received: float = field(default_factory=time.time)
    replay_of: str | None = None  # the stored dead letter this message re-ingests (kwwk collector replay-deadletters)


@dataclass
class _Item:
    msg: Message
    out: Encoded


_STATES = ("ok", "auth_failed", "forbidden", "database_missing", "unreachable", "server_error")
_STATE_HINTS = {
    "auth_failed": "the database refuses our credentials: fix the token (KWWK_INFLUX_TOKEN) and restart the collector",
    "forbidden": "our database user may not write: grant WRITE on the database",
    "database_missing": "the database or bucket does not exist: create it (or fix KWWK_INFLUX_DB)",
    "unreachable": "no answer from the database",
    "server_error": "the database has trouble of its own",
}


class AckingWriter:
    """`put` messages in; each is acknowledged (through `ack`) once stored or dead-lettered."""

    def __init__(self, settings: WriterSettings, encoder: Encoder, writer: Writer, metrics: CollectorMetrics, *,
                 ack: Callable[[int, int], None], deadletter: Callable[[Message, Rejection], None] | None = None,
                 on_stored: Callable[[str, int, int], None] | None = None,
                 deadletter_store: DeadLetterStore | None = None,
                 on_wait: Callable[[], None] | None = None) -> None:
        self.s = settings
        self.encoder = encoder
        self.writer = writer
        self.metrics = metrics
        self.ack = ack
        self.deadletter = deadletter
        self.on_stored = on_stored  # (cell, first ts, last ts) of each stored message: late data for the balance
        self.deadletters = deadletter_store or (
            DeadLetterStore(settings.deadletter_dir, settings.deadletter_max_bytes_per_day)
            if settings.deadletter_dir else None)
        self._m = metrics
        self.on_wait = on_wait
        self._queue: queue.Queue[Message] = queue.Queue()  # bounded by put(): max_held_messages/bytes
        # what is held, from put() to the acknowledgement: put() waits for room
        self._room = threading.Condition()
        self._held = 0
        self._held_bytes = 0
        self.peak_held = 0
        self.peak_held_bytes = 0
        self.waiting_since: float | None = None  # time.monotonic() since which put() waits for room, None if not
        self._closed = False
        # MQTT dead-letter notices, published by a thread of their own (the durable copy is already stored)
        self._notices: queue.Queue[tuple[Message, Rejection]] = queue.Queue(maxsize=10_000)
        self._notices_closing = threading.Event()
        self.notices_dropped = 0
        self.outcomes: Counter[str] = Counter()  # settled messages: stored, partial, dead_lettered
        # encoded batches, numbered: written concurrently, acknowledged in the order they came
        self._ready: queue.Queue[tuple[int, list[_Item]] | None] = queue.Queue(maxsize=settings.writers)
        self._turn = threading.Condition()
        self._next_ack = 0
        self._stop = threading.Event()
        self._abandoned = threading.Event()
        self._threads: list[threading.Thread] = []
        self._notifier: threading.Thread | None = None
        self.last_write_ok: float | None = None  # when the database last accepted a write
        self.database_up = True  # False from a failed write until the next accepted one
        #: "ok", or why nothing can be stored now (auth_failed, forbidden, database_missing, unreachable,
        #: server_error): messages are held unacknowledged meanwhile. /healthz reports it.
        self.database_state = "ok"
        self.database_error: str | None = None  # what the database last answered, while not ok
        self._set_state("ok")
        self.stored_readings = 0

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._parse_loop, name="kwwk.collector.parse", daemon=True)] + [
            threading.Thread(target=self._write_loop, name=f"kwwk.collector.write-{i}", daemon=True)
            for i in range(self.s.writers)]
        for t in self._threads:
            t.start()
        self._m.held_limit.set(self.s.max_held_messages)
        if self.deadletter is not None and self.deadletters is not None:
            self._notifier = threading.Thread(target=self._notify_loop, name="kwwk.collector.deadletter", daemon=True)
            self._notifier.start()

    def put(self, message: Message) -> None:
        """Hold a message until it is stored or dead-lettered, then acknowledge it. Blocks while the bounds are
        reached (never for a message arriving when nothing is held, however large). Called on paho's network
        thread: blocking here is the back-pressure. While it waits, `on_wait` is called every half second
        (the adapter may flush the acknowledgements queued meanwhile, or keep its connection alive)."""
        size = len(message.payload)
        waited = None
        while True:
            with self._room:
                if self._closed:
                    return  # stopped: left unacknowledged, the broker delivers it again
                if not self._held or (self._held < self.s.max_held_messages
                                      and self._held_bytes + size <= self.s.max_held_bytes):
                    self._held += 1
                    self._held_bytes += size
                    self.peak_held = max(self.peak_held, self._held)
                    self.peak_held_bytes = max(self.peak_held_bytes, self._held_bytes)
                    self._show_held()
                    break
                if waited is None:
                    waited = self.waiting_since = time.monotonic()
                self._room.wait(0.5)
            if self.on_wait is not None:
                try:
                    self.on_wait()
                except Exception:  # the adapter's hook must never lose the message
                    log.exception("on_wait hook failed")
        if waited is not None:
            self.waiting_since = None
            self._m.backpressure.inc(time.monotonic() - waited)
        self._queue.put(message)

    def _full(self) -> bool:
        with self._room:
            return self._held >= self.s.max_held_messages or self._held_bytes >= self.s.max_held_bytes * 0.9

    def _release(self, messages: list[Message]) -> None:
        with self._room:
            self._held -= len(messages)
            self._held_bytes -= sum(len(m.payload) for m in messages)
            self._show_held()
            self._room.notify_all()

    def _show_held(self) -> None:
        self.metrics.queue_depth.set(self._held)
        self._m.held_bytes.set(self._held_bytes)
        self._m.held_peak.set(self.peak_held)

    @property
    def queued(self) -> int:
        """Messages held: received, not yet acknowledged."""
        return self._held

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def stop(self, timeout: float = 10.0) -> None:
        """Store what can be stored within `timeout`; what cannot stays unacknowledged, for redelivery."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._room:
            self._closed = True  # a put() waiting for room returns: its message stays unacknowledged
            self._room.notify_all()
        if self._notifier is not None:
            self._notices_closing.set()  # the notifier publishes what is left, then ends
            self._notifier.join(max(0.5, deadline - time.monotonic()))
        self.writer.close()

    # -- the parse thread: encode, batch --------------------------------------------------------------
    def _parse_loop(self) -> None:
        """Encode messages into batches of about `batch_lines` lines, or what came within the flush interval."""
        number = 0
        while not self._abandoned.is_set() and (first := _next(self._queue, self._stop)) is not None:
            batch = [self._encode(first)]
            lines = batch[0].out.lines.count("\n")
            deadline = time.monotonic() + self.s.flush_interval_s
            while lines < self.s.batch_lines and (timeout := deadline - time.monotonic()) > 0:
                if self._queue.empty() and self._full():
                    break  # put() is waiting for room: nothing more comes before this batch is acknowledged
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
                            messages=self._held)
                return
            with self._turn:  # MQTT wants acknowledgements in the order the messages came
                while self._next_ack != number:
                    if self._abandoned.is_set():
                        return  # an earlier batch was not stored: this one is redelivered with it
                    self._turn.wait(0.2)
                self._settle(batch)
                self._next_ack += 1
                self._turn.notify_all()
        self._ready.put(None)  # the end, for the other writers too

    def _write(self, batch: list[_Item]) -> None:
        """One write for the whole batch; a batch the database refuses is tried message by message."""
        body = "".join(i.out.lines for i in batch)
        if body and not self._write_with_retry(body):
            for i in batch:
                if i.out.lines and not self._write_with_retry(i.out.lines):
                    i.out = i.out.storage_refused()

    def _settle(self, batch: list[_Item]) -> None:
        """Dead letters (stored durably first), metrics, then the acknowledgement of each message of a batch."""
        now = time.time()
        if self.deadletters is not None:
            letters = [StoredLetter(r.reason, r.detail, i.msg.topic, i.msg.payload, int(i.msg.received * 1000),
                                    r.cell, r.gateway, replay_of=i.msg.replay_of)
                       for i in batch for r in i.out.rejections]
            if letters:
                kept = len(self.deadletters.append(letters))
                self._m.durable.labels("stored").inc(kept)
                if kept < len(letters):
                    self._m.durable.labels("dropped").inc(len(letters) - kept)
        for i in batch:
            out = i.out
            for rejection in out.rejections:
                self.metrics.rejects.labels(rejection.reason).inc()
                summarised(log, "dead-lettered", rejection.reason,  # the first per reason, then a summary a minute
                           reason=rejection.reason, detail=str(rejection.detail)[:300], topic=i.msg.topic)
                self._notice(i.msg, rejection)
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
            outcome = "stored" if out.lines and not out.rejections else "partial" if out.lines else "dead_lettered"
            self.outcomes[outcome] += 1
            self.metrics.messages.labels(outcome).inc()
            self.ack(i.msg.mid, i.msg.qos)
        self._release([i.msg for i in batch])

    def _notice(self, message: Message, rejection: Rejection) -> None:
        """The MQTT dead letter: from the notifier thread when the durable store has the letter (publishing may
        wait for the network thread, which may be waiting for room), else here, as its only home."""
        if self.deadletter is None:
            return
        if self._notifier is None:
            self.deadletter(message, rejection)
            return
        try:
            self._notices.put_nowait((message, rejection))
        except queue.Full:  # the durable copy is kept; only the notice is lost
            self.notices_dropped += 1

    def _notify_loop(self) -> None:
        assert self.deadletter is not None
        while (item := _next(self._notices, self._notices_closing)) is not None:
            try:
                self.deadletter(*item)
            except Exception:  # a notice that cannot be published must not stop the others
                log.exception("could not publish a dead letter", topic=item[0].topic)

    def _write_with_retry(self, lines: str) -> bool:
        """True when stored; False when the database refuses the data itself. Retries anything else forever:
        an outage, a refused credential, a missing database, a server error."""
        backoff = Backoff(self.s.retry_base_s, self.s.retry_cap_s)
        while True:
            t0 = time.perf_counter()
            try:
                self.writer.write(lines)
            except StorageError as err:
                self.metrics.write_errors.labels(str(err.retryable).lower()).inc()
                if not err.retryable:
                    log.error("database refused the data; dead-lettering it", error=str(err))
                    return False
                changed = err.kind != self.database_state
                self.database_up = False
                self.database_error = str(err)
                self._set_state(err.kind)
                self.metrics.database_up.set(0)
                delay = backoff.failure()
                if changed or backoff.failures == 1 or backoff.failures % 10 == 0:
                    log.warning("database not writable; holding messages unacknowledged, retrying",
                                state=err.kind, hint=_STATE_HINTS.get(err.kind, ""), error=str(err),
                                attempt=backoff.failures, held=self._held)
                if self._stop.wait(delay) and backoff.failures > 3:
                    # stopping while the database is away: leave the messages unacknowledged for redelivery
                    raise _Abandon from err
                continue
            self.metrics.write_seconds.observe(time.perf_counter() - t0)
            self.database_up = True
            self.database_error = None
            self._set_state("ok")
            self.metrics.database_up.set(1)
            self.last_write_ok = time.time()
            if backoff.failures:
                log.info("database back; writing resumed", attempts=backoff.failures)
            return True

    def _set_state(self, state: str) -> None:
        self.database_state = state
        for s in _STATES:
            self._m.state.labels(s).set(1 if s == state else 0)


def _next(q: queue.Queue[_T], done: threading.Event) -> _T | None:
    """The next item of `q`, waiting for it; None once `q` is empty and `done` is set."""
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            if done.is_set():
                return None


class _Abandon(Exception):  # noqa: N818 - internal control flow
    pass
