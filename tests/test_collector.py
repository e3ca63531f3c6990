"""The collector: at least once into InfluxDB, exactly once in effect, through crashes, database outages and
replica failures (real Mosquitto, real InfluxDB, real gateway and simulator)."""

from __future__ import annotations

import asyncio
import json
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
from gateway.settings import gateway_mqtt
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT, start_simulator
from tests.helpers import RecordingGateway, rows, wait_for

pytestmark = pytest.mark.integration


class CollectorProc:
    """`kwwk collector run` as its own process, as it runs in production."""

    def __init__(self, cells: Path, mqtt: Mosquitto, influx: InfluxDB1, client_id: str, log: Path) -> None:
        kwwk = Path(sys.executable).parent / "kwwk"
        self.log, self._log_from = log, log.stat().st_size if log.exists() else 0  # a restart appends to the log
        self._health: str | None = None
        self.proc = subprocess.Popen(  # noqa: S603
            [str(kwwk), "collector", "run", "--cells", str(cells), "--mqtt-port", str(mqtt.port),
             "--influx-url", influx.url, "--client-id", client_id, "--health-port", "0",
             "--audit-interval", "2"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "KWWK_LOG_LEVEL": "INFO"})

    async def started(self) -> None:
        """Wait until the collector has said where its health server listens (it binds port 0)."""
        def said() -> str | None:
            assert self.proc.poll() is None, f"the collector exited: see {self.log}"
            with self.log.open("rb") as f:
                f.seek(self._log_from)
                started = [json.loads(line) for line in f.read().splitlines() if b'"collector started"' in line]
            return started[0]["health"].removesuffix("/healthz") if started else None

        self._health = await wait_for(said, 30, f"the collector saying where its health server listens ({self.log})",
                                      interval=0.1)

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        assert self._health is not None, "await started() first"
        with urllib.request.urlopen(f"{self._health}/metrics", timeout=5) as r:  # noqa: S310
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


async def _setup(tmp_path: Path, poll: float = 0.2) -> tuple[CellConfig, Path, SimulatorServer]:
    """The two-meter cell polled every `poll` s, its simulator serving on ports it reports, the cells folder."""
    text = (ROOT / "tests/data/twocell.yaml").read_text().replace("poll_interval: 1", f"poll_interval: {poll}")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/twocell.yaml").write_text(text)
    sim, path = await start_simulator(tmp_path / "src/twocell.yaml", tmp_path / "cells")
    return load_cell(path), path.parent, sim


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
    gw = RecordingGateway(cfg, "gw-two", gateway_mqtt(port=mosquitto.port, reconnect_max_s=2),
                          tmp_path / "outbox.sqlite")
    return gw, stop, asyncio.create_task(gw.run(stop))


async def _finish(gw: RecordingGateway, stop: asyncio.Event, task: asyncio.Task[None], influx: InfluxDB1,
                  cfg: CellConfig, timeout: float = 60) -> float:
    """Wait until everything the gateway produced up to now is stored (its archive answers resend requests
    meanwhile, so it keeps running), then stop it; return the cut-off time (ms)."""
    cutoff = time.time() * 1000
    devices = {p.device.id for p in gw.pollers}

    def all_stored() -> bool:
        # a device's polls run one after another: once it has a reading stamped after the cut-off, every poll
        # it started before the cut-off is in `produced` (a poll under way at the cut-off is not missed)
        if {r.device for r in gw.produced if r.ts >= cutoff} != devices:
            return False
        return {(r.device, r.point, r.ts) for r in gw.produced if r.ts < cutoff} <= _stored_keys(influx, cfg)

    try:
        await wait_for(all_stored, timeout, "every produced reading in InfluxDB", interval=1)
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
    cfg, cells, sim = await _setup(tmp_path)
    log = tmp_path / "collector.log"
    collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", log)
    await collector.started()
    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    try:
        await wait_for(lambda: _row_count(influxdb, cfg) > 20, 20, "the collector storing")
        collector.kill()  # mid-stream: messages received but not yet written are not acknowledged
        produced = len(gw.produced)  # away for a while: the broker keeps what comes meanwhile in the session
        await wait_for(lambda: len(gw.produced) > produced + 100, 20, "the gateway publishing while the collector is away")
        collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", log)
        await collector.started()
        await wait_for(lambda: collector.metric("kwwk_collector_readings_total", result="stored") > 0, 30,
                       "the restarted collector storing")
        cutoff = await _finish(gw, stop, task, influxdb, cfg)
    finally:
        collector.stop()
        await sim.stop()
    assert _assert_exactly_once(gw, influxdb, cfg, cutoff) > 500


