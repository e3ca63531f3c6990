"""Dead letters are kept durably on the central side with their payload (a bounded JSON-lines file per day),
and `kwwk collector replay-deadletters` re-ingests them after a fix: what is still bad is dead-lettered
again, nothing is lost (real InfluxDB, real Mosquitto and collector)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.acking import AckingWriter, Message, WriterSettings
from collector.deadletters import DeadLetterStore, StoredLetter
from collector.encode import Encoder
from collector.metrics import CollectorMetrics
from collector.registry import Registry
from collector.storage import InfluxSettings, V1Writer
from edge.cell import load_cell
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT
from tests.helpers import rows, wait_for, wait_until
from tests.test_collector import CollectorProc

TOPIC = "kwwk/v1/twocell/gw-two/telemetry"
CELL_TEXT = (ROOT / "tests/data/twocell.yaml").read_text()


def _letter(reason: str = "bad_json", payload: bytes = b"{", received: int | None = None) -> StoredLetter:
    return StoredLetter(reason, "detail", TOPIC, payload, received or int(time.time() * 1000), "twocell", "gw-two")


def test_the_store_keeps_payloads_exactly_and_counts_what_it_drops(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path, max_bytes_per_day=2000)
    binary = bytes(range(256))
    kept = store.append([_letter(payload=b'{"a": "\xc3\xa4"'), _letter("bad_schema", binary)])
    assert len(kept) == 2
    back = list(store.read())
    assert [(d.reason, d.payload) for d in back] == [("bad_json", b'{"a": "\xc3\xa4"'), ("bad_schema", binary)]
    assert all(d.stored > 0 and d.id for d in back)
    while store.dropped == 0:  # the day's file is full: dropped and counted, never an error
        store.append([_letter(payload=b"x" * 300)])
    size = store.path_for(time.strftime("%Y-%m-%d", time.gmtime())).stat().st_size
    assert size <= 2000
    assert store.stored == len(list(store.read()))
    assert [d.reason for d in store.read(reason="bad_schema")] == ["bad_schema"]
    store.mark_replayed([back[0].id])
    assert back[0].id not in {d.id for d in store.read()}
    assert not list(store.read(since_ms=int(time.time() * 1000) + 60_000))


def _cells(folder: Path, *, without_chp: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = CELL_TEXT
    if without_chp:  # the operator forgot a device: its readings are dead-lettered as unknown_device
        text = re.sub(r"      - id: chp\n(        .*\n)+", "", text)
    (folder / "twocell.yaml").write_text(text)
    return folder


def _message(seq: int, device: str) -> bytes:
    now = int(time.time() * 1000)
    point = "power" if device == "grid" else "error_bits"
    return json.dumps({"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": "dl1",
                       "seq": seq, "sent": now, "replay": False,
                       "polls": [{"device": device, "ts": now - 10 * seq, "values": {point: float(seq)}}]}).encode()


@pytest.mark.integration
def test_replay_stores_what_a_fix_made_storable_and_keeps_what_is_still_bad(tmp_path: Path, influxdb: InfluxDB1) -> None:
    dead = tmp_path / "dead"
    acked: list[int] = []
    writer = AckingWriter(WriterSettings(flush_interval_s=0.05, deadletter_dir=str(dead)),
                          Encoder(Registry.from_dir(_cells(tmp_path / "before", without_chp=True))),
                          V1Writer(InfluxSettings(url=influxdb.url)), CollectorMetrics(),
                          ack=lambda mid, _q: acked.append(mid))
    writer.start()
    chp = [_message(seq, "chp") for seq in range(1, 11)]
    try:
        for seq, payload in enumerate(chp, 1):
            writer.put(Message(seq, 1, TOPIC, payload))
        writer.put(Message(11, 1, TOPIC, b"\xff not json"))
        wait_until(lambda: len(acked) == 11, 15, "every message acknowledged")
    finally:
        writer.stop()
    before = Counter(d.reason for d in DeadLetterStore(dead).read())
    assert before == {"unknown_device": 10, "bad_json": 1}
    assert not rows(influxdb, "chp")

    kwwk = Path(sys.executable).parent / "kwwk"
    replay = [str(kwwk), "collector", "replay-deadletters", "--dir", str(dead), "--cells",
              str(_cells(tmp_path / "after")), "--influx-url", influxdb.url]
    first = subprocess.run(replay, capture_output=True, text=True, timeout=120, check=True)  # noqa: S603
    print(first.stdout.strip())
    assert "replayed 11 dead letters: 10 stored, 0 in part, 1 refused again" in first.stdout
    assert sorted(r["error_bits"] for r in rows(influxdb, "chp")) == [float(s) for s in range(1, 11)]
    again = [d for d in DeadLetterStore(dead).read()]
    assert [(d.reason, d.payload) for d in again] == [("bad_json", b"\xff not json")]
    assert again[0].replay_of is not None, "the new dead letter names the one it replays"
    # a replay of the same folder takes only what was not replayed yet: the one refused again
    second = subprocess.run(replay + ["--reason", "unknown_device"], capture_output=True, text=True,  # noqa: S603
                            timeout=120, check=True)
    assert "replayed 0 dead letters" in second.stdout


def _hostile(i: int) -> tuple[str, bytes]:
    """Ten kinds of hostile or broken messages, each dead-lettered whole, for reasons the encoder names."""
    now = int(time.time() * 1000)
    good = {"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": "hostile", "seq": i + 1,
            "sent": now, "replay": False, "polls": [{"device": "grid", "ts": now, "values": {"power": 1.0}}]}
    kind = i % 10
    if kind == 0:
        return TOPIC, b"\x00\xff" * 50  # not even UTF-8
    if kind == 1:
        return TOPIC, b'{"schema": "kwwk.telemetry/2", "seq": '
    if kind == 2:
        return TOPIC, json.dumps({**good, "schema": "kwwk.telemetry/99"}).encode()
    if kind == 3:
        return TOPIC, json.dumps({**good, "polls": [{"device": "grid", "ts": now, "values": {"power": "1e9"}}]}).encode()
    if kind == 4:
        return TOPIC, json.dumps({**good, "gateway": "gw-other"}).encode()
    if kind == 5:
        return "kwwk/v1/twocell/gw-evil/telemetry", json.dumps({**good, "gateway": "gw-evil"}).encode()
    if kind == 6:
        return "kwwk/v1/nocell/gw-two/telemetry", json.dumps({**good, "cell": "nocell"}).encode()
    if kind == 7:
        return TOPIC, json.dumps({**good, "polls": "all of them"}).encode()
    if kind == 8:
        return TOPIC, b"[" * 5000
    return TOPIC, json.dumps({**good, "polls": [{"device": "grid", "ts": now, "values": {"power": 1.0},
                                                "extra": "x" * 2000}] * 3, "seq": -5}).encode()


@pytest.mark.integration
async def test_ten_thousand_hostile_payloads_are_kept_durably_with_bounded_memory_and_a_short_log(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = tmp_path / "dead"
    monkeypatch.setenv("KWWK_DEADLETTER_DIR", str(dead))
    log = tmp_path / "collector.log"
    collector = CollectorProc(_cells(tmp_path / "cells"), mosquitto, influxdb, "kwwk-collector-1", log)
    await collector.started()
    await wait_for(lambda: collector.metric("kwwk_collector_broker_connected") == 1, 30, "the collector connected")
    baseline = collector.rss_mb()
    lines_before = len(log.read_text().splitlines())
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    store = DeadLetterStore(dead)
    try:
        hostile = [_hostile(i) for i in range(10_000)]
        infos = [client.publish(topic, payload, qos=1) for topic, payload in hostile]
        await asyncio.to_thread(lambda: [info.wait_for_publish(60) for info in infos])
        await wait_for(lambda: collector.metric("kwwk_collector_deadletters_durable_total", result="stored") >= 10_000,
                       180, "every hostile message kept durably", interval=1)
        peak = _peak_rss_mb(collector)
    finally:
        client.disconnect()
        client.loop_stop()
        collector.stop()
    letters = list(store.read())
    reasons = Counter(d.reason for d in letters)
    log_lines = len(log.read_text().splitlines()) - lines_before
    print(f"10,000 hostile payloads: {len(letters)} dead letters kept ({dict(reasons)}); collector RSS "
          f"{baseline:.0f} MiB before, peak {peak:.0f} MiB; {log_lines} log lines")
    assert len(letters) == 10_000
    assert all(d.reason and d.payload for d in letters)
    assert sum(reasons.values()) == 10_000 and "storage_rejected" not in reasons
    assert Counter(d.payload for d in letters) == Counter(p for _t, p in hostile), "each keeps the payload that came"
    assert peak - baseline < 60, f"collector memory grew from {baseline:.0f} to {peak:.0f} MiB"
    assert log_lines < 100


def _peak_rss_mb(collector: CollectorProc) -> float:
    status = Path(f"/proc/{collector.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
