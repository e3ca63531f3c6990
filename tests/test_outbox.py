"""The outbox's own behaviour (issue 15): what it writes to the card and when, that its SQLite work stays off the
event loop, its bounds (overflow, archive), and what survives a stop, a restart, an upgrade and a reboot.

Most tests use the Outbox in process, without a broker (`online` is what the uplink sets on connect); the write
budget and the hung broker run a GatewayService on real Mosquitto and the simulator (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from edge.cell import CellConfig, load_cell
from edge.sim import SimulatorServer
from edge.telemetry import Reading
from gateway.outbox import Archive, Outbox
from gateway.settings import gateway_mqtt
from gateway.store import _boot_id, stored_readings
from kwwk.dev.localservers import Mosquitto
from tests.conftest import ROOT, start_simulator
from tests.helpers import Recorder, RecordingGateway, wait_for, wire_readings
from tests.test_gateway_reliability import _metric as _sample
from tests.test_gateway_reliability import _metrics as _scrape

Key = tuple[str, str, int]  # device, point, ts
_ts = iter(range(1_700_000_000_000, 2**62))  # distinct, increasing timestamps across a test


def _readings(n: int, device: str = "m1") -> list[Reading]:
    """n readings of one poll-like group; each with a timestamp of its own, later than any before (so a set of
    keys tells them apart and an order by ts is the order they were made in)."""
    return [Reading(device, f"p{i % 10}", next(_ts), float(i)) for i in range(n)]


def _keys(readings: list[Reading]) -> list[Key]:
    return [(r.device, r.point, r.ts) for r in readings]


def _files(path: Path) -> dict[str, int]:
    """Size of each outbox file on disk (0 when absent)."""
    out = {}
    for suffix in ("", "-wal", ".seq"):
        p = Path(f"{path}{suffix}")
        out[p.name] = p.stat().st_size if p.exists() else 0
    return out


async def _metric(port: int, name: str, **labels: str) -> float:
    """A sample of the gateway's /metrics as a user reads it (0 when not exported yet); the request runs in a
    thread, since the gateway serves it from this event loop."""
    return _sample(await asyncio.to_thread(_scrape, port), name, **labels)


async def _cell(tmp_path: Path, name: str, after: str, outbox: str = "") -> tuple[SimulatorServer, CellConfig]:
    """A test cell served by the simulator, with an `outbox:` line added after the gateway's `after` line."""
    text = (ROOT / "tests/data" / name).read_text()
    if outbox:
        assert after in text
        text = text.replace(after, f"{after}    outbox: {outbox}\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / name).write_text(text)
    sim, cell = await start_simulator(tmp_path / "src" / name, tmp_path / "cells")
    return sim, load_cell(cell)


def _recorded(recorder: Recorder) -> set[Key]:
    return {k for m in recorder.snapshot() for k in _keys(wire_readings(m))}


async def _recorder(port: int) -> Recorder:
    recorder = Recorder(port)
    await wait_for(recorder.client.is_connected, 10, "the recorder to connect")
    await asyncio.sleep(0.5)  # its subscription, sent on connect, is in place
    return recorder


# --- 1. the write budget, on real Mosquitto ----------------------------------------------------------------------

async def test_a_connected_gateway_writes_nothing_to_the_card(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """~10 s of 1 s polls of two meters with the broker acknowledging: no reading is committed (stats and
    /metrics), the outbox files do not grow after the connection, and every reading reaches the broker."""
    sim, cfg = await _cell(tmp_path, "twocell.yaml", "    poll_interval: 1\n")
    recorder = await _recorder(mosquitto.port)
    path = tmp_path / "ob.sqlite"
    gw = RecordingGateway(cfg, "gw-two", gateway_mqtt(port=mosquitto.port), path)
    initial = _files(path)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    io_before = _proc_io()
    try:
        await wait_for(lambda: gw.uplink.connected and _recorded(recorder), 15, "the first telemetry")
        # polls that finished before the connection were committed ("offline": documented); from now on none is
        before, files_before = dict(gw.outbox.stats.committed), _files(path)
        commits_before = gw.outbox.stats.commits
        await asyncio.sleep(10)  # the steady state itself: time has to pass with the gateway polling
        await wait_for(lambda: gw.outbox.depth == 0, 10, "every reading acknowledged")
        produced = set(_keys(list(gw.produced)))
        await wait_for(lambda: produced <= _recorded(recorder), 15, "every reading at the broker")
        committed, files_after, commits = dict(gw.outbox.stats.committed), _files(path), gw.outbox.stats.commits

        async def all_published() -> bool:
            return await _metric(gw.health.port, "kwwk_gateway_published_readings_total") >= len(produced)

        await wait_for(all_published, 10, "the published readings in /metrics")
        window = await _metric(gw.health.port, "kwwk_gateway_outbox_committed_readings_total", why="window")
        offline = await _metric(gw.health.port, "kwwk_gateway_outbox_committed_readings_total", why="offline")
        scraped_commits = await _metric(gw.health.port, "kwwk_gateway_outbox_commits_total")
    finally:
        stop.set()
        await task
        await sim.stop()
        recorder.close()
    io_after = _proc_io()
    print(f"\nwrite budget: {len(produced)} readings in ~10 s; committed before the connection {before}, "
          f"after {committed}; files at start {initial}, at the connection {files_before}, after {files_after}; "
          f"this process wrote {io_after.get('write_bytes', 0) - io_before.get('write_bytes', 0)} bytes to storage")
    assert len({k[2] for k in produced if k[0] == "grid"}) >= 8, "the gateway polled throughout"
    assert committed == before and commits == commits_before, "nothing committed while the broker acknowledged"
    assert "window" not in committed
    assert window == 0
    assert offline == committed.get("offline", 0) and scraped_commits == commits, "/metrics counts the same"
    assert files_after == files_before, "the outbox files did not grow"
    assert files_after[path.name] == initial[path.name], "the database file stays at its initial size"


def _proc_io() -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}
    except OSError:
        return {}


# --- 2. a broker that takes the connection but does not answer -------------------------------------------------------

async def test_a_hung_broker_gets_the_readings_committed_after_the_window_and_then_all(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """SIGSTOP the broker (the kernel still takes our bytes; no PUBACK comes): readings unacknowledged after
    write_window_s (1 s here) are committed ("window"); after SIGCONT all of them arrive and the disk empties."""
    sim, cfg = await _cell(tmp_path, "tinycell.yaml", "    poll_interval: 0.5\n", "{write_window_s: 1}")
    recorder = await _recorder(mosquitto.port)
    gw = RecordingGateway(cfg, "gw-tiny", gateway_mqtt(port=mosquitto.port), tmp_path / "ob.sqlite")
    assert gw.outbox.write_window_s == 1
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    assert mosquitto.proc is not None
    store = gw.outbox._store
    try:
        await wait_for(lambda: gw.uplink.connected and _recorded(recorder), 15, "the first telemetry")
        assert "window" not in gw.outbox.stats.committed
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: gw.outbox.stats.committed.get("window", 0) > 0, 10,
                           "the unacknowledged readings committed after the write window")
            on_disk = store.waiting_n + store.numbered_n
            await asyncio.sleep(2)  # more polls while the broker is frozen
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        taken = set(_keys(list(gw.produced)))
        await wait_for(lambda: taken <= _recorded(recorder), 60, "every reading at the broker after SIGCONT")
        await wait_for(lambda: store.waiting_n + store.numbered_n == 0, 30, "the disk backlog to empty")
        committed = dict(gw.outbox.stats.committed)
    finally:
        stop.set()
        await task
        await sim.stop()
        recorder.close()
    print(f"\nhung broker: committed {committed}, {on_disk} readings on disk at the first window commit, "
          f"{len(taken)} readings taken, all delivered")
    assert on_disk > 0, "the window commit put readings on disk"
    assert committed["window"] > 0


# --- 3. no SQLite on the event loop's thread ---------------------------------------------------------------------

class _Trace:
    """Every SQL statement the outbox's connection runs, with the thread that ran it."""

    def __init__(self, outbox: Outbox) -> None:
        self.threads: list[str] = []
        outbox._pool.submit(outbox._store.db.set_trace_callback, self).result()

    def __call__(self, _statement: str) -> None:
        self.threads.append(threading.current_thread().name)


async def test_no_sqlite_call_runs_on_the_event_loop_thread(tmp_path: Path) -> None:
    """Appends offline and online, batches from RAM and from the backlog with their acks, a window commit, a drop
    of a large backlog, age expiry, close: every statement ran on the outbox's thread."""
    ob = Outbox(tmp_path / "ob.sqlite", max_readings=50_000, write_window_s=0)
    trace = _Trace(ob)
    loop_thread = threading.current_thread().name
    try:
        await asyncio.gather(*(ob.append(_readings(500)) for _ in range(100)))  # 50,000 offline
        assert ob.depth == 50_000
        await ob.append(_readings(10))  # full: drop_oldest deletes the oldest chunk
        assert ob.depth <= 50_000 and ob.dropped["full_drop_oldest"] >= 10
        ob.online = True
        await ob.append(_readings(20))
        for _ in range(4):  # fresh and backlog alternate
            batch = await ob.next_batch(100)
            assert batch is not None
            await ob.ack(batch.key)
        await ob.append(_readings(20))
        unacked = await ob.next_batch(100)
        await ob.commit_overdue()  # write window 0: the unacknowledged batch is committed with its number
        assert unacked is not None and ob.stats.committed.get("window", 0) > 0
        await ob.ack(unacked.key)
        await ob.maintain(now_ms=2**62)  # every waiting reading (~49,500) is past the age limit
        assert ob.dropped["expired"] > 40_000 and ob.depth == 0
        await ob.append(_readings(5))
    finally:
        await ob.close()
    print(f"\n{len(trace.threads)} statements traced, on threads {sorted(set(trace.threads))}")
    assert len(trace.threads) > 200
    assert loop_thread not in trace.threads
    assert {t.split("_")[0] for t in trace.threads} == {"kwwk-outbox"}


async def test_the_event_loop_keeps_ticking_while_a_large_backlog_is_deleted(tmp_path: Path) -> None:
    """200,000 readings offline (10,000 chunks), then expired by maintain(): a ticker on the loop measures how
    late it wakes (printed, not asserted); all of them are dropped and counted, on the outbox's thread."""
    # chunks of 20 readings: an outage's backlog at one commit per poll has a row per poll, not per 500
    ob = Outbox(tmp_path / "ob.sqlite", max_age_s=60, chunk_readings=20)
    trace = _Trace(ob)
    loop = asyncio.get_running_loop()
    lateness: dict[str, list[float]] = {"append": [], "expire": []}
    phase = ["append"]
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = loop.time()
            await asyncio.sleep(0.01)
            lateness[phase[0]].append(loop.time() - t - 0.01)

    rounds = [[_readings(1000) for _ in range(20)] for _ in range(10)]  # made before the ticker starts
    tick = asyncio.create_task(ticker())
    try:
        t0 = time.perf_counter()
        for groups in rounds:  # 20 pollers finishing together share a commit
            await asyncio.gather(*(ob.append(g) for g in groups))
        t_append = time.perf_counter() - t0
        assert ob.depth == 200_000
        phase[0] = "expire"
        t0 = time.perf_counter()
        await ob.maintain()  # the readings' timestamps are from 2023: past the 60 s limit
        t_expire = time.perf_counter() - t0
        done.set()
        await tick
    finally:
        done.set()
        await ob.close()
    assert ob.dropped == {"expired": 200_000}
    assert ob.depth == 0
    assert {t.split("_")[0] for t in trace.threads} == {"kwwk-outbox"}
    for name, late in lateness.items():
        late_ms = sorted(x * 1000 for x in late) or [0.0]
        p99 = late_ms[min(len(late_ms) - 1, int(len(late_ms) * 0.99))]
        print(f"\nloop lateness while {name}: {len(late)} ticks, p99 {p99:.1f} ms, max {late_ms[-1]:.1f} ms")
    print(f"appending 200,000 readings offline took {t_append:.2f} s, expiring them {t_expire:.2f} s")


# --- 4. overflow ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_a_full_outbox_applies_its_policy(tmp_path: Path, policy: str, online: bool) -> None:
    """max_readings 100, 25 polls of 10 readings (alone, then two pollers at once): drop_oldest keeps the newest,
    drop_newest the oldest; what went is counted; once an append returns the depth is never above the bound.

    While appends are under way the depth also counts the readings being taken in (a drop of the oldest runs
    meanwhile on the outbox thread), so a sampler on the loop can see it above the bound for that moment: that
    peak is printed, not asserted."""
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path, max_readings=100, overflow=policy)  # type: ignore[arg-type]
    ob.online = online
    order: list[Reading] = []  # in the order the outbox took them
    peak = transient = 0
    sampling = True

    async def sample() -> None:
        nonlocal transient
        while sampling:
            transient = max(transient, ob.depth)
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    try:
        for _ in range(15):  # one poller
            group = _readings(10)
            order.extend(group)
            await ob.append(group)
            peak = max(peak, ob.depth)
        for _ in range(5):  # two pollers finishing together
            a, b = _readings(10, "m1"), _readings(10, "m2")
            order.extend(a + b)
            await asyncio.gather(ob.append(a), ob.append(b))
            peak = max(peak, ob.depth)
        depth = ob.depth
    finally:
        sampling = False
        await sampler
        await ob.close()
    kept = stored_readings(path)
    reason = f"full_{policy}"
    print(f"\n{policy} ({'online' if online else 'offline'}): kept {len(kept)}, dropped {ob.dropped}, "
          f"depth at most {peak} after an append, {transient} while appends were under way")
    assert peak <= 100, "once an append returned, the depth never passed max_readings"
    assert set(ob.dropped) == {reason}
    assert depth == len(kept) == len(order) - ob.dropped[reason], "every reading is kept or counted as dropped"
    assert len(kept) >= 80
    kept_keys = set(_keys(kept))
    gone = [r for r in order if (r.device, r.point, r.ts) not in kept_keys]
    if policy == "drop_oldest":
        assert max(r.ts for r in gone) < min(r.ts for r in kept), "the newest are kept"
        assert set(_keys(order[-20:])) <= kept_keys
    else:
        assert _keys(kept) == _keys(order[:100]), "the first 100 are kept, in order"


