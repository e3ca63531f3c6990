"""What a SIGKILL, a power cut and a full disk cost the gateway's outbox, against what gateway/outbox.py documents
(issue 15): real Mosquitto, the simulator, the gateway as a process of its own where a kill must be real.

Poll timestamps are checked slot by slot: a device is polled at start + k * interval (gateway/poller.py), so a
slot with no delivered poll near it is a lost poll, and its age at the kill says which durability rule lost it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import paho.mqtt.publish as mqtt_publish
import pytest
from prometheus_client import generate_latest

from edge.cell import load_cell
from edge.sim import SimulatorServer
from edge.telemetry import Reading
from gateway.outbox import Outbox
from gateway.settings import gateway_mqtt
from gateway.store import stored_readings
from kwwk.dev.localservers import Mosquitto
from tests.conftest import ROOT, start_simulator
from tests.helpers import Recorder, RecordingGateway, wait_for, wire_readings
from tests.test_gateway_reliability import _gateway_proc, _metric, _metrics, _outbox_rows

pytestmark = pytest.mark.integration

TWOCELL = ROOT / "tests/data/twocell.yaml"
WINDOW_MS = 5000  # write_window_s, the default twocell runs with
POLL_MS = 1000  # twocell's poll_interval
SLOT_SLACK_MS = 400  # a poll's timestamp is its slot plus the loop's lateness (milliseconds)
Key = tuple[str, str, int]
G = TypeVar("G", bound=RecordingGateway)


# -- observing ------------------------------------------------------------------------------------------------
async def _subscribed_recorder(port: int) -> Recorder:
    """A Recorder whose subscription is in place: a probe it hears proves no later telemetry can be missed."""
    recorder = Recorder(port)

    def probe() -> bool:
        mqtt_publish.single("kwwk/v1/probe/probe/telemetry", b'{"probe": 1}', qos=1, hostname="127.0.0.1", port=port)
        time.sleep(0.2)
        return any(t.startswith("kwwk/v1/probe/") for t, _ in recorder.raw)

    await wait_for(lambda: asyncio.to_thread(probe), 15, "the recorder's subscription")
    return recorder


def _telemetry(recorder: Recorder) -> list[dict[str, Any]]:
    return [m for m in recorder.snapshot() if "polls" in m]


def _delivered(recorder: Recorder) -> dict[Key, float | None]:
    return {(r.device, r.point, r.ts): r.value for m in _telemetry(recorder) for r in wire_readings(m)}


def _accepted(text: str) -> int:
    """kwwk_gateway_readings_total over its quality labels: readings counted once append() returned."""
    return int(sum(_metric(text, "kwwk_gateway_readings_total", quality=q) for q in ("good", "bad")))


def _dropped(text: str) -> int:
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("kwwk_gateway_outbox_dropped_total{")))


async def _health_port(log: Path, starts: int) -> int:
    """The health port of the gateway process that logged the `starts`-th "gateway started" line."""
    def port() -> int | None:
        lines = log.read_text().splitlines() if log.exists() else []
        found = [json.loads(line)["health"] for line in lines if '"gateway started"' in line]
        return int(found[starts - 1].split(":")[2].split("/")[0]) if len(found) >= starts else None

    return await wait_for(port, 20, f"gateway start #{starts} in {log}")


def _missing_slots(delivered: Iterable[Key], device: str, first: int, until: float) -> list[int]:
    """Poll slots of `device` (first + k * POLL_MS, before `until`) with no delivered poll near them."""
    polls = sorted({k[2] for k in delivered if k[0] == device})
    missing = []
    slot = first
    while slot < until:
        if not any(abs(ts - slot) <= SLOT_SLACK_MS for ts in polls):
            missing.append(slot)
        slot += POLL_MS
    return missing


def _points_per_poll(delivered: Iterable[Key]) -> dict[str, int]:
    """How many readings one poll of each device yields (the most seen for one timestamp)."""
    per: dict[tuple[str, int], int] = {}
    for device, _point, ts in delivered:
        per[(device, ts)] = per.get((device, ts), 0) + 1
    out: dict[str, int] = {}
    for (device, _ts), n in per.items():
        out[device] = max(out.get(device, 0), n)
    return out


def _incomplete_polls(delivered: Iterable[Key], points: dict[str, int], before: float) -> list[tuple[str, int]]:
    per: dict[tuple[str, int], int] = {}
    for device, _point, ts in delivered:
        if ts < before:
            per[(device, ts)] = per.get((device, ts), 0) + 1
    return sorted(k for k, n in per.items() if n != points[k[0]])


def _connected_at(log: Path) -> float:
    """When the gateway process first logged "connected to broker" (epoch ms)."""
    line = next(line for line in log.read_text().splitlines() if '"connected to broker"' in line)
    return datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp() * 1000


def _seq_record(outbox: Path) -> tuple[str, int, str, str]:
    """The .seq file's one record: stream, next_seq, boot id, clean."""
    stream, nxt, boot, clean = Path(f"{outbox}.seq").read_text().split()[:4]
    return stream, int(nxt), boot, clean


