"""A durable outbox: every reading is stored before it is published and deleted only after the broker's PUBACK.

SQLite in WAL mode. With fsync "full" (the default) a committed reading survives power loss; with
"normal" it survives a crash of the process (SIGKILL) but the last commits may be lost on power
loss, in exchange for fewer writes to the SD card. A batch gets its sequence number in the same
transaction that records it as in flight, so after a crash it is re-sent with the same number and
the collector can recognise the repeat.

Acknowledged batches stay in an archive for a while (`keep_sent_s`): a broker may still lose a
message it acknowledged (Mosquitto drops queued messages past its per-client limit, and loses
shared-subscription messages around its own restart), so the collector audits sequence numbers and
asks for the missing ones again. Each outbox has a stream id, so numbers of a replaced outbox
(a new SD card) are never confused with the old one's.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from edge.ratelimit import summarised
from edge.telemetry import Reading

__all__ = ["Batch", "Outbox", "OverflowPolicy"]

log = structlog.get_logger("kwwk.gateway.outbox")
OverflowPolicy = Literal["drop_oldest", "drop_newest"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL, point TEXT NOT NULL, ts INTEGER NOT NULL,
    value REAL, quality TEXT NOT NULL,
    batch INTEGER  -- sequence number of the batch it is in flight with, NULL while waiting
);
CREATE INDEX IF NOT EXISTS readings_batch ON readings(batch);
CREATE INDEX IF NOT EXISTS readings_ts ON readings(ts);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY, replay INTEGER NOT NULL, created INTEGER NOT NULL,
    acked INTEGER  -- ms when the broker acknowledged it; NULL while in flight
);
CREATE INDEX IF NOT EXISTS batches_acked ON batches(acked);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


#: readings not yet acknowledged by the broker (waiting, or in a batch in flight)
_UNSENT = "(batch IS NULL OR batch IN (SELECT seq FROM batches WHERE acked IS NULL))"


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    replay: bool
    readings: list[Reading]


class Outbox:
    def __init__(self, path: Path | str, *, max_readings: int = 10_000_000, max_age_s: float = 60 * 86400,
                 max_bytes: int = 512 * 2**20,
                 overflow: OverflowPolicy = "drop_oldest", fsync: Literal["full", "normal"] = "full",
                 replay_after_s: float = 10.0, keep_sent_s: float = 3600.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_readings = max_readings
        self.max_bytes = max_bytes
        self.max_age_ms = int(max_age_s * 1000)
        self.overflow = overflow
        self.replay_after_ms = int(replay_after_s * 1000)
        self.keep_sent_ms = int(keep_sent_s * 1000)
        self.dropped: dict[str, int] = {}
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync == 'full' else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._migrate()
        row = self._db.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta(key, value) VALUES ('stream', ?)", (uuid.uuid4().hex[:12],))
            row = self._db.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
        self.stream: str = row[0]
        self._count = self._db.execute(f"SELECT count(*) FROM readings WHERE {_UNSENT}").fetchone()[0]
        self._fresh_turn = True

    def _migrate(self) -> None:
        """Bring an outbox written by an older version up to this schema, keeping its readings."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(batches)")}
        if "acked" not in columns:
            self._db.execute("ALTER TABLE batches ADD COLUMN acked INTEGER")

    # -- writing -------------------------------------------------------------------------------
    def append(self, readings: Iterable[Reading]) -> int:
        """Store readings (one transaction); apply the overflow policy; return how many were stored."""
        rows = list(readings)
        if not rows:
            return 0
        room = self.max_readings - self._count
        if len(rows) > room and self.overflow == "drop_newest":
            self._drop("full_drop_newest", len(rows) - max(room, 0))
            rows = rows[: max(room, 0)]
            if not rows:
                return 0
        with self._tx():
            self._db.executemany("INSERT INTO readings(device, point, ts, value, quality) VALUES (?,?,?,?,?)", rows)
            self._count += len(rows)
            if self._count > self.max_readings:
                self._drop_oldest(self._count - self.max_readings, "full_drop_oldest")
        return len(rows)

    def expire(self, now_ms: int | None = None) -> int:
        """Drop waiting readings older than the age limit (counted, logged)."""
        now_ms = now_ms or int(time.time() * 1000)
        with self._tx():
            cur = self._db.execute("DELETE FROM readings WHERE batch IS NULL AND ts < ?", (now_ms - self.max_age_ms,))
            n = cur.rowcount
            self._count -= n
        if n:
            self._drop("expired", n, deleted=True)
        return n

    def used_bytes(self) -> int:
        pages, free, size = (self._db.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def enforce_size(self) -> int:
        """Over the disk budget: apply the overflow policy to a tenth of what waits (counted, logged)."""
        if self.used_bytes() <= self.max_bytes:
            return 0
        if self.prune_sent(older_than_ms=0):  # the archive goes first: it has been delivered
            return 0
        if self._count == 0:
            return 0
        n = max(1, self._count // 10)
        with self._tx():
            if self.overflow == "drop_oldest":
                self._drop_oldest(n, "size_drop_oldest")
            else:
                cur = self._db.execute("DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE batch IS NULL "
                                       "ORDER BY id DESC LIMIT ?)", (n,))
                self._count -= cur.rowcount
                self._drop("size_drop_newest", cur.rowcount, deleted=True)
        return n

    def _drop_oldest(self, n: int, reason: str) -> None:
        cur = self._db.execute(
            "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE batch IS NULL ORDER BY id LIMIT ?)", (n,))
        self._count -= cur.rowcount
        self._drop(reason, cur.rowcount, deleted=True)

    def _drop(self, reason: str, n: int, deleted: bool = False) -> None:
        if n <= 0:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        # while it overflows: the first drop, then a summary a minute, not a line per poll
        summarised(log, "outbox overflow: readings dropped", reason, count=n, reason=reason, policy=self.overflow,
                   limit=self.max_readings, deleted=deleted)

    # -- publishing ----------------------------------------------------------------------------
    def in_flight(self) -> list[Batch]:
        """Batches numbered but not acknowledged (after a restart: to be re-sent first, same numbers)."""
        out = []
        for seq, replay in self._db.execute("SELECT seq, replay FROM batches WHERE acked IS NULL ORDER BY seq").fetchall():
            out.append(Batch(seq, bool(replay), self._rows("WHERE batch = ? ORDER BY id", (seq,))))
        return out

    def next_batch(self, max_readings: int, now_ms: int | None = None) -> Batch | None:
        """Number the next readings to send. Alternates fresh readings and the backlog so that, after an
        outage, the backlog drains oldest first while current values keep flowing."""
        now_ms = now_ms or int(time.time() * 1000)
        cutoff = now_ms - self.replay_after_ms
        fresh_q = ("WHERE batch IS NULL AND ts >= ? ORDER BY id LIMIT ?", (cutoff, max_readings))
        old_q = ("WHERE batch IS NULL AND ts < ? ORDER BY id LIMIT ?", (cutoff, max_readings))
        order = [(fresh_q, False), (old_q, True)] if self._fresh_turn else [(old_q, True), (fresh_q, False)]
        self._fresh_turn = not self._fresh_turn
        for (where, args), replay in order:
            ids = [r[0] for r in self._db.execute(f"SELECT id FROM readings {where}", args).fetchall()]  # noqa: S608
            if ids:
                break
        else:
            return None
        with self._tx():
            seq = self._next_seq()
            self._db.execute("INSERT INTO batches(seq, replay, created) VALUES (?,?,?)", (seq, int(replay), now_ms))
            self._db.executemany("UPDATE readings SET batch = ? WHERE id = ?", [(seq, i) for i in ids])
        return Batch(seq, replay, self._rows("WHERE batch = ? ORDER BY id", (seq,)))

    def ack(self, seq: int, now_ms: int | None = None) -> None:
        """The broker has the batch: move it to the archive of sent batches."""
        now_ms = now_ms or int(time.time() * 1000)
        with self._tx():
            cur = self._db.execute("UPDATE batches SET acked = ? WHERE seq = ? AND acked IS NULL", (now_ms, seq))
            if cur.rowcount:
                self._count -= self._db.execute("SELECT count(*) FROM readings WHERE batch = ?", (seq,)).fetchone()[0]

    def sent_batch(self, seq: int) -> Batch | None:
        """An acknowledged batch from the archive, to send again on the collector's request."""
        row = self._db.execute("SELECT seq FROM batches WHERE seq = ? AND acked IS NOT NULL", (seq,)).fetchone()
        if row is None:
            return None
        return Batch(seq, True, self._rows("WHERE batch = ? ORDER BY id", (seq,)))

    def prune_sent(self, now_ms: int | None = None, older_than_ms: int | None = None) -> int:
        """Forget archived batches older than the keep time (delivered: this is no loss)."""
        now_ms = now_ms or int(time.time() * 1000)
        limit = now_ms - (self.keep_sent_ms if older_than_ms is None else older_than_ms)
        with self._tx():
            self._db.execute("DELETE FROM readings WHERE batch IN (SELECT seq FROM batches WHERE acked < ?)", (limit,))
            return self._db.execute("DELETE FROM batches WHERE acked < ?", (limit,)).rowcount

    def _next_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        seq = row[0] if row else 0
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?)", (seq + 1,))
        return seq

    def _rows(self, where: str, args: tuple[object, ...]) -> list[Reading]:
        rows = self._db.execute(f"SELECT device, point, ts, value, quality FROM readings {where}", args)  # noqa: S608
        return [Reading(*row) for row in rows]

    # -- state ---------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._count

    def oldest_ts(self) -> int | None:
        row = self._db.execute(f"SELECT min(ts) FROM readings WHERE {_UNSENT}").fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