async def test_a_lowered_max_readings_bounds_an_existing_backlog(tmp_path: Path) -> None:
    """The gateway restarted with a smaller max_readings than its outbox holds (the operator lowered it):
    the next append brings the depth down to the bound (as the outbox before issue 15 did), drop_oldest. Whole
    chunks go (the readings of one commit, at most batch_readings): at most one chunk more than needed."""
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path)
    await asyncio.gather(*(ob.append(_readings(100)) for _ in range(50)))
    await ob.close()
    ob = Outbox(path, max_readings=1000)
    try:
        assert ob.depth == 5000
        await ob.append(_readings(10))
        depth, dropped = ob.depth, dict(ob.dropped)
    finally:
        await ob.close()
    print(f"\nmax_readings 1000 over a backlog of 5000: after one append depth {depth}, dropped {dropped}")
    assert depth <= 1000, "the bound applies to what the outbox already holds"
    assert depth > 1000 - 500 and dropped == {"full_drop_oldest": 5010 - depth}, "no more than a chunk too many"


# --- 5. the archive of acknowledged batches -------------------------------------------------------------------

def test_the_archive_is_bounded_by_bytes_and_age() -> None:
    groups = [_readings(50) for _ in range(20)]
    probe = Archive(3600, 2**30)
    probe.put(("s", 0), groups[0], now=0)
    size = probe.bytes
    archive = Archive(keep_s=100, max_bytes=int(size * 5.5))  # room for five batches
    for seq, group in enumerate(groups):
        archive.put(("s", seq), group, now=float(seq))
        assert archive.bytes <= archive.max_bytes
    assert len(archive) == 5 and archive.evicted == 15
    assert [archive.get(("s", seq)) for seq in range(15)] == [None] * 15, "the oldest went first"
    assert [archive.get(("s", seq)) for seq in range(15, 20)] == groups[15:]
    archive.prune(now=19 + 100 - 2.5)  # seqs 15 and 16 are past keep_s (100 s), the others not
    assert len(archive) == 3 and archive.evicted == 17
    assert archive.get(("s", 16)) is None and archive.get(("s", 17)) == groups[17]
    archive.prune(now=10_000)
    assert len(archive) == 0 and archive.bytes == 0 and archive.evicted == 20