@dataclass
class Rig:
    """The simulator serving a test cell, and a recorder (subscribed) of all the broker gets."""

    sim: SimulatorServer
    cell: Path
    recorder: Recorder

    async def flowing(self) -> None:
        await wait_for(lambda: len(_telemetry(self.recorder)) >= 3, 20, "telemetry from the gateway")

    def delivered(self) -> dict[Key, float | None]:
        """Everything the broker got, once the test is over (the recorder stops; its messages stay)."""
        self.recorder.close()
        return _delivered(self.recorder)


async def _rig(tmp_path: Path, src: Path, broker_port: int) -> Rig:
    sim, cell = await start_simulator(src, tmp_path / "cells")
    return Rig(sim, cell, await _subscribed_recorder(broker_port))


class GatewayProcess:
    """`kwwk gateway run` on the rig's cell as a process of its own (a SIGKILL must be real), started again on
    the same outbox after a kill."""

    def __init__(self, rig: Rig, broker_port: int, tmp_path: Path) -> None:
        self.rig, self.broker_port = rig, broker_port
        self.outbox, self.log = tmp_path / "outbox.sqlite", tmp_path / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> int:
        """Start it; return its health (and /metrics) port."""
        self.proc = _gateway_proc(self.rig.cell, self.broker_port, self.outbox, self.log)
        self.starts += 1
        return await _health_port(self.log, self.starts)

    def kill(self) -> None:
        assert self.proc is not None  # noqa: S101
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


async def _in_process(rig: Rig, cls: type[G], broker_port: int,
                      path: Path) -> tuple[G, asyncio.Event, asyncio.Task[None]]:
    """The real gateway in this process (its outbox and counters at hand), running until the event is set."""
    gw = cls(load_cell(rig.cell), "gw-two", gateway_mqtt(port=broker_port, reconnect_max_s=3), path)
    stop = asyncio.Event()
    return gw, stop, asyncio.create_task(gw.run(stop))