async def test_influxdb_outage_of_60s_loses_nothing_and_memory_stays_bounded(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    cfg, cells, sim = await _setup(tmp_path, poll=0.1)  # ~300 readings/s
    collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", tmp_path / "collector.log")
    await collector.started()
    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    rss: list[float] = []
    try:
        await wait_for(lambda: _row_count(influxdb, cfg) > 20, 20, "the collector storing")
        rows = _row_count(influxdb, cfg)  # warmed up: the memory baseline is taken while storing
        await wait_for(lambda: _row_count(influxdb, cfg) > rows + 200, 20, "the collector storing steadily")
        baseline = collector.rss_mb()
        influxdb.stop()
        for _ in range(12):  # the outage is 60 s of real time: sampling memory is all there is to do meanwhile
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
    cfg, cells, sim = await _setup(tmp_path, poll=0.1)
    replicas = [CollectorProc(cells, mosquitto, influxdb, f"kwwk-collector-{i}", tmp_path / f"c{i}.log")
                for i in (1, 2, 3)]
    for r in replicas:
        await r.started()
    await wait_for(lambda: all(r.metric("kwwk_collector_broker_connected") == 1 for r in replicas), 30,
                   "every replica connected")

    def every_share() -> list[float] | None:
        shares = [r.metric("kwwk_collector_readings_total", result="stored") for r in replicas]
        return shares if all(shares) else None

    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    try:
        shares = await wait_for(every_share, 30, "every replica storing a share")
        replicas[1].kill()
        produced = len(gw.produced)
        # its session stays and keeps taking its turn of the shared subscription: the survivors' audit sees
        # gaps, while the gateway goes on producing (well over the 1,000 readings asserted below)
        await wait_for(lambda: len(gw.produced) > produced + 1500 and sum(
            r.metric("kwwk_collector_sequence_gaps_total") for r in (replicas[0], replicas[2])), 30,
            "the surviving replicas finding the batches the killed one swallowed")
        cutoff = await _finish(gw, stop, task, influxdb, cfg, timeout=90)
        filled = sum(r.metric("kwwk_collector_sequence_gaps_recovered_total") for r in (replicas[0], replicas[2]))
    finally:
        for r in replicas:
            r.stop()
        await sim.stop()
    assert all(s > 0 for s in shares), f"every replica took a share of the load: {shares}"
    assert _assert_exactly_once(gw, influxdb, cfg, cutoff) > 1000
    # the dead replica's session took its turn of batches until the end: the survivors' audit had them resent
    assert filled > 0, f"no sequence gap was filled by a resend (shares before the kill: {shares})"


def test_the_audit_asks_for_missing_sequence_numbers_until_they_are_stored(influxdb: InfluxDB1) -> None:
    """The audit reads kwwk_batches through the one InfluxQL client, asks once the grace has passed, asks
    again only after its backoff, and counts a gap as filled once the batch is stored."""
    from collector.audit import GapAuditor
    from collector.encode import BATCH_MEASUREMENT
    from collector.lineprotocol import encode
    from collector.metrics import CollectorMetrics
    from collector.query import BlockingInfluxQL
    from collector.storage import InfluxSettings, V1Writer
    from edge.messages import ResendRequest

    settings = InfluxSettings(url=influxdb.url, database=influxdb.database)
    writer = V1Writer(settings)
    now_ms = int(time.time() * 1000)

    def store(*seqs: int) -> None:
        writer.write(encode([(BATCH_MEASUREMENT, (("cell", "twocell"), ("gateway", "gw-two"), ("stream", "s1")),
                              now_ms - 10_000 + seq, {"seq": float(seq)}) for seq in seqs]))

    store(0, 1, 3, 6)
    asked: list[tuple[str, ResendRequest]] = []
    metrics = CollectorMetrics()
    audit = GapAuditor(BlockingInfluxQL(settings), lambda topic, body: asked.append((topic, ResendRequest.parse(body))),
                       metrics, grace_s=10, retry_s=30)
    t0 = time.time()
    try:
        assert audit.run_once(t0) == 0, "within the grace nobody is asked"
        assert audit.run_once(t0 + 10) == 3
        ((topic, request),) = asked
        assert topic == "kwwk/v1/twocell/gw-two/resend"
        assert (request.stream, sorted(request.seqs)) == ("s1", [2, 4, 5])
        assert audit.run_once(t0 + 10 + 14.9) == 0, "the first retry waits at least half the retry interval"
        assert audit.run_once(t0 + 10 + 30) == 3, "and at most the retry interval"
        store(2, 4)
        assert audit.run_once(t0 + 100) == 1
        assert sorted(asked[-1][1].seqs) == [5]
        assert metrics.gaps_recovered.labels("twocell", "gw-two")._value.get() == 2  # noqa: SLF001
        assert metrics.gaps_open._value.get() == 1  # noqa: SLF001
        assert metrics.audit_up._value.get() == 1  # noqa: SLF001
    finally:
        audit.db.close()
        writer.close()