async def test_sent_batch_returns_an_acknowledged_batch_until_it_is_evicted(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "ob.sqlite", keep_sent_s=60)
    ob.online = True
    try:
        sent = []
        for _ in range(3):
            await ob.append(_readings(30))
            batch = await ob.next_batch(100)
            assert batch is not None
            await ob.ack(batch.key)
            sent.append(batch)
        assert ob.sent_batch((ob.stream, 99)) is None
        for batch in sent:
            again = ob.sent_batch(batch.key)
            assert again is not None and again.key == batch.key and again.readings == batch.readings
            assert again.replay, "a batch sent again is a replay"
        ob.archive.prune(now=time.monotonic() + 61)
        assert [ob.sent_batch(b.key) for b in sent] == [None] * 3
        assert ob.archive.evicted == 3
    finally:
        await ob.close()


# --- 6. an outbox of the previous version --------------------------------------------------------------------

_OLD_SCHEMA = """
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
"""  # the DDL of gateway/outbox.py before the chunks (git show bf7e9d3:gateway/outbox.py)


async def test_an_outbox_of_the_old_schema_is_upgraded(tmp_path: Path) -> None:
    """Waiting readings, a batch in flight (seq 7) and an acknowledged one (seq 5) in the old row-per-reading
    schema: the stream is kept, seq 7 is offered again with its number, the waiting readings are offered,
    the acknowledged ones are gone, and new batches are numbered from next_seq (8) on."""
    path = tmp_path / "ob.sqlite"
    acked, flying, waiting = _readings(3), _readings(4, "m2"), _readings(1200, "m3")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_OLD_SCHEMA)
    db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [("stream", "oldstream123"), ("next_seq", 8)])
    db.executemany("INSERT INTO batches(seq, replay, created, acked) VALUES (?,?,?,?)",
                   [(5, 0, 1000, 2000), (7, 1, 3000, None)])
    for batch, rows in ((5, acked), (7, flying), (None, waiting)):
        db.executemany("INSERT INTO readings(device, point, ts, value, quality, batch) VALUES (?,?,?,?,?,?)",
                       [(*r, batch) for r in rows])
    db.close()
    assert not Path(f"{path}.seq").exists()

    ob = Outbox(path)
    try:
        assert ob.stream == "oldstream123"
        assert ob.depth == len(flying) + len(waiting)
        again = ob.in_flight()
        assert [(b.stream, b.seq, b.replay) for b in again] == [("oldstream123", 7, True)]
        assert again[0].readings == flying
        offered = []
        while (batch := await ob.next_batch(500)) is not None:
            offered.append(batch)
        assert [b.seq for b in offered] == list(range(8, 8 + len(offered))), "numbered from next_seq on"
        assert [r for b in offered for r in b.readings] == waiting, "the waiting readings, in order"
        for batch in [*again, *offered]:
            await ob.ack(batch.key)
        assert ob.depth == 0
    finally:
        await ob.close()
    assert stored_readings(path) == []
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert "readings" not in tables and "batches" not in tables
    ob = Outbox(path)
    try:
        ob.online = True
        await ob.append(_readings(5))
        batch = await ob.next_batch(500)
        assert batch is not None and batch.key == ("oldstream123", offered[-1].seq + 1)
    finally:
        await ob.close()


