"""What the database answers decides what happens to a message: only a refusal of the data itself is
dead-lettered; a wrong credential, a missing database, a server error or silence holds the messages
unacknowledged until it is fixed (real InfluxDB 1.6, real Mosquitto, real gateway and collector)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from collector.acking import AckingWriter, Message, WriterSettings
from collector.deadletters import DeadLetterStore
from collector.encode import Encoder
from collector.metrics import CollectorMetrics
from collector.registry import Registry
from collector.storage import DATA_REFUSED, InfluxSettings, StorageError, V1Writer, V2Writer, classify
from edge.cell import load_cell
from kwwk.dev.localservers import InfluxDB1, Mosquitto, VictoriaMetrics
from tests.conftest import ROOT
from tests.helpers import rows, wait_for, wait_until
from tests.test_collector import CollectorProc, _assert_exactly_once, _finish, _run_gateway, _setup

CELL = load_cell(ROOT / "tests/data/twocell.yaml")
TOPIC = "kwwk/v1/twocell/gw-two/telemetry"


def _answer(settings: InfluxSettings, lines: str) -> str:
    """The kind of a write's refusal ("ok" when it was stored), printed with what the server said."""
    writer = V1Writer(settings)
    try:
        writer.write(lines)
    except StorageError as err:
        print(f"{settings.database} {settings.basic_auth and settings.basic_auth[0]}: {err.kind}: {err}")
        return err.kind
    finally:
        writer.close()
    return "ok"


def test_classify_without_a_server() -> None:
    assert classify(400, '{"error":"partial write: field type conflict: input field \\"power\\" ..."}') == DATA_REFUSED
    assert classify(400, '{"error":"unable to parse \'x\': missing fields"}') == DATA_REFUSED
    assert classify(422, "failure writing points to database: partial write: field type conflict") == DATA_REFUSED
    assert classify(413, "Request Entity Too Large") == DATA_REFUSED
    assert classify(401, '{"error":"authorization failed"}') == "auth_failed"
    assert classify(403, '{"error":"\\"r\\" user is not authorized to write to database \\"kwwk\\""}') == "forbidden"
    assert classify(404, '{"error":"database not found: \\"nope\\""}') == "database_missing"
    assert classify(400, '{"error":"database is required"}') == "server_error"
    assert classify(400, "partial write: max-series-per-database limit exceeded: (1000000)") == "server_error"
    assert classify(500, "timeout") == "server_error"
    assert classify(503, "") == "server_error"
    assert classify(None, "") == "unreachable"
    assert StorageError("x", retryable=False).kind == DATA_REFUSED  # the old signature still means the same
    assert StorageError("x", retryable=True).retryable


@pytest.mark.integration
def test_what_influxdb_1_6_answers_is_classified(influxdb: InfluxDB1) -> None:
    db = InfluxSettings(url=influxdb.url)
    now = int(time.time() * 1000)
    assert _answer(db, f"m,t=a f=1 {now}\n") == "ok"
    assert _answer(db, f'm,t=a f="text" {now + 1}\n') == DATA_REFUSED  # a field-type conflict
    assert _answer(db, "m,t=a f=\n") == DATA_REFUSED  # unparsable
    assert _answer(InfluxSettings(url=influxdb.url, database="dropped"), f"m f=1 {now}\n") == "database_missing"

    influxdb.stop()
    influxdb.auth = ("admin", "right")
    influxdb.start()
    influxdb.query("CREATE USER \"reader\" WITH PASSWORD 'r'", method="POST")
    assert _answer(db, f"m f=1 {now}\n") == "auth_failed"  # no credentials
    assert _answer(InfluxSettings(url=influxdb.url, token="admin:wrong"), f"m f=1 {now}\n") == "auth_failed"
    assert _answer(InfluxSettings(url=influxdb.url, username="reader", password="r"), f"m f=1 {now}\n") == "forbidden"
    assert _answer(InfluxSettings(url=influxdb.url, token="admin:right"), f"m f=2 {now}\n") == "ok"
    influxdb.stop()
    assert _answer(db, f"m f=1 {now}\n") == "unreachable"


@pytest.mark.integration
def test_what_victoriametrics_answers_through_the_v2_api_is_classified(victoria: VictoriaMetrics) -> None:
    writer = V2Writer(InfluxSettings(url=victoria.url, api="v2", token="any"))
    try:
        writer.write(f"m,t=a f=1 {int(time.time() * 1000)}\n")
        # VictoriaMetrics 1.79 answers 204 even to a line it cannot parse (it logs and skips it): it never
        # refuses data, so through it nothing is dead-lettered by the database, only by the encoder
        writer.write("m,t=a f=\n")
    finally:
        writer.close()
    victoria.stop()
    writer = V2Writer(InfluxSettings(url=victoria.url, api="v2", token="any", timeout_s=2))
    try:
        with pytest.raises(StorageError) as away:
            writer.write("m f=1\n")
        assert away.value.kind == "unreachable", away.value
    finally:
        writer.close()


def _payload(seq: int, device: str = "grid", point: str = "power", value: object = 1.5) -> bytes:
    now = int(time.time() * 1000)
    return json.dumps({"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": "dberr1",
                       "seq": seq, "sent": now, "replay": False,
                       "polls": [{"device": device, "ts": now - 1000 + seq, "values": {point: value}}]}).encode()


