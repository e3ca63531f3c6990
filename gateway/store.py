"""The outbox's disk: what the broker did not take in time, in SQLite, in as few writes as the card allows.

The SD card of a Raspberry Pi wears with every block written, so this file is written only when a reading
must survive on the card (the broker did not acknowledge it within the write window, or is unreachable):
- one row per group commit of readings (a "chunk", packed and compressed), not one per reading, no secondary
  index, no AUTOINCREMENT (each of those costs a page per commit);
- 1 KiB pages, WAL, `locking_mode=EXCLUSIVE` (no -shm file, whose mmapped pages would be written back too);
- fsync every `sync_interval_s` (one flush for all commits since the last), or at every commit when 0;
- checkpoints of our own, as soon as the WAL passes a small cap (a checkpoint copies at most that much);
- batch numbers from a small `.seq` file rewritten in place (a page that stays dirty in the page cache:
  a SIGKILL leaves it exact; after a power cut the outbox starts a new stream, so no number is ever reused).

Everything here is blocking and runs on the outbox's own thread (gateway/outbox.py), never on the event loop:
the connection is made on that thread and SQLite's check_same_thread refuses any other.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from edge.telemetry import Reading

__all__ = ["Chunk", "Store", "pack", "stored_readings", "unpack"]

log = structlog.get_logger("kwwk.gateway.outbox")

PAGE_SIZE = 1024
_ROW_OVERHEAD = 40  # bytes a chunk row costs besides its data (header, ids, timestamps), for the size budget
_SEQ_RECORD = 96  # bytes of the .seq file's one record

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,   -- order of arrival
    stream TEXT,              -- with seq: the batch the readings are in flight with; NULL while waiting
    seq INTEGER,
    replay INTEGER NOT NULL DEFAULT 0,
    first_ts INTEGER NOT NULL, last_ts INTEGER NOT NULL, n INTEGER NOT NULL,
    data BLOB NOT NULL        -- pack(readings)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


def pack(readings: Sequence[Reading]) -> bytes:
    """Readings as compressed JSON: compact on the card and in the archive, and readable by any tool."""
    return zlib.compress(json.dumps([list(r) for r in readings], separators=(",", ":")).encode(), 1)


def unpack(data: bytes) -> list[Reading]:
    return [Reading(*row) for row in json.loads(zlib.decompress(data))]


@dataclass(frozen=True, slots=True)
class Chunk:
    """Readings committed together; with a (stream, seq) when they are in flight with that batch."""

    id: int
    stream: str | None
    seq: int | None
    replay: bool
    readings: list[Reading]


class Store:
    def __init__(self, path: Path, *, sync_interval_s: float = 1.0, wal_cap: int = 256 * 1024) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync_interval_s = sync_interval_s
        self.wal_cap = wal_cap
        self.wal_path = Path(f"{path}-wal")
        self.seq_path = Path(f"{path}.seq")
        new = not path.exists()
        self.db = sqlite3.connect(path, isolation_level=None)  # check_same_thread: the outbox thread only
        if new:
            self.db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # ours, bounded: see commit()
        self.db.execute(f"PRAGMA journal_size_limit={wal_cap}")
        self.db.execute(f"PRAGMA synchronous={'FULL' if sync_interval_s <= 0 else 'NORMAL'}")
        self.db.executescript(_SCHEMA)
        self._migrate()
        self._synced = time.monotonic()
        self._unsynced = False
        self.stream, self._next_seq = self._open_stream()
        # readings on disk: waiting (not numbered), and numbered (in flight with a batch); kept as counters,
        # not counted per commit (a scan of a long outage's backlog twenty times a second would cost the CPU)
        self.waiting_n, self.numbered_n = (int(x) for x in self.db.execute(
            "SELECT coalesce(sum(CASE WHEN seq IS NULL THEN n END), 0), "
            "coalesce(sum(CASE WHEN seq IS NOT NULL THEN n END), 0) FROM chunks").fetchone())

    # -- batch numbers --------------------------------------------------------------------------
    def _meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _open_stream(self) -> tuple[str, int]:
        """The stream to number in and its next number. The .seq file is exact after a clean stop or a crash
        of this process (its page survives in the page cache); after a reboot without a clean stop (power
        cut) its last numbers may never have reached the card, so numbering starts a new stream at 0."""
        stream = self._meta("stream")
        on_disk = self.db.execute("SELECT max(seq) FROM chunks WHERE stream = ?", (stream,)).fetchone()[0]
        floor = max(int(self._meta("next_seq") or 0), -1 if on_disk is None else on_disk + 1)
        record = self._read_seq_file()
        boot = _boot_id()
        if stream is None:
            stream, nxt = uuid.uuid4().hex[:12], 0
        elif record is None and self._meta("next_seq") is not None:  # from before the .seq file: meta was exact
            nxt = floor
        elif record is not None and record[0] == stream and (record[3] or record[2] == boot):
            nxt = max(record[1], floor)
        else:
            old = stream
            stream, nxt = uuid.uuid4().hex[:12], 0
            log.warning("the outbox's batch numbers are not known for sure (a reboot without a clean stop, or its "
                        ".seq file missing or unreadable): new stream, so no batch number is reused",
                        old_stream=old, stream=stream, last_known_seq=record[1] if record else None)
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('stream', ?)", (stream,))
        self.db.execute("DELETE FROM meta WHERE key = 'next_seq'")
        self._seq_fd = os.open(self.seq_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._write_seq(stream, nxt, clean=False, boot=boot)
        os.fsync(self._seq_fd)  # "not clean, this boot" must be durable before any number is used
        self._boot = boot
        return stream, nxt

    def _read_seq_file(self) -> tuple[str, int, str, bool] | None:
        try:
            stream, nxt, boot, clean = self.seq_path.read_text().split()[:4]
            return stream, int(nxt), boot, clean == "1"
        except (OSError, ValueError):
            return None

    def _write_seq(self, stream: str, nxt: int, *, clean: bool, boot: str | None = None) -> None:
        record = f"{stream} {nxt} {boot or self._boot} {int(clean)}".ljust(_SEQ_RECORD - 1) + "\n"
        os.pwrite(self._seq_fd, record.encode(), 0)

    def assign_seq(self) -> int:
        """The next batch number; written in place (no fsync: the page cache survives a crash of ours)."""
        seq = self._next_seq
        self._next_seq += 1
        self._write_seq(self.stream, self._next_seq, clean=False)
        return seq

    # -- writing --------------------------------------------------------------------------------
    def insert(self, groups: Sequence[tuple[str | None, int | None, bool, Sequence[Reading]]],
               packed: Sequence[bytes] | None = None) -> list[int]:
        """Commit chunks (stream, seq, replay, readings), packed already if `packed` is given, in one
        transaction; return their ids."""
        ids = []
        with self._tx():
            for i, (stream, seq, replay, readings) in enumerate(groups):
                cur = self.db.execute(
                    "INSERT INTO chunks(stream, seq, replay, first_ts, last_ts, n, data) VALUES (?,?,?,?,?,?,?)",
                    (stream, seq, int(replay), min(r.ts for r in readings), max(r.ts for r in readings),
                     len(readings), packed[i] if packed is not None else pack(readings)))
                ids.append(int(cur.lastrowid or 0))
                if seq is None:
                    self.waiting_n += len(readings)
                else:
                    self.numbered_n += len(readings)
        return ids

    def delete_numbered(self, ids: Sequence[int], readings: int) -> None:
        """Forget the chunks of acknowledged batches (`readings`: how many they held)."""
        with self._tx():
            self.db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in ids])
        self.numbered_n -= readings
        self.checkpoint_if_due()

    def take_waiting(self, max_readings: int, replay_before_ts: int) -> tuple[Chunk, list[int]] | None:
        """Number the oldest waiting chunks (up to max_readings readings, at least one chunk) as one batch."""
        rows = self.db.execute("SELECT id, n FROM chunks WHERE seq IS NULL ORDER BY id LIMIT ?",
                               (max(1, max_readings),)).fetchall()
        take: list[int] = []
        total = 0
        for cid, n in rows:
            if take and total + n > max_readings:
                break
            take.append(cid)
            total += n
        if not take:
            return None
        readings = [r for cid in take for r in self._chunk_readings(cid)]
        replay = min(r.ts for r in readings) < replay_before_ts
        seq = self.assign_seq()
        with self._tx():
            self.db.executemany("UPDATE chunks SET stream = ?, seq = ?, replay = ? WHERE id = ?",
                                [(self.stream, seq, int(replay), cid) for cid in take])
        self.waiting_n -= total
        self.numbered_n += total
        return Chunk(take[0], self.stream, seq, replay, readings), take

    def _chunk_readings(self, cid: int) -> list[Reading]:
        return unpack(self.db.execute("SELECT data FROM chunks WHERE id = ?", (cid,)).fetchone()[0])

    def in_flight(self) -> list[tuple[Chunk, list[int]]]:
        """Batches numbered before a crash or stop: to be sent again first, with the same numbers."""
        out: dict[tuple[str, int], tuple[list[int], list[Reading], bool]] = {}
        for cid, stream, seq, replay, data in self.db.execute(
                "SELECT id, stream, seq, replay, data FROM chunks WHERE seq IS NOT NULL ORDER BY id"):
            ids, readings, _ = out.setdefault((stream, seq), ([], [], bool(replay)))
            ids.append(cid)
            readings.extend(unpack(data))
        return [(Chunk(ids[0], stream, seq, replay, readings), ids)
                for (stream, seq), (ids, readings, replay) in sorted(out.items(), key=lambda kv: kv[1][0][0])]

    def drop(self, n_readings: int, *, newest: bool, cutoff_ts: int | None = None) -> int:
        """Delete waiting chunks, oldest (or newest) first, until at least n_readings readings are gone (or,
        with cutoff_ts, every waiting chunk older than it). Steps of 500 rows: the WAL stays bounded."""
        gone = 0
        order = "DESC" if newest else "ASC"
        while gone < n_readings or cutoff_ts is not None:
            where = "seq IS NULL" + (" AND last_ts < ?" if cutoff_ts is not None else "")
            args: tuple[int, ...] = (cutoff_ts,) if cutoff_ts is not None else ()
            rows = self.db.execute(f"SELECT id, n FROM chunks WHERE {where} ORDER BY id {order} LIMIT 500",  # noqa: S608
                                   args).fetchall()
            if not rows:
                break
            if cutoff_ts is None:
                step, need = [], n_readings - gone
                for cid, n in rows:
                    if need <= 0:
                        break
                    step.append((cid, n))
                    need -= n
                rows = step
            with self._tx():
                self.db.executemany("DELETE FROM chunks WHERE id = ?", [(cid,) for cid, _ in rows])
            gone += sum(n for _, n in rows)
            self.waiting_n -= sum(n for _, n in rows)
            self.checkpoint_if_due()
        return gone

    # -- size ------------------------------------------------------------------------------------
    def live_bytes(self) -> int:
        pages, free = (self.db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count"))
        return (pages - free) * PAGE_SIZE

    def disk_bytes(self) -> int:
        """Everything the outbox has on the card: database, WAL, .seq file."""
        total = 0
        for p in (self.path, self.wal_path, self.seq_path):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    @staticmethod
    def cost(packed: bytes) -> int:
        """What committing a packed chunk adds to the database, roughly (for the size budget)."""
        return len(packed) + _ROW_OVERHEAD

    def oldest_ts(self) -> int | None:
        """The first ts of the oldest chunk on disk (chunks come in order: the first row, by its rowid)."""
        row = self.db.execute("SELECT first_ts FROM chunks ORDER BY id LIMIT 1").fetchone()
        return row[0] if row else None

    @property
    def unsynced(self) -> bool:
        return self._unsynced and self.sync_interval_s > 0

    # -- durability --------------------------------------------------------------------------------
    def checkpoint_if_due(self) -> None:
        """Move the WAL into the database once it passes its cap: each checkpoint copies a bounded amount."""
        try:
            size = self.wal_path.stat().st_size
        except FileNotFoundError:
            return
        if size > self.wal_cap:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._synced = time.monotonic()  # a checkpoint syncs the WAL and the database
            self._unsynced = False

    def sync_if_due(self, force: bool = False) -> None:
        """One fsync for every commit since the last: power loss loses at most sync_interval_s of commits."""
        if not self.unsynced or (not force and time.monotonic() - self._synced < self.sync_interval_s):
            return
        fd = os.open(self.wal_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._synced = time.monotonic()
        self._unsynced = False

    def close(self) -> None:
        """A clean stop: the WAL goes into the database, the next number is recorded as exact."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._write_seq(self.stream, self._next_seq, clean=True)
            os.fsync(self._seq_fd)
        finally:
            os.close(self._seq_fd)
            self.db.close()

    def _migrate(self) -> None:
        """An outbox written by an older version (a row per reading): its unsent readings become chunks."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "readings" not in tables:
            return
        stream = self._meta("stream")
        with self._tx():
            old = self.db.execute(
                "SELECT r.device, r.point, r.ts, r.value, r.quality, r.batch, b.replay FROM readings r "
                "LEFT JOIN batches b ON b.seq = r.batch WHERE r.batch IS NULL OR b.acked IS NULL ORDER BY r.id")
            groups: dict[int | None, list[Reading]] = {}
            replays: dict[int | None, bool] = {}
            for device, point, ts, value, quality, batch, replay in old:
                groups.setdefault(batch, []).append(Reading(device, point, ts, value, quality))
                replays[batch] = bool(replay)
            for batch, readings in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
                for i in range(0, len(readings), 500):
                    part = readings[i:i + 500]
                    self.db.execute(
                        "INSERT INTO chunks(stream, seq, replay, first_ts, last_ts, n, data) VALUES (?,?,?,?,?,?,?)",
                        (None if batch is None else stream, batch, int(replays[batch]), min(r.ts for r in part),
                         max(r.ts for r in part), len(part), pack(part)))
            self.db.execute("DROP TABLE readings")
            self.db.execute("DROP TABLE IF EXISTS batches")
        self.db.execute("VACUUM")
        log.info("outbox converted to chunks", path=str(self.path), readings=sum(len(g) for g in groups.values()))

    def _tx(self) -> _Tx:
        self._unsynced = True
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:
        return "unknown"


def stored_readings(path: Path | str, mode: Literal["all", "waiting", "in_flight"] = "all") -> list[Reading]:
    """The readings in an outbox file that is not open (a copy, or a stopped gateway's): for tools and tests."""
    db = sqlite3.connect(path)
    try:
        where = {"all": "", "waiting": "WHERE seq IS NULL", "in_flight": "WHERE seq IS NOT NULL"}[mode]
        return [r for (data,) in db.execute(f"SELECT data FROM chunks {where} ORDER BY id") for r in unpack(data)]  # noqa: S608
    finally:
        db.close()