# --- 7. stream continuity ------------------------------------------------------------------------------------

def _seq_record(path: Path) -> list[str]:
    return Path(f"{path}.seq").read_text().split()


def _rewrite_seq(path: Path, boot: str | None = None, clean: bool | None = None) -> None:
    """Change the .seq record's boot id and clean flag, as a reboot (and a power cut) would leave them."""
    stream, nxt, old_boot, old_clean = _seq_record(path)
    record = f"{stream} {nxt} {boot or old_boot} {int(clean) if clean is not None else old_clean}"
    Path(f"{path}.seq").write_text(record.ljust(95) + "\n")


async def _numbers(path: Path, n: int = 2) -> tuple[str, list[int]]:
    """Open the outbox, send and acknowledge n batches, close it: its stream and the numbers used."""
    ob = Outbox(path)
    ob.online = True
    try:
        seqs = []
        for _ in range(n):
            await ob.append(_readings(10))
            batch = await ob.next_batch(100)
            assert batch is not None
            await ob.ack(batch.key)
            seqs.append(batch.seq)
        return ob.stream, seqs
    finally:
        await ob.close()


async def test_the_stream_and_its_numbers_continue_across_a_stop_and_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite"
    boot_id = _boot_id()
    stream, first = await _numbers(path)
    assert first == [0, 1]
    assert _seq_record(path)[1:] == ["2", boot_id, "1"], "a clean stop records the next number as exact"
    again, second = await _numbers(path)
    assert (again, second) == (stream, [2, 3]), "after a clean stop: same stream, numbers continue"
    _rewrite_seq(path, clean=False)  # a crash of the process (SIGKILL): same boot, not clean
    again, third = await _numbers(path)
    assert (again, third) == (stream, [4, 5]), "after a crash of the process: same stream, numbers continue"
    _rewrite_seq(path, boot="0" * 32, clean=True)  # stopped cleanly, then the machine rebooted
    again, fourth = await _numbers(path)
    assert (again, fourth) == (stream, [6, 7]), "a clean stop before a reboot: same stream"


