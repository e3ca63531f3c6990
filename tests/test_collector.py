"""The collector: at least once into InfluxDB, exactly once in effect, through crashes, database outages and
replica failures (real Mosquitto, real InfluxDB, real gateway and simulator)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from collector.registry import Registry
from edge.cell import CellConfig, load_cell
from edge.sim import SimulatorServer
from gateway.uplink import BrokerSettings
from kwwk.dev.localservers import InfluxDB1, Mosquitto, free_port
from tests.conftest import ROOT, with_free_ports
from tests.helpers import RecordingGateway, rows, wait_for

pytestmark = pytest.mark.integration


class CollectorProc:
    """`kwwk collector run` as its own process, as it runs in production."""

    def __init__(self, cells: Path, mqtt: Mosquitto, influx: InfluxDB1, client_id: str, log: Path) -> None:
        self.health = free_port()
        kwwk = Path(sys.executable).parent / "kwwk"
        self.proc = subprocess.Popen(  # noqa: S603
            [str(kwwk), "collector", "run", "--cells", str(cells), "--mqtt-port", str(mqtt.port),
             "--influx-url", influx.url, "--client-id", client_id, "--health-port", str(self.health),
             "--audit-interval", "2"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "KWWK_LOG_LEVEL": "INFO"})

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/metrics", timeout=5) as r:  # noqa: S310
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f"{name}{{{want}") or (not labels and line.startswith(f"{name} ")))

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def _setup(tmp_path: Path, poll: float = 0.2) -> tuple[CellConfig, Path]:
    text = (ROOT / "tests/data/twocell.yaml").read_text().replace("poll_interval: 1", f"poll_interval: {poll}")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/twocell.yaml").write_text(text)
    path = with_free_ports(tmp_path / "src/twocell.yaml", tmp_path / "cells")
    return load_cell(path), path.parent


def _stored_keys(influx: InfluxDB1, cfg: CellConfig) -> set[tuple[str, str, int]]:
    registry = Registry({cfg.cell.id: cfg})
    out = set()
    for meas in registry.measurements:
        for row in rows(influx, meas):
            out.update((row["device"], p, row["time"]) for p in registry.device(cfg.cell.id, row["device"]).points
                       if row.get(p) is not None)
    return out


def _row_count(influx: InfluxDB1, cfg: CellConfig) -> int:  # everything stored so far
    return sum(len(rows(influx, m)) for m in Registry({cfg.cell.id: cfg}).measurements)


async def _run_gateway(cfg: CellConfig, mosquitto: Mosquitto, tmp_path: Path) -> tuple[RecordingGateway, asyncio.Event,
                                                                                         asyncio.Task[None]]:
    stop = asyncio.Event()
    gw = RecordingGateway(cfg, "gw-two", BrokerSettings(port=mosquitto.port, reconnect_max_s=2),
                          tmp_path / "outbox.sqlite")
    return gw, stop, asyncio.create_task(gw.run(stop))


async def _finish(gw: RecordingGateway, stop: asyncio.Event, task: asyncio.Task[None], influx: InfluxDB1,
                  cfg: CellConfig, timeout: float = 60) -> float:
    """Wait until everything the gateway produced up to now is stored (its archive answers resend requests
    meanwhile, so it keeps running), then stop it; return the cut-off time (ms)."""
    cutoff = time.time() * 1000
    produced = {(r.device, r.point, r.ts) for r in gw.produced if r.ts < cutoff}
    try:
        await wait_for(lambda: produced <= _stored_keys(influx, cfg), timeout, "every produced reading in InfluxDB",
                       interval=1)
    finally:
        stop.set()
        await task
    return cutoff


def _assert_exactly_once(gw: RecordingGateway, influx: InfluxDB1, cfg: CellConfig, cutoff: float) -> int:
    produced_rows = {(r.device, r.ts) for r in gw.produced if r.ts < cutoff}
    stored_rows = sum(len(rows(influx, m, f"WHERE time < {int(cutoff)}ms"))
                      for m in Registry({cfg.cell.id: cfg}).measurements)
    assert stored_rows == len(produced_rows), "a reading was stored twice, or re-stamped"
    return sum(1 for r in gw.produced if r.ts < cutoff)


async def test_sigkill_collector_then_restart_stores_every_reading_once(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    cfg, cells = _setup(tmp_path)
    sim = SimulatorServer([cfg])
    await sim.start()
    log = tmp_path / "collector.log"
    collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", log)
    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    try:
        await wait_for(lambda: _row_count(influxdb, cfg) > 20, 20, "the collector storing")
        collector.kill()  # mid-stream: messages received but not yet written are not acknowledged
        await asyncio.sleep(3)
        collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", log)
        await asyncio.sleep(4)
        cutoff = await _finish(gw, stop, task, influxdb, cfg)
    finally:
        collector.stop()
        await sim.stop()
    assert _assert_exactly_once(gw, influxdb, cfg, cutoff) > 500


async def test_influxdb_outage_of_60s_loses_nothing_and_memory_stays_bounded(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    cfg, cells = _setup(tmp_path, poll=0.1)  # ~300 readings/s
    sim = SimulatorServer([cfg])
    await sim.start()
    collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", tmp_path / "collector.log")
    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    rss: list[float] = []
    try:
        await wait_for(lambda: _row_count(influxdb, cfg) > 20, 20, "the collector storing")
        await asyncio.sleep(3)
        baseline = collector.rss_mb()
        influxdb.stop()
        for _ in range(12):
            await asyncio.sleep(5)
            rss.append(collector.rss_mb())
        queued = collector.metric("kwwk_collector_queue_messages")
        influxdb.start()
        cutoff = await _finish(gw, stop, task, influxdb, cfg, timeout=90)
        errors = collector.metric("kwwk_collector_write_errors_total", retryable="true")
    finally:
        collector.stop()
        await sim.stop()
    stored = _assert_exactly_once(gw, influxdb, cfg, cutoff)
    assert stored > 60 * 200, "the gateway kept publishing during the outage"
    assert errors >= 1, "the outage was seen and counted"
    # bounded: the broker keeps the backlog; the collector holds at most its receive window
    assert queued <= 500
    assert max(rss) - baseline < 40, f"collector memory grew from {baseline:.0f} to {max(rss):.0f} MiB"


async def test_three_replicas_share_the_load_and_losing_one_loses_nothing(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    cfg, cells = _setup(tmp_path, poll=0.1)
    sim = SimulatorServer([cfg])
    await sim.start()
    replicas = [CollectorProc(cells, mosquitto, influxdb, f"kwwk-collector-{i}", tmp_path / f"c{i}.log")
                for i in (1, 2, 3)]
    await asyncio.sleep(2)
    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    try:
        await asyncio.sleep(6)
        shares = [r.metric("kwwk_collector_readings_total", result="stored") for r in replicas]
        replicas[1].kill()
        await asyncio.sleep(8)
        cutoff = await _finish(gw, stop, task, influxdb, cfg, timeout=90)
        filled = sum(r.metric("kwwk_collector_sequence_gaps_recovered_total") for r in (replicas[0], replicas[2]))
    finally:
        for r in replicas:
            r.stop()
        await sim.stop()
    assert all(s > 0 for s in shares), f"every replica took a share of the load: {shares}"
    assert _assert_exactly_once(gw, influxdb, cfg, cutoff) > 1000
    print(f"shares before the kill: {shares}; gaps filled by resend after it: {filled}")