@pytest.mark.integration
def test_a_missing_database_holds_and_a_type_conflict_is_dead_lettered(tmp_path: Path, influxdb: InfluxDB1) -> None:
    acked: list[int] = []
    store = DeadLetterStore(tmp_path / "dead")
    registry = Registry({"twocell": CELL})
    writer = AckingWriter(WriterSettings(flush_interval_s=0.05, retry_base_s=0.05, retry_cap_s=0.2,
                                         deadletter_dir=None),
                          Encoder(registry), V1Writer(InfluxSettings(url=influxdb.url, database="later")),
                          CollectorMetrics(), ack=lambda mid, _q: acked.append(mid), deadletter_store=store)
    writer.start()
    try:
        for seq in range(1, 6):
            writer.put(Message(seq, 1, TOPIC, _payload(seq)))
        wait_until(lambda: writer.database_state == "database_missing", 10, "the writer naming the trouble")
        time.sleep(1)  # time passing is the point: a second of retries acknowledges nothing, dead-letters nothing
        assert acked == []
        assert writer.queued == 5
        assert list(store.read()) == []
        influxdb.query('CREATE DATABASE "later"', method="POST")  # the operator's fix
        wait_until(lambda: acked == [1, 2, 3, 4, 5], 15, "every held message stored and acknowledged in order")
        assert writer.database_state == "ok"

        # the database refuses the data itself: the CHP's error_bits field already holds strings this week
        chp = registry.devices[("twocell", "chp")]
        V1Writer(InfluxSettings(url=influxdb.url, database="later")).write(
            f'{chp.line_prefix}error_bits="text" {int(time.time() * 1000) - 5000}\n')
        conflict = _payload(7, "chp", "error_bits", 3.0)
        for seq, payload in ((6, _payload(6)), (7, conflict), (8, _payload(8))):
            writer.put(Message(seq, 1, TOPIC, payload))
        wait_until(lambda: acked[5:] == [6, 7, 8], 15, "the conflict dead-lettered, the rest stored, all acknowledged")
    finally:
        writer.stop()
    letters = list(store.read())
    assert [(d.reason, d.payload) for d in letters] == [("storage_rejected", conflict)]
    assert writer.database_state == "ok"
    influxdb.database = "later"
    assert len(rows(influxdb, "electricity_meter")) == 7  # seq 1-6 and 8


@pytest.mark.integration
async def test_a_wrong_credential_for_60s_acknowledges_nothing_and_loses_nothing(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB1, monkeypatch: pytest.MonkeyPatch) -> None:
    """InfluxDB restarted with auth on while the collector has a wrong token: the operator sees it (health,
    log), fixes the token and restarts the collector; every reading is stored, none twice, none dead-lettered."""
    cfg, cells, sim = await _setup(tmp_path)
    monkeypatch.setenv("KWWK_DEADLETTER_DIR", str(tmp_path / "dead"))
    monkeypatch.setenv("KWWK_INFLUX_TOKEN", "admin:wrong")  # ignored while InfluxDB runs without auth
    log = tmp_path / "collector.log"
    collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", log)
    await collector.started()
    gw, stop, task = await _run_gateway(cfg, mosquitto, tmp_path)
    try:
        await wait_for(lambda: collector.metric("kwwk_collector_readings_total", result="stored") > 50, 30,
                       "the collector storing")
        influxdb.stop()
        influxdb.auth = ("admin", "right")  # the database is restarted with auth on: our token is wrong
        influxdb.start()
        await wait_for(lambda: collector.metric("kwwk_collector_database_state", state="auth_failed") == 1, 30,
                       "the collector naming the refused credential")
        acked = collector.metric("kwwk_collector_messages_total")
        health = []
        for _ in range(12):  # 60 s with the wrong credential: sampling health is all there is to do meanwhile
            await asyncio.sleep(5)
            health.append(_health(collector))
        assert collector.metric("kwwk_collector_messages_total") == acked, "a message was settled meanwhile"
        assert collector.metric("kwwk_collector_rejects_total") == 0, "a message was dead-lettered"
        assert all(h["database_ok"] is False for h in health), health
        assert all((h["status"], h["database_state"]) == ("degraded", "auth_failed") for h in health), health
        print(f"health meanwhile: {health[-1]}; held: {collector.metric('kwwk_collector_queue_messages'):.0f}")
        hints = [json.loads(line) for line in log.read_text().splitlines() if "database not writable" in line]
        assert hints and hints[-1]["state"] == "auth_failed", "the log says what is wrong"
        print(f"log lines about it: {len(hints)}; {hints[0]['hint']}")
        collector.stop()  # the fix: the right token, and a restart of the collector
        monkeypatch.setenv("KWWK_INFLUX_TOKEN", "admin:right")
        collector = CollectorProc(cells, mosquitto, influxdb, "kwwk-collector-1", log)
        await collector.started()
        cutoff = await _finish(gw, stop, task, influxdb, cfg, timeout=90)
        assert collector.metric("kwwk_collector_database_state", state="ok") == 1
    finally:
        collector.stop()
        await sim.stop()
    stored = _assert_exactly_once(gw, influxdb, cfg, cutoff)
    assert not list(DeadLetterStore(tmp_path / "dead").read()), "nothing was dead-lettered"
    print(f"{stored} readings stored once each")


def _health(collector: CollectorProc) -> dict[str, object]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{collector._health}/healthz", timeout=5) as r:  # noqa: S310
            return json.loads(r.read())
    except urllib.error.HTTPError as err:  # an unhealthy answer is still an answer
        return json.loads(err.read())