async def test_a_reboot_without_a_clean_stop_starts_a_new_stream(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite"
    stream, first = await _numbers(path, 3)
    assert first == [0, 1, 2]
    _rewrite_seq(path, boot="0" * 32, clean=False)  # a power cut: another boot, not clean
    new, numbers = await _numbers(path)
    assert new != stream and numbers == [0, 1], "a new stream, numbered from 0: no number reused"
    again, more = await _numbers(path)
    assert (again, more) == (new, [2, 3])


# --- 8. a clean stop loses nothing -------------------------------------------------------------------------------

async def test_a_clean_stop_commits_what_waited_in_ram(tmp_path: Path) -> None:
    """Broker connected, nothing acknowledged: a batch sent (numbered) and readings not sent yet, both only in
    RAM. close() commits them; reopened, the batch is in flight again with its number, the rest waits."""
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path)
    ob.online = True
    try:
        sent_readings, unsent = _readings(40), _readings(25, "m2")
        await ob.append(sent_readings)
        batch = await ob.next_batch(100)
        assert batch is not None and batch.readings == sent_readings
        await ob.append(unsent)
        assert ob.in_ram == 65 and ob.disk_bytes() == _files_total(path)
        assert not ob.stats.committed, "nothing on the card yet"
    finally:
        await ob.close()
    assert ob.stats.committed == {"offline": 65}
    assert stored_readings(path, "in_flight") == sent_readings
    assert stored_readings(path, "waiting") == unsent
    ob = Outbox(path)
    try:
        assert ob.depth == 65
        [again] = ob.in_flight()
        assert again.key == batch.key and again.readings == sent_readings
        ob.online = True
        await ob.ack(again.key)
        rest = await ob.next_batch(100)
        assert rest is not None and rest.readings == unsent and rest.seq == batch.seq + 1
    finally:
        await ob.close()