async def _stop_in_process(rig: Rig, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await task
    await rig.sim.stop()


# -- 1. SIGKILL, broker up --------------------------------------------------------------------------------------
async def test_sigkill_with_the_broker_up_loses_only_readings_younger_than_the_write_window(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    rig = await _rig(tmp_path, TWOCELL, mosquitto.port)
    recorder, gw = rig.recorder, GatewayProcess(rig, mosquitto.port, tmp_path)
    try:
        port = await gw.start()
        await rig.flowing()
        await asyncio.sleep(8)  # broker up: every poll is published and acknowledged from RAM
        text = await asyncio.to_thread(_metrics, port)
        kill_ms = time.time() * 1000
        gw.kill()
        seq_at_kill = _seq_record(gw.outbox)
        await asyncio.sleep(1)  # what the broker took before the kill reaches the recorder
        before = _telemetry(recorder)
        on_disk = _outbox_rows(gw.outbox, tmp_path / "killed")
        await gw.start()
        await wait_for(lambda: {"grid", "chp"} <= {k[0] for k in _delivered(recorder) if k[2] > kill_ms + 3000},
                       30, "both devices' readings from the restarted gateway")
    finally:
        gw.stop()
        await rig.sim.stop()
    delivered = rig.delivered()
    after = [m for m in _telemetry(recorder) if m["seq"] not in {b["seq"] for b in before}]
    first_run = {k for k in delivered if k[2] < kill_ms}
    points = _points_per_poll(delivered)
    lost = {d: _missing_slots(first_run, d, min(k[2] for k in first_run if k[0] == d), kill_ms) for d in points}
    ages = {d: [round((kill_ms - s) / 1000, 2) for s in slots] for d, slots in lost.items()}
    n_lost = sum(len(s) * points[d] for d, s in lost.items())
    print(f"\nSIGKILL, broker up: {len(first_run)} readings of the killed gateway delivered, {n_lost} lost "
          f"(polls lost per device, age at the kill in s: {ages}); accepted at the last /metrics read "
          f"{_accepted(text)}; on disk at the kill {len(on_disk)}; polls skipped "
          f"{_metric(text, 'kwwk_gateway_polls_skipped_total', device='grid')}/"
          f"{_metric(text, 'kwwk_gateway_polls_skipped_total', device='chp')}")
    for d, slots in lost.items():
        old = [s for s in slots if kill_ms - s > WINDOW_MS + POLL_MS]
        assert not old, f"{d}: polls taken more than window + interval before the kill never arrived: {ages[d]}"
        assert all(kill_ms - s < WINDOW_MS for s in slots), f"{d}: a lost poll older than the write window"
    assert not _incomplete_polls(delivered, points, kill_ms), "a poll arrived in part"
    # broker up: nothing written to the card, but for what was polled before the first CONNACK (documented:
    # readings taken while the broker was never connected are committed at once)
    connected_ms = _connected_at(gw.log)
    before_connect = sum(1 for k in first_run if k[2] < connected_ms)
    offline = _metric(text, "kwwk_gateway_outbox_committed_readings_total", why="offline")
    print(f"committed offline {offline:.0f} (readings polled before the first connect: {before_connect}), window "
          f"{_metric(text, 'kwwk_gateway_outbox_committed_readings_total', why='window'):.0f}")
    assert _metric(text, "kwwk_gateway_outbox_committed_readings_total", why="window") == 0, \
        "broker up: every reading acknowledged within the window, none written to the card for it"
    assert offline <= before_connect, "broker up: nothing written to the card once connected"
    assert _metric(text, "kwwk_gateway_published_readings_total") > 0
    # numbering: one stream, continued after the restart from the .seq record the kill left
    assert {m["stream"] for m in _telemetry(recorder)} == {seq_at_kill[0]}, "the restart continues the stream"
    seen = sorted(m["seq"] for m in before)
    new = sorted(m["seq"] for m in after)
    print(f"seqs before the kill {seen[0]}..{seen[-1]}, next in .seq {seq_at_kill[1]}, after the restart "
          f"{new[0]}..{new[-1]}")
    assert seq_at_kill[1] > seen[-1], "the .seq record the kill left is past every number used"
    assert new and new[0] == seq_at_kill[1], "the restarted gateway numbers from where the killed one stopped"
    assert new == list(range(new[0], new[-1] + 1))


# -- 2. SIGKILL, broker down ------------------------------------------------------------------------------------
async def test_sigkill_with_the_broker_down_loses_nothing_it_accepted(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rig = await _rig(tmp_path, TWOCELL, mosquitto.port)
    recorder, gw = rig.recorder, GatewayProcess(rig, mosquitto.port, tmp_path)
    try:
        port = await gw.start()
        await rig.flowing()
        mosquitto.stop()
        outage_ms = time.time() * 1000
        await asyncio.sleep(6)  # polls with the broker gone: each is committed before it counts as accepted
        read_ms = time.time() * 1000
        text = await asyncio.to_thread(_metrics, port)
        gw.kill()
        kill_ms = time.time() * 1000
        accepted = _accepted(text)
        mosquitto.start()
        await gw.start()
        await wait_for(lambda: sum(1 for k in _delivered(recorder) if k[2] < kill_ms) >= accepted, 45,
                       f"{accepted} readings accepted before the kill, delivered")
    finally:
        gw.stop()
        await rig.sim.stop()
    delivered = rig.delivered()
    before_kill = {k for k in delivered if k[2] < kill_ms}
    print(f"\nSIGKILL, broker down {(read_ms - outage_ms) / 1000:.1f} s: accepted {accepted}, delivered with a "
          f"timestamp before the kill {len(before_kill)} (kill {kill_ms - read_ms:.0f} ms after the metrics read); "
          f"committed offline {_metric(text, 'kwwk_gateway_outbox_committed_readings_total', why='offline')}")
    assert len(before_kill) >= accepted, "every reading accepted before the kill reached the broker"
    points = _points_per_poll(delivered)
    assert not _incomplete_polls(delivered, points, kill_ms), "a poll arrived in part"
    for device in ("grid", "chp"):
        first = min(k[2] for k in before_kill if k[0] == device)
        # every slot from the first poll (before the outage too) up to the metrics read, less a poll's own time:
        # those polls had returned when /metrics was read
        missing = _missing_slots(before_kill, device, first, read_ms - SLOT_SLACK_MS)
        lost = [(s - outage_ms) / 1000 for s in missing]
        assert not missing, f"{device}: polls lost (s after the outage start): {lost}"


# -- 3. power cut ---------------------------------------------------------------------------------------------
class AcceptingGateway(RecordingGateway):
    """Also remembers the readings the outbox accepted (append() returned): what a power cut must not lose."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted: list[Reading] = []

    async def _store(self, readings: list[Reading]) -> None:
        await super()._store(readings)
        self.accepted.extend(readings)


def _reboot(seq_file: Path) -> None:
    """Rewrite a .seq record as a reboot leaves it: another boot id (the record stays not clean)."""
    stream, nxt, _boot, clean = seq_file.read_text().split()[:4]
    record = f"{stream} {nxt} {'0' * 32} {clean}"
    seq_file.write_text(record.ljust(95) + "\n")


async def test_a_power_cut_keeps_every_accepted_reading_and_never_reuses_a_number(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    rig = await _rig(tmp_path, TWOCELL, mosquitto.port)
    recorder, path = rig.recorder, tmp_path / "ob.sqlite"
    gw, stop, task = await _in_process(rig, AcceptingGateway, mosquitto.port, path)
    cuts = []
    try:
        await rig.flowing()
        mosquitto.stop()
        await asyncio.sleep(3)
        for i in range(5):  # several cuts, at whatever moment of a commit or checkpoint they fall
            await asyncio.sleep(0.7)
            text = generate_latest(gw.metrics.registry).decode()  # with the snapshot below: no await between
            accepted = list(gw.accepted)
            assert _accepted(text) == len(accepted)
            rows = await asyncio.to_thread(_outbox_rows, path, tmp_path / f"cut{i}")
            cuts.append((accepted, rows, tmp_path / f"cut{i}" / path.name))
        stream = gw.outbox.stream
        # the last cut, twice: as the gateway would find it at the next boot (the read above recovered its WAL
        # as the gateway's own first open would)
        shutil.copytree(tmp_path / "cut4", tmp_path / "reboot")
        shutil.copytree(tmp_path / "cut4", tmp_path / "same")
    finally:
        await _stop_in_process(rig, stop, task)
    delivered = rig.delivered()
    produced = {(r.device, r.point, r.ts): r.value for r in gw.produced}
    for accepted, rows, copy in cuts:
        db = sqlite3.connect(copy)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
        listed = stored_readings(copy)
        want = {(r.device, r.point, r.ts) for r in accepted} - set(delivered)
        print(f"power cut {copy.parent.name}: accepted {len(accepted)} ({len(want)} not acknowledged), "
              f"in the copy {len(listed)}")
        assert want <= set(rows), f"{len(want - set(rows))} accepted readings missing from the copy"
        assert len(listed) == len(rows), "no reading stored twice"
        assert all(produced.get(k, "absent") == v for k, v in rows.items()), "the copy holds what was taken"
    # numbering after the cut: the numbers used so far are those the broker got and those numbered in the copy
    db = sqlite3.connect(cuts[-1][2])
    try:
        numbered = {seq for (seq,) in db.execute("SELECT DISTINCT seq FROM chunks WHERE stream = ?", (stream,))}
    finally:
        db.close()
    used = {(m["stream"], m["seq"]) for m in _telemetry(recorder)} | {(stream, s) for s in numbered}
    assert {s for s, _ in used} == {stream}
    _reboot(Path(f"{tmp_path / 'reboot' / path.name}.seq"))
    for name in ("reboot", "same"):
        ob = Outbox(tmp_path / name / path.name)
        try:
            batch = await ob.next_batch(500)
            in_flight = [b.key for b in ob.in_flight() if batch is None or b.key != batch.key]
        finally:
            await ob.close()
        assert batch is not None, f"{name}: the copy's backlog can be sent"
        print(f"{name}: stream {ob.stream} (was {stream}), first new batch {batch.key}, "
              f"highest used {max(s for _, s in used)}, re-sent as they were {len(in_flight)}")
        assert batch.key not in used, f"{name}: a batch number is used twice"
        assert set(in_flight) <= used, f"{name}: batches in flight at the cut keep their numbers"
        if name == "reboot":
            assert ob.stream != stream and batch.stream == ob.stream, "after a reboot: a new stream"
        else:
            assert ob.stream == stream, "the same boot: the same stream"
            assert batch.seq > max(s for _, s in used), "numbering continues past every number used"


# -- 4. size budget -------------------------------------------------------------------------------------------
BUDGET = int(0.3 * 2**20)  # sizecell.yaml's outbox: {max_mb: 0.3}
#: one commit past the budget: the budget is checked before a commit against its estimated size, and the WAL is
#: checkpointed only after the commit that takes it past its cap; a commit here is one or two polls' chunks
#: (~1-3 KiB) plus the b-tree and freelist pages it touches: 16 KiB bounds it with room to spare
ONE_COMMIT = 16 * 1024


def _files_size(path: Path) -> int:
    """What the size budget counts: database, WAL and .seq file (os.stat, as the card sees them)."""
    total = 0
    for f in (path, Path(f"{path}-wal"), Path(f"{path}.seq")):
        try:
            total += os.stat(f).st_size
        except FileNotFoundError:
            pass
    return total


async def test_a_60s_outage_keeps_the_outbox_within_its_size_budget_and_counts_every_reading(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    rig = await _rig(tmp_path, ROOT / "tests/data/sizecell.yaml", mosquitto.port)
    recorder, path = rig.recorder, tmp_path / "ob.sqlite"
    gw, stop, task = await _in_process(rig, RecordingGateway, mosquitto.port, path)
    cfg = gw.cfg
    devices = [d.id for d in cfg.gateway("gw-two").devices]
    sizes: list[tuple[float, int]] = []
    try:
        await rig.flowing()
        mosquitto.stop()
        start = time.monotonic()
        while time.monotonic() - start < 60:  # the outage: time has to pass, with the gateway polling throughout
            sizes.append((time.monotonic() - start, _files_size(path)))
            await asyncio.sleep(0.05)
        during = await asyncio.to_thread(_metrics, gw.health.port)
        mosquitto.start()
        await wait_for(lambda: gw.outbox.depth < 2000, 60, "the backlog to drain")
        for device in devices:  # no more readings: the count can settle
            await rig.sim.set_offline(cfg.cell.id, device, True)
        await wait_for(lambda: gw.outbox.depth == 0, 60, "the outbox to empty")
        await asyncio.sleep(6)  # the housekeeping refreshes /metrics every 5 s
        text = await asyncio.to_thread(_metrics, gw.health.port)
    finally:
        await _stop_in_process(rig, stop, task)
    delivered = rig.delivered()
    peak_at, peak = max(sizes, key=lambda s: s[1])
    full_at = next((f"{t:.1f}" for t, b in sizes if b >= BUDGET - 8 * 1024), None)
    accepted, dropped = _accepted(text), _dropped(text)
    print(f"\nsize budget {BUDGET} B: peak {peak} B at {peak_at:.1f} s of the outage ({len(sizes)} samples, within "
          f"8 KiB of the budget from {full_at} s); dropped during the outage "
          f"{_metric(during, 'kwwk_gateway_outbox_dropped_total', reason='size_drop_oldest'):.0f}; "
          f"accepted {accepted}, delivered {len(delivered)}, dropped {dropped} "
          f"({dict(gw.outbox.dropped)}), published {_metric(text, 'kwwk_gateway_published_readings_total'):.0f}")
    assert peak <= BUDGET + ONE_COMMIT, f"the outbox's files reached {peak} B, budget {BUDGET} B + one commit"
    assert _metric(during, "kwwk_gateway_outbox_dropped_total", reason="size_drop_oldest") > 0, \
        "the outage overflowed the budget: the oldest readings were dropped and counted"
    assert set(delivered) <= {(r.device, r.point, r.ts) for r in gw.produced}, "only readings taken were sent"
    assert delivered and len(delivered) + dropped == accepted, "every reading delivered or counted as dropped"
