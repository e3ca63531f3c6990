"""The collector bounds what it holds itself (Mosquitto 2.0.11 stops enforcing Receive Maximum once
acknowledgements flow): a burst far past the bound while the database is away, and again while it catches
up, never holds more than the bound, and everything is stored exactly once (real Mosquitto and InfluxDB)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.encode import BATCH_MEASUREMENT
from collector.ingest import COLLECTOR_MQTT, CollectorSettings, Ingest
from collector.registry import Registry
from collector.storage import InfluxSettings, V1Writer
from edge.cell import load_cell
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT
from tests.helpers import rows, wait_until

pytestmark = pytest.mark.integration

CELL = load_cell(ROOT / "tests/data/twocell.yaml")
TOPIC = "kwwk/v1/twocell/gw-two/telemetry"
MAX_MESSAGES = 50
MAX_BYTES = 8_000  # about 35 of these messages: the byte bound binds first
BURST = 3000


def _payloads(first_seq: int, n: int, t0: int) -> list[bytes]:
    return [json.dumps({"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": "burst1",
                        "seq": seq, "sent": t0 + seq, "replay": False,
                        "polls": [{"device": "grid", "ts": t0 + seq, "values": {"power": float(seq),
                                                                                "frequency": 50.0}}]}).encode()
            for seq in range(first_seq, first_seq + n)]


class _Sampler(threading.Thread):
    """Reads the held count as /metrics shows it (the gauge) as often as it can: the peak it saw."""

    def __init__(self, ingest: Ingest) -> None:
        super().__init__(daemon=True)
        self.ingest = ingest
        self.peak = 0.0
        self.peak_bytes = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        reg = self.ingest.metrics.registry
        while not self.done.is_set():
            self.peak = max(self.peak, reg.get_sample_value("kwwk_collector_queue_messages") or 0)
            self.peak_bytes = max(self.peak_bytes, reg.get_sample_value("kwwk_collector_held_bytes") or 0)
            time.sleep(0.002)


def _publish(port: int, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="burst-pub", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(TOPIC, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_burst_past_the_bound_holds_at_most_the_bound_and_stores_everything_once(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWWK_DEADLETTER_DIR", str(tmp_path / "dead"))
    ingest = Ingest(CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="bp-collector"),
                                      flush_interval_s=0.05),
                    Registry({"twocell": CELL}), V1Writer(InfluxSettings(url=influxdb.url)))
    ingest.writer.s = dataclasses.replace(ingest.writer.s, max_held_messages=MAX_MESSAGES, max_held_bytes=MAX_BYTES,
                                          retry_base_s=0.1, retry_cap_s=0.5)
    sampler = _Sampler(ingest)
    ingest.start()
    sampler.start()
    t0 = int(time.time() * 1000) - 3_600_000
    try:
        assert ingest.subscribed.wait(10), "the collector subscribed"
        influxdb.stop()  # the database is away: nothing is acknowledged, the broker would push on
        _publish(mosquitto.port, _payloads(1, BURST, t0))
        wait_until(lambda: ingest.writer.database_state == "unreachable", 15, "the writer seeing the outage")
        wait_until(lambda: ingest.writer.waiting_since is not None, 15, "the network thread waiting for room")
        held_while_away = ingest.writer.queued
        influxdb.start()  # back: acknowledgements flow, and a second burst comes at full speed meanwhile
        _publish(mosquitto.port, _payloads(BURST + 1, BURST, t0))
        wait_until(lambda: len(rows(influxdb, "electricity_meter")) >= 2 * BURST, 90,
                   lambda: f"every reading stored (held {ingest.writer.queued})", interval=0.5)
        wait_until(lambda: ingest.writer.queued == 0, 30, "everything acknowledged")
    finally:
        sampler.done.set()
        ingest.stop()
    waited = ingest.metrics.registry.get_sample_value("kwwk_collector_backpressure_seconds_total")
    print(f"held while the database was away: {held_while_away}; peak held {ingest.writer.peak_held} messages "
          f"(gauge peak {sampler.peak:.0f}), {ingest.writer.peak_held_bytes} bytes (gauge peak "
          f"{sampler.peak_bytes:.0f}); the network thread waited {waited:.1f} s in all")
    assert ingest.writer.peak_held <= MAX_MESSAGES and sampler.peak <= MAX_MESSAGES
    assert ingest.writer.peak_held_bytes <= MAX_BYTES and sampler.peak_bytes <= MAX_BYTES
    stored = rows(influxdb, "electricity_meter")
    assert len(stored) == 2 * BURST, "each reading once"
    assert sorted(r["power"] for r in stored) == [float(s) for s in range(1, 2 * BURST + 1)]
    assert {r["seq"] for r in rows(influxdb, BATCH_MEASUREMENT)} == {float(s) for s in range(1, 2 * BURST + 1)}
    assert not (tmp_path / "dead").exists() or not any((tmp_path / "dead").iterdir()), "nothing dead-lettered"
