"""Collector replicas in the shared group (real Mosquitto, InfluxDB, gateway and simulator; `kwwk collector run`
processes): a clean stop parks nothing at the broker, and after a SIGKILL every reading is stored, none later
than 30 s after it was published."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from collector.ingest import COLLECTOR_MQTT, COLLECTOR_SESSION_EXPIRY_S, CollectorSettings, Ingest
from collector.registry import Registry
from collector.storage import InfluxSettings, V1Writer
from edge.cell import load_cell
from edge.mqtt import connect_kwargs, paho_client
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT
from tests.helpers import Recorder, rows, wait_for, wait_until
from tests.test_collector import CollectorProc, _assert_exactly_once, _finish, _run_gateway, _setup

pytestmark = pytest.mark.integration

#: the audit interval production runs with (docker-compose.yml), not test_collector's quicker 2 s
AUDIT_INTERVAL = yaml.safe_load((ROOT / "docker-compose.yml").read_text())[
    "services"]["collector"]["environment"]["KWWK_AUDIT_INTERVAL"]
LATENESS_BOUND_S = 30.0


class Replica(CollectorProc):
    """`kwwk collector run` as in production: CollectorProc with the shipped audit interval."""

    def __init__(self, cells: Path, broker: Mosquitto, influx: InfluxDB1, client_id: str, log: Path) -> None:
        self.log, self._log_from, self._health = log, log.stat().st_size if log.exists() else 0, None
        args = ["collector", "run", "--cells", str(cells), "--mqtt-port", str(broker.port), "--influx-url",
                influx.url, "--client-id", client_id, "--health-port", "0", "--audit-interval", str(AUDIT_INTERVAL)]
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "kwwk"), *args],  # noqa: S603
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "KWWK_LOG_LEVEL": "INFO"})

    def said(self, event: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_bytes().splitlines() if f'"{event}"'.encode() in line]


class Published(Recorder):
    """When the broker forwarded each batch (stream, seq) the first time: its publication, to the millisecond."""

    def __init__(self, port: int) -> None:
        self.first: dict[tuple[str, int], float] = {}
        super().__init__(port, client_id="test-published")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        self.first.setdefault((body["stream"], body["seq"]), time.time())


class Stored(threading.Thread):
    """Polls kwwk_batches (written with the readings of its batch) every 0.25 s: when each batch was first there."""

    def __init__(self, influx: InfluxDB1) -> None:
        super().__init__(name="stored-poller", daemon=True)
        self.influx, self.halt = influx, threading.Event()
        self.first: dict[tuple[str, int], float] = {}

    def poll(self) -> None:
        now = time.time()
        for row in rows(self.influx, "kwwk_batches"):
            self.first.setdefault((row["stream"], int(row["seq"])), now)

    def run(self) -> None:
        while not self.halt.wait(0.25):
            self.poll()


async def test_sigterm_one_replica_then_sigkill_another_every_reading_stored_within_30s(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    """Acceptance (issue 14): three replicas; SIGTERM one (it ends its session: batches published afterwards are
    stored as promptly as before), then SIGKILL another (its session takes its turn until it expires after
    COLLECTOR_SESSION_EXPIRY_S, then the survivors' audit has those batches resent): every reading stored
    once, and the worst lateness (broker's first forward to first sight in InfluxDB) under 30 s."""
    cfg, cells, sim = await _setup(tmp_path, poll=0.1)
    published = Published(mosquitto.port)
    replicas = [Replica(cells, mosquitto, influxdb, f"kwwk-replica-{i}", tmp_path / f"r{i}.log") for i in (1, 2, 3)]
    stored = Stored(influxdb)
    for r in replicas:
        await r.started()
    await wait_for(lambda: all(r.metric("kwwk_collector_broker_connected") == 1 for r in replicas), 30,
                   "every replica connected")
    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    stored.start()
    try:
        await wait_for(lambda: all(r.metric("kwwk_collector_readings_total", result="stored") for r in replicas), 30,
                       "every replica storing a share")
        await wait_for(lambda: published.first, 10, "the recorder seeing the gateway's batches")
        term_at = time.time()
        await asyncio.to_thread(replicas[0].stop)
        produced = len(gw.produced)
        await wait_for(lambda: len(gw.produced) > produced + 1500, 30, "the gateway publishing after the SIGTERM")
        kill_at = time.time()
        replicas[1].kill()
        # time passing is the point: the killed replica's session outlives it for its expiry, taking its turn of
        # the shared subscription meanwhile, and the survivors' audit needs rounds to have those batches resent
        await asyncio.sleep(COLLECTOR_SESSION_EXPIRY_S + 4 * float(AUDIT_INTERVAL))
        cutoff = await _finish(gw, stop, task, influxdb, cfg, timeout=90)
    finally:
        stored.halt.set()
        stored.join(5)
        for r in replicas:
            r.stop()
        published.close()
        await sim.stop()
    stored.poll()
    assert _assert_exactly_once(gw, influxdb, cfg, cutoff) > 3000
    ended = replicas[0].said("left the broker")
    assert ended and ended[-1]["session"] == "ended", f"the SIGTERMed replica did not end its session: {ended}"
    batches = {k: t for k, t in published.first.items() if t * 1000 < cutoff - 1000}
    never = sorted(set(batches) - set(stored.first))
    assert not never, f"{len(never)} published batches never appeared in kwwk_batches: {never[:10]}"
    late = {k: stored.first[k] - t for k, t in batches.items()}
    worst = max(late, key=late.__getitem__)
    between = [late[k] for k, t in batches.items() if term_at + 1 < t < kill_at - 1]
    after_kill = sorted((late[k] for k, t in batches.items() if t >= kill_at - 1), reverse=True)
    print(f"\n{len(batches)} batches; worst lateness {late[worst]:.1f} s (seq {worst[1]}, published "
          f"{batches[worst] - kill_at:+.1f} s from the SIGKILL); between SIGTERM and SIGKILL at worst "
          f"{max(between):.1f} s; after the SIGKILL {sum(1 for x in after_kill if x > 2)} batches later than 2 s, "
          f"the slowest {[round(x, 1) for x in after_kill[:5]]} s")
    assert late[worst] < LATENESS_BOUND_S
    # the clean stop parked nothing: what the SIGTERMed replica would have been dealt went to the others at once
    assert max(between) < 5, f"batches published after the SIGTERM were late: {sorted(between)[-5:]}"
    assert after_kill[0] > 2, "the SIGKILLed replica's session swallowed nothing: the test saw no resend"


def test_a_clean_stop_ends_the_session_and_a_lost_connection_keeps_it(mosquitto: Mosquitto,
                                                                       influxdb: InfluxDB1) -> None:
    """Ingest.stop DISCONNECTs with Session Expiry Interval 0: resuming its client id finds no session. A
    connection that just ends (what a SIGKILL leaves) keeps the session for COLLECTOR_SESSION_EXPIRY_S."""
    cell = load_cell(ROOT / "tests/data/twocell.yaml")
    settings = COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="replica-clean")
    ingest = Ingest(CollectorSettings(mqtt=settings, flush_interval_s=0.05), Registry({"twocell": cell}),
                    V1Writer(InfluxSettings(url=influxdb.url)))
    ingest.start()
    assert ingest.subscribed.wait(10), "the collector subscribed"
    ingest.stop()

    def resume(client_id: str) -> bool:
        """Connect as client_id asking to resume; True when the broker had a session for it."""
        flags: dict[str, bool] = {}
        c = paho_client(settings.replace(client_id=client_id))
        c.on_connect = lambda _c, _u, f, _r, _p: flags.setdefault("present", f.session_present)
        c.connect(**connect_kwargs(settings.replace(client_id=client_id)))
        c.loop_start()
        wait_until(lambda: "present" in flags, 5, f"a CONNACK for {client_id}")
        c.disconnect()
        c.loop_stop()
        return flags["present"]

    assert not resume("replica-clean"), "the cleanly stopped collector left its session at the broker"
    # the control: a persistent session whose connection ends without a stop is there to resume (the first call
    # creates it, its DISCONNECT keeps the expiry of the CONNECT)
    resume("replica-lost")
    assert resume("replica-lost"), "the broker kept no session: the check above proves nothing"
