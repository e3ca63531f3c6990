"""The gateway never loses a reading: broker outages, SIGKILL, a full outbox (real Mosquitto, InfluxDB, simulator)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from collector.ingest import COLLECTOR_MQTT, CollectorSettings
from collector.registry import Registry
from collector.service import run_collector
from collector.storage import InfluxSettings
from edge.cell import CellConfig, load_cell
from edge.sim import SimulatorServer
from gateway.settings import gateway_mqtt
from gateway.store import stored_readings
from edge.sim.ports import reserve_port
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT, start_simulator
from tests.helpers import Recorder, RecordingGateway, rows, wait_for, wire_readings

pytestmark = pytest.mark.integration

OUTAGE_S = 60


async def _simulated(tmp_path: Path, name: str = "twocell.yaml") -> tuple[SimulatorServer, CellConfig]:
    """The simulator serving a test cell on ports of its own, and the gateway's config naming them."""
    sim, cell = await start_simulator(ROOT / "tests/data" / name, tmp_path / "cells")
    return sim, load_cell(cell)


def _stored(influx: InfluxDB1, cfg: CellConfig) -> dict[tuple[str, str, int], float]:
    """(device, point, ts) -> value of everything stored for the cell."""
    out: dict[tuple[str, str, int], float] = {}
    registry = Registry({cfg.cell.id: cfg})
    for meas in registry.measurements:
        for row in rows(influx, meas, f"WHERE \"cell\" = '{cfg.cell.id}'"):
            for point in registry.device(cfg.cell.id, row["device"]).points:
                if row.get(point) is not None:
                    out[(row["device"], point, row["time"])] = row[point]
    return out


def _row_count(influx: InfluxDB1, cfg: CellConfig, before_ms: float) -> int:
    registry = Registry({cfg.cell.id: cfg})
    where = f"WHERE \"cell\" = '{cfg.cell.id}' AND time < {int(before_ms)}ms"
    return sum(len(rows(influx, m, where)) for m in registry.measurements)


