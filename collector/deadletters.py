"""Dead letters kept on the central side, with their payload: one append-only JSON-lines file per day.

A message the collector cannot store is still acknowledged (it would come back forever otherwise), so
before that acknowledgement it is appended here and fsync'ed; the MQTT dead-letter topic is only a
notice for whoever watches it. Why a local file and not an InfluxDB measurement: a dead letter may exist
because InfluxDB refused it, and the file works whatever state the database is in.

    var/deadletters/deadletters-2026-12-02.jsonl   one JSON object per line (see `StoredLetter`)
    var/deadletters/replayed.txt                    ids already re-ingested by `kwwk collector replay-deadletters`

The files are bounded: past `max_bytes_per_day` in one day's file, or `max_total_bytes` in the folder, a
dead letter is dropped and counted (`dropped`), never blocking ingest. Several processes may append to one
folder (each line is one O_APPEND write), though each replica should have its own.
`replay` re-ingests chosen dead letters through the collector's own encoder and writer path (acking.py),
so what is still bad is dead-lettered again (a new record naming the one it replays), not lost.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

__all__ = ["DeadLetterStore", "ReplayResult", "StoredLetter", "replay"]

log = structlog.get_logger("kwwk.collector")

_FILE = re.compile(r"^deadletters-(\d{4}-\d{2}-\d{2})\.jsonl$")
REPLAYED = "replayed.txt"
PAYLOAD_MAX = 1 << 20  # bytes of payload kept per dead letter; a longer one is kept cut and marked `truncated`


@dataclass(frozen=True)
class StoredLetter:
    """One dead letter as stored: why, where from, and the payload as received."""

    reason: str
    detail: Any
    topic: str
    payload: bytes
    received: int  # UTC ms, when the collector received the message
    cell: str = "_"
    gateway: str = "_"
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    stored: int = 0  # UTC ms, when it was written here (set by the store)
    truncated: bool = False
    replay_of: str | None = None  # the id of the dead letter whose replay refused it again

    def to_json(self) -> str:
        record: dict[str, Any] = {"id": self.id, "stored": self.stored, "reason": self.reason, "detail": self.detail,
                                  "cell": self.cell, "gateway": self.gateway, "topic": self.topic,
                                  "received": self.received, "truncated": self.truncated, "replay_of": self.replay_of}
        try:
            record["payload"] = self.payload.decode("utf-8")
        except UnicodeDecodeError:
            record["payload_b64"] = base64.b64encode(self.payload).decode()
        return json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> StoredLetter:
        d = json.loads(line)
        payload = d["payload"].encode() if "payload" in d else base64.b64decode(d.get("payload_b64", ""))
        return cls(reason=d["reason"], detail=d.get("detail"), topic=d["topic"], payload=payload,
                   received=int(d["received"]), cell=d.get("cell", "_"), gateway=d.get("gateway", "_"), id=d["id"],
                   stored=int(d.get("stored", 0)), truncated=bool(d.get("truncated")), replay_of=d.get("replay_of"))


class DeadLetterStore:
    """Append dead letters durably (write + fsync before the caller acknowledges), bounded, drops counted."""

    def __init__(self, directory: Path | str, max_bytes_per_day: int = 256 << 20, max_total_bytes: int = 4 << 30,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(directory)
        self.max_bytes_per_day = max_bytes_per_day
        self.max_total_bytes = max_total_bytes
        self.clock = clock
        self.stored = 0  # dead letters written since start
        self.dropped = 0  # dead letters not written: a file or the folder was full, or it could not be written
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes in the folder, learnt on first use

    def path_for(self, day: str) -> Path:
        return self.dir / f"deadletters-{day}.jsonl"

    def append(self, letters: Iterable[StoredLetter]) -> list[StoredLetter]:
        """Write the letters (one fsync for all); return those written, stamped. Never raises: a letter that
        cannot be written is dropped, counted and logged."""
        now = self.clock()
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        stamped = [StoredLetter(**{**letter.__dict__, "stored": int(now * 1000),
                                   **({"payload": letter.payload[:PAYLOAD_MAX], "truncated": True}
                                      if len(letter.payload) > PAYLOAD_MAX else {})})
                   for letter in letters]
        if not stamped:
            return []
        with self._lock:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if self._total is None:
                    self._total = sum(p.stat().st_size for p in self.dir.glob("deadletters-*.jsonl"))
                path = self.path_for(day)
                size = path.stat().st_size if path.exists() else 0
                written: list[StoredLetter] = []
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
                try:
                    for letter in stamped:
                        line = (letter.to_json() + "\n").encode()
                        if size + len(line) > self.max_bytes_per_day or self._total + len(line) > self.max_total_bytes:
                            self.dropped += 1
                            continue
                        os.write(fd, line)  # one write per line: appends from several processes stay whole
                        size += len(line)
                        self._total += len(line)
                        written.append(letter)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as err:
                self.dropped += len(stamped)
                log.error("could not store dead letters durably", folder=str(self.dir), error=str(err),
                          letters=len(stamped))
                return []
        self.stored += len(written)
        return written

    # -- reading, for the replay ----------------------------------------------------------------------
    def files(self, since_day: str | None = None) -> list[Path]:
        """The day files, oldest first; from `since_day` (YYYY-MM-DD) on when given."""
        if not self.dir.is_dir():
            return []
        days = sorted((m.group(1), p) for p in self.dir.iterdir() if (m := _FILE.match(p.name)))
        return [p for day, p in days if since_day is None or day >= since_day]

    def read(self, since_ms: int | None = None, reason: str | None = None,
             include_replayed: bool = False) -> Iterator[StoredLetter]:
        """Stored dead letters received at or after `since_ms`, of `reason` when given, not yet replayed."""
        done = set() if include_replayed else self.replayed()
        since_day = (datetime.fromtimestamp(since_ms / 1000, UTC).strftime("%Y-%m-%d")
                     if since_ms is not None else None)
        for path in self.files(since_day):
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        letter = StoredLetter.from_json(line)
                    except (ValueError, KeyError, TypeError) as err:
                        log.warning("unreadable dead-letter record skipped", file=str(path), line=number,
                                    error=str(err))
                        continue
                    if letter.id in done or (reason is not None and letter.reason != reason):
                        continue
                    if since_ms is not None and letter.received < since_ms:
                        continue
                    yield letter

    def replayed(self) -> set[str]:
        path = self.dir / REPLAYED
        with contextlib.suppress(FileNotFoundError):
            return set(path.read_text().split())
        return set()

    def mark_replayed(self, ids: Iterable[str]) -> None:
        text = "".join(f"{i}\n" for i in ids)
        if not text:
            return
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / REPLAYED, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class ReplayResult:
    replayed: int = 0  # dead letters taken through the encoder and writer again
    stored: int = 0  # of those, stored in full now
    partial: int = 0  # of those, stored in part, the rest dead-lettered again
    refused_again: int = 0  # of those, dead-lettered again in full (each a new record naming the old one)
    skipped: int = 0  # truncated payloads: not the message that came, so not re-ingested
    readings: int = 0  # readings stored


def replay(store: DeadLetterStore, acking_factory: Callable[[Callable[[int, int], None]], Any], *,
           since_ms: int | None = None, reason: str | None = None, timeout_s: float = 600.0) -> ReplayResult:
    """Re-ingest stored dead letters through the collector's AckingWriter; mark each replayed once settled.

    `acking_factory(ack)` builds the AckingWriter (the caller chooses registry and database) whose dead letters
    go to `store`: what is still refused goes back there as a new record naming the one it replays. Raises
    TimeoutError when the database does not take them in time (what was settled is marked; the rest is
    replayed by the next run)."""
    from collector.acking import Message  # acking imports this module: its types are imported when replaying

    result = ReplayResult()
    pending: dict[int, list[str]] = {}  # message number -> the ids of its dead letters (one per reason)
    by_message: dict[tuple[int, str, bytes], int] = {}  # (received, topic, payload digest) -> message number
    numbers = itertools.count()
    settled: list[str] = []
    lock = threading.Condition()

    def ack(mid: int, _qos: int) -> None:
        with lock:
            settled.extend(pending.pop(mid))
            lock.notify_all()

    writer = acking_factory(ack)
    writer.start()
    left = 0
    started = int(time.time() * 1000)
    this_run: set[str] = set()
    try:
        for letter in store.read(since_ms, reason):
            if letter.stored >= started or letter.replay_of in this_run:
                continue  # refused again by this very run (today's file grows while it is read)
            this_run.add(letter.id)
            if letter.truncated:
                result.skipped += 1
                continue
            key = (letter.received, letter.topic, hashlib.sha256(letter.payload).digest())
            with lock:
                number = by_message.get(key)
                if number is not None and number in pending:  # one message, a dead letter per reason
                    pending[number].append(letter.id)
                    continue
                number = by_message[key] = next(numbers)
                pending[number] = [letter.id]
            writer.put(Message(number, 1, letter.topic, letter.payload, received=letter.received / 1000,
                               replay_of=letter.id))
            result.replayed += 1
        deadline = time.monotonic() + timeout_s
        with lock:
            while pending and time.monotonic() < deadline:
                lock.wait(min(1.0, max(0.01, deadline - time.monotonic())))
            left = len(pending)
    finally:
        writer.stop(timeout=5)
        store.mark_replayed(settled)
    result.stored = writer.outcomes["stored"]
    result.partial = writer.outcomes["partial"]
    result.refused_again = writer.outcomes["dead_lettered"]
    result.readings = writer.stored_readings
    if left:
        msg = f"{left} dead letters were not settled in {timeout_s:.0f}s (is the database up?); run the replay again"
        raise TimeoutError(msg)
    return result
