"""Sequence numbers against real servers: absurd numbers cost a real collector no memory and do not stop its
audit; batch records of re-sends 1 ms apart never overwrite each other (real InfluxDB, real audit)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.audit import GapAuditor
from collector.encode import BATCH_MEASUREMENT, Encoder
from collector.lineprotocol import encode as encode_rows
from collector.metrics import CollectorMetrics
from collector.query import BlockingInfluxQL
from collector.registry import Registry
from collector.storage import InfluxSettings, V1Writer
from edge.cell import load_cell
from edge.telemetry import telemetry_topic
from kwwk.dev.localservers import InfluxDB1, Mosquitto
from tests.conftest import ROOT
from tests.helpers import Recorder, rows, wait_for
from tests.test_collector import CollectorProc

pytestmark = pytest.mark.integration
TOPIC = telemetry_topic("twocell", "gw-two")


def _batch(seq: int, stream: str, sent: int | None = None, **over: Any) -> bytes:
    sent = int(time.time() * 1000) if sent is None else sent
    return json.dumps({"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": stream,
                       "seq": seq, "sent": sent, "replay": False,
                       "polls": [{"device": "grid", "ts": sent - 500, "values": {"power": float(seq % 1000)}}],
                       **over}).encode()


async def test_absurd_sequence_numbers_cost_no_memory_and_the_audit_keeps_running(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    cells = tmp_path / "cells"
    cells.mkdir()
    shutil.copy(ROOT / "tests/data/twocell.yaml", cells)
    letters = Recorder(mosquitto.port, topic="kwwk/v1/_deadletter/#", client_id="test-deadletters")
    collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", tmp_path / "collector.log")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-gw-two", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    writer = V1Writer(InfluxSettings(url=influxdb.url, database=influxdb.database))

    def publish(payload: bytes) -> None:
        pub.publish(TOPIC, payload, qos=1).wait_for_publish(5)

    def rounds() -> float:
        return collector.metric("kwwk_collector_audit_rounds_total", result="ok")

    try:
        await collector.started()

        def stored_a_good_batch() -> bool:  # published again until the shared subscription is in place
            publish(_batch(0, "good"))
            return collector.metric("kwwk_collector_readings_total", result="stored") > 0

        await wait_for(stored_a_good_batch, 30, "a plausible batch stored", interval=0.5)
        await wait_for(lambda: rounds() >= 1, 30, "a completed audit round")
        baseline = collector.rss_mb()
        # from a gateway: refused at once (dead letter implausible_seq), never stored
        for seq, stream in ((10**12, "evil"), (2**63 - 1, "evilmax"), (3_000_000, "evil3m")):
            publish(_batch(seq, stream))
        # already stored (by a collector before this check): the audit must neither fill nor choke on them
        now_ms = int(time.time() * 1000)
        writer.write(encode_rows([
            (BATCH_MEASUREMENT, (("cell", "twocell"), ("gateway", "gw-two"), ("stream", stream)), now_ms - i,
             {"seq": float(seq), "readings": 1.0})
            for i, (seq, stream) in enumerate(((10**12, "old"), (2**63 - 1, "oldmax"), (3_000_000, "old3m")))]))
        after = rounds()
        peak = [baseline]

        def sampled(done: float) -> bool:
            peak[0] = max(peak[0], collector.rss_mb())
            return (collector.metric("kwwk_collector_rejects_total", reason="implausible_seq") == 3
                    and collector.metric("kwwk_collector_sequence_implausible_total") >= 3 and rounds() >= done)

        # six rounds with the absurd numbers stored: memory does not grow per round
        await wait_for(lambda: sampled(after + 6), 60,
                       "three refusals, three implausible runs counted and six more audit rounds")
        audited = int(rounds() - after)
        with urllib.request.urlopen(f"{collector._health}/healthz", timeout=5) as r:  # noqa: S310, SLF001
            health = json.loads(r.read())
        gaps_open = collector.metric("kwwk_collector_sequence_gaps_open")
        letters_seen = await wait_for(lambda: [m for m in letters.snapshot() if m.get("reason") == "implausible_seq"]
                                      if len(letters.snapshot()) >= 3 else None, 15, "three dead letters")
    finally:
        collector.stop()
        pub.loop_stop()
        pub.disconnect()
        letters.close()
        writer.close()
    growth = peak[0] - baseline
    print(f"\ncollector RSS {baseline:.1f} MiB before the absurd numbers, peak {peak[0]:.1f} MiB "
          f"(+{growth:.1f} MiB) over {audited} audit rounds; health: {health['audit']}")
    assert growth < 20, f"collector RSS grew by {growth:.1f} MiB"
    assert health["status"] == "ok" and health["audit"]["state"] == "ok", health
    assert gaps_open == 0, "nothing below or between absurd numbers is asked for"
    assert len(letters_seen) == 3, letters_seen
    assert all("beyond what the gateway can have sent" in m["detail"] for m in letters_seen)
    assert not [r for r in rows(influxdb, BATCH_MEASUREMENT) if r["stream"] in ("evil", "evilmax", "evil3m")]


def test_resends_1ms_apart_leave_no_false_gap(influxdb: InfluxDB1) -> None:
    """Batches sent within one ms, and the same batch re-sent 1 ms later: every number stays stored, the audit
    sees no gap, the fleet statistics (count of distinct numbers between min and max) none either."""
    settings = InfluxSettings(url=influxdb.url, database=influxdb.database)
    encoder = Encoder(Registry({"twocell": load_cell(ROOT / "tests/data/twocell.yaml")}))
    writer = V1Writer(settings)
    t = int(time.time() * 1000) - 20_000
    sends = [(0, t), (1, t), (2, t), (1, t + 1), (2, t + 1), (3, t + 1), (1000, t + 1), (1001, t + 2)]
    sends += [(seq, t + 2) for seq in range(4, 1000)]  # the re-sends a resend request brings, all at once
    asked: list[bytes] = []
    audit = GapAuditor(BlockingInfluxQL(settings), lambda _topic, body: asked.append(body), CollectorMetrics(),
                       grace_s=0)
    try:
        writer.write("".join(encoder.encode(TOPIC, _batch(seq, "s1", sent)).lines for seq, sent in sends))
        stored = audit.stored_seqs()[0][("twocell", "gw-two", "s1")]
        requested = audit.run_once()
        records = rows(influxdb, BATCH_MEASUREMENT)
        (stats,) = influxdb.query(
            f'SELECT count(distinct("seq")) AS n, min("seq") AS lo, max("seq") AS hi FROM "{BATCH_MEASUREMENT}" '
            f'GROUP BY "stream"')["results"][0]["series"]
    finally:
        audit.db.close()
        writer.close()
    print(f"\n{len(sends)} batch records written, {len(records)} points stored, {len(stored)} distinct numbers")
    assert stored == set(range(1002)), f"missing: {sorted(set(range(1002)) - stored)[:20]}"
    assert (requested, asked, audit.gaps) == (0, [], {})
    _time, n, lo, hi = stats["values"][0]
    assert hi - lo + 1 - n == 0
    sent_of = {seq: {s for q, s in sends if q == seq} for seq, _ in sends}
    assert all(r["sent"] in sent_of[int(r["seq"])] for r in records), "a record is its own batch's, never another's"