async def test_broker_outage_of_60s_loses_nothing(tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    """Stop the broker for 60 s while the gateway polls: afterwards every reading is stored exactly once,
    with its original timestamp, and the backlog arrived in order."""
    sim, cfg = await _simulated(tmp_path)
    recorder = Recorder(mosquitto.port)
    stop = asyncio.Event()
    gw = RecordingGateway(cfg, "gw-two", gateway_mqtt(port=mosquitto.port), tmp_path / "ob.sqlite")  # its defaults
    collector = CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="test-collector"),
                                  flush_interval_s=0.2, audit_interval_s=2, audit_grace_s=3)
    tasks = [asyncio.create_task(gw.run(stop)),
             asyncio.create_task(run_collector(collector, InfluxSettings(url=influxdb.url), Registry({"twocell": cfg}),
                                               stop=stop))]
    try:
        await wait_for(lambda: len(recorder.snapshot()) >= 3, 15, "telemetry before the outage")
        await asyncio.to_thread(mosquitto.stop)  # in a thread: the gateway's loop runs on meanwhile
        outage = (time.time() * 1000, None)
        await wait_for(lambda: not gw.uplink.connected, 10, "the gateway to notice the broker is gone", interval=0.02)
        failed_before = _failed_connects(gw)
        await asyncio.sleep(OUTAGE_S)  # the outage itself: time has to pass, with the gateway polling throughout
        depth_during = gw.outbox.depth
        failed_during = _failed_connects(gw) - failed_before
        await asyncio.to_thread(mosquitto.start)
        back = time.monotonic()
        outage = (outage[0], time.time() * 1000)
        await wait_for(lambda: gw.uplink.connected, 30, "the gateway to reconnect", interval=0.01)
        reconnected_after = time.monotonic() - back
        await wait_for(lambda: gw.outbox.depth < 100, 60, "the outbox to drain")
        stop_at = time.time() * 1000
        # everything taken until now must end up stored (the collector's audit may ask for resends)
        await wait_for(lambda: all(k in _stored(influxdb, cfg) for k in
                                   [(r.device, r.point, r.ts) for r in gw.produced if r.ts < stop_at]),
                       60, "every reading in InfluxDB", interval=1)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sim.stop()
    # issue 15: back within 2 s of the broker's return. The figure is printed (wall clock is not asserted);
    # what is asserted is its cause: attempts every 1-2 s (cap 2 s, equal jitter), at least OUTAGE_S / 2 / 2
    print(f"\nbroker back after {OUTAGE_S} s: the gateway connected again {reconnected_after:.2f} s later; "
          f"{failed_during:.0f} failed attempts during the outage")
    assert failed_during >= OUTAGE_S / 2 / 2, f"only {failed_during:.0f} attempts in {OUTAGE_S} s: the cap is above 2 s"
    produced = {(r.device, r.point, r.ts): r.value for r in gw.produced if r.ts < stop_at}
    in_outage = [k for k in produced if outage[0] <= k[2] <= outage[1]]
    assert depth_during >= len(in_outage) * 0.9, "readings taken during the outage waited in the outbox"
    assert len({k[2] for k in in_outage if k[0] == "grid"}) >= OUTAGE_S * 0.9, "the gateway kept polling"
    stored = _stored(influxdb, cfg)
    missing = [k for k in produced if k not in stored]
    assert not missing, f"{len(missing)} of {len(produced)} readings lost, e.g. {missing[:3]}"
    wrong = [(k, produced[k], stored[k]) for k in produced if stored[k] != pytest.approx(produced[k], rel=1e-6)]
    assert not wrong, f"stored values differ: {wrong[:3]}"
    # none twice: one row per (device, timestamp) the gateway produced, nothing re-stamped
    produced_rows = {(r.device, r.ts) for r in gw.produced if r.ts < stop_at}
    assert _row_count(influxdb, cfg, stop_at) == len(produced_rows)
    # the backlog arrived oldest first, sequence numbers never went back
    msgs = recorder.snapshot()
    recorder.close()
    first_sends = {}
    for m in msgs:  # a batch the broker lost is sent again later, with its own number
        first_sends.setdefault(m["seq"], m)
    replayed = {(r.device, r.point, r.ts) for m in first_sends.values() if m["replay"] for r in wire_readings(m)}
    late = {k for k in in_outage if k[2] < outage[1] - gw.outbox.replay_after_ms}
    assert late and late <= replayed, "readings from the outage were sent marked as replay"
    for device in ("grid", "chp"):  # devices are polled concurrently: order holds per device
        replay_ts = [r.ts for _, m in sorted(first_sends.items()) if m["replay"] for r in wire_readings(m)
                     if r.device == device]
        assert replay_ts == sorted(replay_ts), f"the backlog of {device} was sent oldest first"
    seqs = sorted(first_sends)
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "no sequence number skipped"


def _failed_connects(gw: RecordingGateway) -> float:
    """Connection attempts that failed, as the gateway's /metrics counts them."""
    return sum(s.value for m in gw.metrics.connects.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels.get("result") == "failed")


def _gateway_proc(cell: Path, mqtt_port: int, outbox: Path, log: Path) -> subprocess.Popen[bytes]:
    kwwk = Path(sys.executable).parent / "kwwk"
    return subprocess.Popen(  # noqa: S603
        [str(kwwk), "gateway", "run", "--cell", str(cell), "--gateway", "gw-two", "--mqtt-port", str(mqtt_port),
         "--outbox", str(outbox), "--health-port", "0"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "KWWK_LOG_LEVEL": "INFO"})