def _files_total(path: Path) -> int:
    return sum(_files(path).values())


async def test_stopping_the_outbox_mid_commit_writes_nothing_twice(tmp_path: Path) -> None:
    """The gateway stops (its tasks are cancelled) while a window commit is on the outbox thread: the commit
    finishes, is booked as written, and close() does not write the same readings again."""
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path, write_window_s=0.01)
    ob.online = True
    in_commit, release = threading.Event(), threading.Event()
    insert = ob._store.insert

    def slow_insert(*args: object, **kwargs: object) -> list[int]:  # the real insert, held until released
        in_commit.set()
        release.wait(10)
        return insert(*args, **kwargs)  # type: ignore[arg-type]

    ob._store.insert = slow_insert  # type: ignore[method-assign]
    await ob.append(_readings(40))
    flying = await ob.next_batch(10)  # sent, not acknowledged: committed with its number
    assert flying is not None
    runner = asyncio.create_task(ob.run(tick=0.02))
    await asyncio.to_thread(in_commit.wait, 10)
    runner.cancel()
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await runner
    ob._store.insert = insert  # type: ignore[method-assign]
    await ob.close()
    stored = stored_readings(path)
    assert len(stored) == 40 and len(set(_keys(stored))) == 40, "each reading on disk once"
    assert _keys(stored_readings(path, "in_flight")) == _keys(flying.readings), "the sent batch kept its number"


async def test_a_lost_seq_file_starts_a_new_stream_rather_than_guess_numbers(tmp_path: Path) -> None:
    """The .seq record deleted (or unreadable): the numbers used are not known, so none may be guessed."""
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path)
    ob.online = True
    await ob.append(_readings(5))
    sent = await ob.next_batch(10)
    assert sent is not None
    await ob.ack(sent.key)
    await ob.close()
    Path(f"{path}.seq").unlink()
    again = Outbox(path)
    try:
        assert again.stream != sent.stream, "a new stream: numbers of the old one may already be at the collector"
    finally:
        await again.close()
