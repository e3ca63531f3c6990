"""A durable outbox: every reading is stored before it is published and deleted only after the broker's PUBACK.

SQLite in WAL mode. With fsync "full" (the default) a committed reading survives power loss; with
"normal" it survives a crash of the process (SIGKILL) but the last commits may be lost on power
loss, in exchange for fewer writes to the SD card. A batch gets its sequence number in the same
transaction that records it as in flight, so after a crash it is re-sent with the same number and
the collector can recognise the repeat.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

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
CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY, replay INTEGER NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    replay: bool
    readings: list[Reading]


class Outbox:
    def __init__(self, path: Path | str, *, max_readings: int = 5_000_000, max_age_s: float = 30 * 86400,
                 overflow: OverflowPolicy = "drop_oldest", fsync: Literal["full", "normal"] = "full",
                 replay_after_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_readings = max_readings
        self.max_age_ms = int(max_age_s * 1000)
        self.overflow = overflow
        self.replay_after_ms = int(replay_after_s * 1000)
        self.dropped: dict[str, int] = {}
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync == 'full' else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._count = self._db.execute("SELECT count(*) FROM readings").fetchone()[0]
        self._fresh_turn = True

    # -- writing -------------------------------------------------------------------------------
    def append(self, readings: Iterable[Reading]) -> int:
        """Store readings (one transaction); apply the overflow policy; return how many were stored."""
        rows = [(r.device, r.point, r.ts, r.value, r.quality) for r in readings]
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

    def _drop_oldest(self, n: int, reason: str) -> None:
        cur = self._db.execute(
            "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE batch IS NULL ORDER BY id LIMIT ?)", (n,))
        self._count -= cur.rowcount
        self._drop(reason, cur.rowcount, deleted=True)

    def _drop(self, reason: str, n: int, deleted: bool = False) -> None:
        if n <= 0:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        log.warning("outbox overflow: readings dropped", reason=reason, count=n, policy=self.overflow,
                    limit=self.max_readings, deleted=deleted)

    # -- publishing ----------------------------------------------------------------------------
    def in_flight(self) -> list[Batch]:
        """Batches numbered but not acknowledged (after a restart: to be re-sent first, same numbers)."""
        out = []
        for seq, replay in self._db.execute("SELECT seq, replay FROM batches ORDER BY seq").fetchall():
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

    def ack(self, seq: int) -> None:
        """The broker has the batch: forget it."""
        with self._tx():
            n = self._db.execute("DELETE FROM readings WHERE batch = ?", (seq,)).rowcount
            self._db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            self._count -= n

    def _next_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        seq = row[0] if row else 0
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?)", (seq + 1,))
        return seq

    def _rows(self, where: str, args: tuple[object, ...]) -> list[Reading]:
        rows = self._db.execute(f"SELECT device, point, ts, value, quality FROM readings {where}", args)  # noqa: S608
        return [Reading.model_construct(device=d, point=p, ts=t, value=v, quality=q) for d, p, t, v, q in rows]

    # -- state ---------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._count

    def oldest_ts(self) -> int | None:
        row = self._db.execute("SELECT min(ts) FROM readings").fetchone()
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