def _outbox_rows(path: Path, copy_dir: Path | None = None) -> dict[tuple[str, str, int], float]:
    """Readings in an outbox: of a stopped gateway, or (copy_dir) of a running one, copied file by file as a
    power cut would leave them (the running gateway holds its database exclusively)."""
    if not path.exists():
        return {}
    if copy_dir is not None:
        copy_dir.mkdir(parents=True, exist_ok=True)
        # the WAL first: a checkpoint between the two copies then leaves a database the WAL copy still covers
        for f in sorted(path.parent.glob(path.name + "*"), key=lambda f: not f.name.endswith("-wal")):
            shutil.copyfile(f, copy_dir / f.name)
        path = copy_dir / path.name
    return {(r.device, r.point, r.ts): r.value for r in stored_readings(path)}


async def test_sigkill_then_restart_delivers_the_outbox_and_continues_the_sequence(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    sim, cfg_path = await start_simulator(ROOT / "tests/data/twocell.yaml", tmp_path / "cells")
    cfg = load_cell(cfg_path)
    recorder = Recorder(mosquitto.port)
    stop = asyncio.Event()
    collector = CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="test-collector"),
                                  flush_interval_s=0.2, audit_interval_s=2, audit_grace_s=3)
    ctask = asyncio.create_task(run_collector(collector, InfluxSettings(url=influxdb.url),
                                              Registry({"twocell": cfg}), stop=stop))
    outbox = tmp_path / "outbox.sqlite"
    log = tmp_path / "gateway.log"
    proc = _gateway_proc(cfg_path, mosquitto.port, outbox, log)
    try:
        await wait_for(lambda: len(recorder.snapshot()) >= 3, 20, "telemetry from the gateway process")
        mosquitto.stop()
        copies = iter(range(1000))
        await wait_for(lambda: len(_outbox_rows(outbox, tmp_path / f"copy{next(copies)}")) >= 4 * 13, 20,
                       "readings piling up in the outbox, broker down")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        seen_before = {m["seq"] for m in recorder.snapshot()}
        pending = _outbox_rows(outbox)
        assert len(pending) >= 4 * 13, "readings were waiting in the outbox when the gateway died"
        mosquitto.start()
        proc = _gateway_proc(cfg_path, mosquitto.port, outbox, log)
        await wait_for(lambda: all(k in _stored(influxdb, cfg) for k in pending), 45,
                       "every reading of the killed gateway's outbox in InfluxDB")
        await wait_for(lambda: len({m["seq"] for m in recorder.snapshot()} - seen_before) >= 3, 20,
                       "new messages after the restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        stop.set()
        await ctask
        await sim.stop()
    stored = _stored(influxdb, cfg)
    assert all(stored[k] == pytest.approx(v, rel=1e-6) for k, v in pending.items())
    seqs = sorted({m["seq"] for m in recorder.snapshot()})
    recorder.close()
    assert seqs[0] == 0 and seqs == list(range(seqs[0], seqs[-1] + 1)), "no sequence number skipped or reused"
    after = sorted(set(seqs) - seen_before)
    assert after[0] == max(seen_before) + 1, "the sequence continues where it stopped, it does not restart"
    assert "Traceback" not in log.read_text()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310
        return r.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_full_outbox_applies_its_policy_and_counts_it(tmp_path: Path, policy: str) -> None:
    """No broker at all: the outbox fills to its bound; the policy decides which readings go, and every
    dropped reading is counted in /metrics and reported in /healthz."""
    text = (ROOT / "tests/data/twocell.yaml").read_text().replace(
        "    poll_interval: 1\n", f"    poll_interval: 0.2\n    outbox: {{max_readings: 200, overflow: {policy}}}\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/twocell.yaml").write_text(text)
    sim, cell = await start_simulator(tmp_path / "src/twocell.yaml", tmp_path / "cells")
    cfg = load_cell(cell)
    stop = asyncio.Event()
    gw = RecordingGateway(cfg, "gw-two", gateway_mqtt(port=reserve_port()), tmp_path / "ob.sqlite")
    task = asyncio.create_task(gw.run(stop))
    reason = "full_" + policy

    async def drops_counted() -> str | None:
        text = await asyncio.to_thread(_metrics, gw.health.port)
        return text if _metric(text, "kwwk_gateway_outbox_dropped_total", reason=reason) >= 400 else None

    try:
        await wait_for(lambda: len(gw.produced) > 600, 20, "more readings than the outbox holds")
        text = await wait_for(drops_counted, 20, f"400 readings dropped ({reason}) counted in /metrics")
        health = gw.healthz()
    finally:
        stop.set()
        await task
        await sim.stop()
    dropped = _metric(text, "kwwk_gateway_outbox_dropped_total", reason=reason)
    assert dropped >= 400
    assert _metric(text, "kwwk_gateway_outbox_readings") <= 200
    assert health["outbox_dropped"][reason] >= dropped
    kept = _outbox_rows(tmp_path / "ob.sqlite")
    produced_ts = sorted({r.ts for r in gw.produced})
    kept_ts = sorted({k[2] for k in kept})
    if policy == "drop_oldest":
        assert kept_ts[-1] == produced_ts[-1] and kept_ts[0] > produced_ts[0], "the newest are kept"
    else:
        assert kept_ts[0] == produced_ts[0] and kept_ts[-1] < produced_ts[-1], "the oldest are kept"


async def test_failing_devices_are_reported_and_retried_while_others_keep_their_schedule(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """One device never answers, one answers with Modbus exceptions, one drops its connection: each is
    reported (metrics, /healthz) and retried until it recovers, and the healthy one is polled on time."""
    sim, cfg = await _simulated(tmp_path, "faultcell.yaml")
    stop = asyncio.Event()
    gw = RecordingGateway(cfg, "gw-fault", gateway_mqtt(port=mosquitto.port), tmp_path / "ob.sqlite")
    task = asyncio.create_task(gw.run(stop))
    faulty = ("silent", "refusing", "dropping")
    every = {d.id for _, d in cfg.devices()}
    try:
        await wait_for(lambda: every <= {r.device for r in gw.produced if r.quality == "good"}, 15,
                       "a good reading of every device before the faults")
        fault_start = time.time() * 1000
        sim.fault("faultcell", "silent", "timeout")
        sim.fault("faultcell", "refusing", "exception")
        await sim.set_offline("faultcell", "dropping", True)
        # the faults last until each is reported and the healthy device had a dozen polls meanwhile
        await wait_for(lambda: all(gw.healthz()["devices"][d]["error"] for d in faulty) and len(
            {r.ts for r in gw.produced if r.device == "healthy" and r.ts >= fault_start}) >= 12, 30,
                       "every fault reported in /healthz, and 12 polls of the healthy device since they began")
        health = gw.healthz()
        text = await asyncio.to_thread(_metrics, gw.health.port)
        fault_end = time.time() * 1000
        sim.fault("faultcell", "silent", None)
        sim.fault("faultcell", "refusing", None)
        await sim.set_offline("faultcell", "dropping", False)
        await wait_for(lambda: all(any(r.device == d and r.ts > fault_end for r in gw.produced) for d in faulty),
                       45, "the failed devices to be read again")
    finally:
        stop.set()
        await task
        await sim.stop()
    # reported
    assert _metric(text, "kwwk_gateway_read_errors_total", device="silent", reason="timeout") >= 1
    assert _metric(text, "kwwk_gateway_read_errors_total", device="refusing", reason="exception") >= 1
    assert _metric(text, "kwwk_gateway_read_errors_total", device="dropping", reason="connection") >= 1
    for d in faulty:
        assert health["devices"][d]["error"], f"/healthz names the failure of {d}"
    assert health["devices"]["healthy"]["error"] is None
    # the healthy device kept its 0.5 s schedule during the faults
    ts = sorted({r.ts for r in gw.produced if r.device == "healthy" and fault_start <= r.ts <= fault_end})
    assert len(ts) >= 10, f"only {len(ts)} polls of the healthy device in 6 s"
    assert max(b - a for a, b in zip(ts, ts[1:], strict=False)) < 1000, "a poll of the healthy device was delayed"
    # nothing from the failing devices while they failed
    assert not [r for r in gw.produced if r.device in faulty and fault_start + 1000 < r.ts < fault_end - 100
                and r.quality == "good"]


async def test_systemd_readiness_and_watchdog(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Under systemd (Type=notify, WatchdogSec) the gateway reports READY=1 and pets the watchdog."""
    import socket

    sim, cfg_path = await start_simulator(ROOT / "tests/data/twocell.yaml", tmp_path / "cells")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    kwwk = Path(sys.executable).parent / "kwwk"
    proc = subprocess.Popen(  # noqa: S603
        [str(kwwk), "gateway", "run", "--cell", str(cfg_path), "--gateway", "gw-two", "--mqtt-port",
         str(mosquitto.port), "--outbox", str(tmp_path / "ob.sqlite"), "--health-port", "0"],
        env={**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got: list[str] = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum("WATCHDOG=1" in g for g in got) < 3:
            try:
                got.append((await asyncio.to_thread(sock.recv, 4096)).decode())
            except TimeoutError:
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 20)
        sock.close()
        await sim.stop()
    assert any("READY=1" in g for g in got), got
    assert sum("WATCHDOG=1" in g for g in got) >= 3, got
    assert proc.returncode == 0


async def test_a_publish_the_broker_refuses_is_kept_and_reported(tmp_path: Path) -> None:
    """An ACL that denies the gateway its telemetry topic: the broker answers PUBACK 0x87. Nothing may be taken
    for delivered: the readings stay in the outbox, the refusal is counted and shown in /healthz, and once the
    ACL is fixed everything goes out."""
    acl = tmp_path / "acl"
    acl.write_text("user gw-two\ntopic readwrite kwwk/v1/twocell/gw-two/status\ntopic read kwwk/v1/twocell/gw-two/resend\n"
                   "user recorder\ntopic read kwwk/v1/#\n")
    broker = Mosquitto(tmp_path / "mosquitto", extra=f"acl_file {acl}")
    broker.start()
    sim, cfg = await _simulated(tmp_path)
    recorder = Recorder(broker.port, client_id="recorder", username="recorder")  # persistent session: it hears what comes after a restart
    stop = asyncio.Event()
    gw = RecordingGateway(cfg, "gw-two", gateway_mqtt(port=broker.port, username="gw-two", reconnect_max_s=1),
                          tmp_path / "ob.sqlite")
    task = asyncio.create_task(gw.run(stop))
    try:
        await wait_for(lambda: gw.uplink.last_refusal, 15, "the refusal to be noticed")
        # enough readings that the 30 allowed in flight below are a small part of them
        await wait_for(lambda: len(gw.produced) >= 100, 15, "100 readings taken while the broker refuses")
        health = gw.healthz()
        text = await asyncio.to_thread(_metrics, gw.health.port)
        produced = len(gw.produced)
        early = {(r.device, r.point, r.ts) for r in gw.produced[:produced]}
        assert gw.outbox.depth >= produced - 30, "refused readings stay in the outbox"
        # the operator fixes the ACL; the backlog goes out
        acl.write_text(acl.read_text() + "user gw-two\ntopic write kwwk/v1/twocell/gw-two/telemetry\n")
        broker.stop()
        broker.start()
        await wait_for(lambda: gw.outbox.depth < 60, 30, "the outbox to drain once allowed")

        def delivered() -> set[tuple[str, str, int]]:
            return {(r.device, r.point, r.ts) for m in recorder.snapshot() for r in wire_readings(m)}

        await wait_for(lambda: early <= delivered(), 15, "every refused reading delivered once allowed")
        delivered_set = delivered()
        recorder.close()
    finally:
        stop.set()
        await task
        await sim.stop()
        broker.stop()
    assert "0x87" in health["publish_refused"]
    assert _metric(text, "kwwk_gateway_publish_refused_total", reason="0x87") >= 1
    assert early <= delivered_set, f"{len(early - delivered_set)} refused readings never delivered"
