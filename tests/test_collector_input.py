"""Bad input never stops the collector: every bad payload is dead-lettered with its reason (hypothesis against a
running collector), and what the line protocol can carry is stored intact (hypothesis against real InfluxDB)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from collector.ingest import COLLECTOR_MQTT, CollectorSettings, Ingest
from collector.lineprotocol import encode
from collector.registry import Registry
from collector.storage import InfluxSettings, V1Writer, V2Writer
from edge.cell import load_cell
from edge.mqtt import connect_kwargs, paho_client
from kwwk.dev.localservers import InfluxDB1, Mosquitto, VictoriaMetrics
from tests.conftest import ROOT
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

CELL = load_cell(ROOT / "tests/data/twocell.yaml")
TOPIC = "kwwk/v1/twocell/gw-two/telemetry"


def _valid(**over: Any) -> dict[str, Any]:
    body = {"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": "abc123", "seq": 1,
            "sent": int(time.time() * 1000), "replay": False,
            "polls": [{"device": "grid", "ts": int(time.time() * 1000), "values": {"power": 1.5}}]}
    body.update(over)
    return body


class _Harness:
    """A running collector (the real Ingest) plus an MQTT client that publishes and watches the dead letters."""

    def __init__(self, mqtt_port: int, influx: InfluxDB1, client_id: str = "fuzz-collector") -> None:
        mqtt_settings = COLLECTOR_MQTT.replace(port=mqtt_port, client_id=client_id)
        self.ingest = Ingest(CollectorSettings(mqtt=mqtt_settings, flush_interval_s=0.05),
                             Registry({"twocell": CELL}), V1Writer(InfluxSettings(url=influx.url)))
        self.ingest.start()
        self.dead: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzz-pub", protocol=mqtt.MQTTv5)
        self.client.on_message = self._dead
        self.client.connect("127.0.0.1", mqtt_port)
        self.client.subscribe("kwwk/v1/_deadletter/#", qos=1)
        self.client.loop_start()
        assert self.ingest.subscribed.wait(10), "the collector subscribed"

    def _dead(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.dead.append(json.loads(msg.payload))

    def send(self, payload: bytes, topic: str = TOPIC) -> dict[str, Any]:
        """Publish one message; return its dead letter (fails if none arrives)."""
        with self._lock:
            before = len(self.dead)
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)
        echo = payload.decode("utf-8", errors="replace")  # a dead letter carries the payload it refused

        def letter() -> dict[str, Any] | None:
            with self._lock:
                return next((d for d in self.dead[before:] if d["payload"] == echo), None)

        return wait_until(letter, 5, f"a dead letter for {payload[:200]!r}", interval=0.01)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.ingest.stop()


@pytest.fixture
def harness(mosquitto: Mosquitto, influxdb: InfluxDB1) -> Iterator[_Harness]:
    h = _Harness(mosquitto.port, influxdb)
    yield h
    h.close()


def _mutations() -> st.SearchStrategy[tuple[bytes, str]]:
    """Bad payloads and the reason the collector must give."""
    bad_json = st.binary(min_size=1, max_size=200).filter(lambda b: not _parses(b)).map(lambda b: (b, "bad_json"))
    junk_value = st.one_of(st.none(), st.booleans(), st.text(max_size=10), st.integers(), st.lists(st.integers()))
    bad_field = st.tuples(st.sampled_from(["schema", "cell", "gateway", "stream", "seq", "sent", "replay",
                                           "polls"]), junk_value).map(
        lambda kv: (json.dumps(_valid(**{kv[0]: kv[1]})).encode(), "bad_schema"))
    junk = st.one_of(st.text(max_size=10), st.lists(st.integers()), st.just(-5), st.just(10**20), st.booleans(),
                     st.just({}))
    bad_poll = st.tuples(st.sampled_from(["device", "ts", "values", "extra"]), junk).map(
        lambda kv: (json.dumps(_valid(polls=[{**_valid()["polls"][0], kv[0]: kv[1]}])).encode(), "bad_schema"))
    bad_value = st.one_of(st.text(max_size=10), st.booleans(), st.lists(st.integers()), st.just({})).map(
        lambda v: (json.dumps(_valid(polls=[{**_valid()["polls"][0], "values": {"power": v}}])).encode(),
                   "bad_schema"))
    bad_point_name = st.sampled_from(["Power", "1power", "po wer", "", "p" * 65]).map(
        lambda p: (json.dumps(_valid(polls=[{**_valid()["polls"][0], "values": {p: 1.0}}])).encode(), "bad_schema"))
    non_finite = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999"]).map(
        lambda v: (json.dumps(_valid()).replace('"power": 1.5', '"power": ' + v.decode()).encode(), "bad_schema"))
    unknown_device = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True).filter(lambda d: d not in ("grid", "chp")).map(
        lambda d: (json.dumps(_valid(polls=[{**_valid()["polls"][0], "device": d}])).encode(), "unknown_device"))
    unknown_point = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(
        lambda p: p not in CELL.profiles["grid"].by_name).map(
        lambda p: (json.dumps(_valid(polls=[{**_valid()["polls"][0], "values": {p: 2.0}}])).encode(), "unknown_point"))
    mismatch = st.just((json.dumps(_valid(gateway="gw-other")).encode(), "topic_mismatch"))
    return st.one_of(bad_json, bad_field, bad_poll, bad_value, bad_point_name, non_finite, unknown_device,
                     unknown_point, mismatch)


def _parses(b: bytes) -> bool:
    try:
        json.loads(b)
    except ValueError:
        return False
    return True


def test_every_bad_payload_is_dead_lettered_and_the_collector_stays_up(harness: _Harness, influxdb: InfluxDB1) -> None:
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_mutations())
    def check(case: tuple[bytes, str]) -> None:
        payload, reason = case
        if reason == "bad_schema" and _parses(payload):
            try:  # a mutation that happens to be valid (e.g. replay=True) is no counterexample
                from edge.telemetry import TelemetryBatch
                TelemetryBatch.model_validate_json(payload)
                return
            except ValueError:
                pass
        letter = harness.send(payload)
        assert letter["reason"] == reason, letter
        assert letter["detail"], "the reason says what was wrong"
        seen.add(reason)

    check()
    assert {"bad_json", "bad_schema", "unknown_device", "unknown_point", "topic_mismatch"} <= seen
    # still up, and still storing what is good
    ts = int(time.time() * 1000)
    body = _valid(polls=[{"device": "grid", "ts": ts, "values": {"power": -77.25}}])
    harness.client.publish(TOPIC, json.dumps(body), qos=1).wait_for_publish(5)
    wait_until(lambda: influxdb.query('SELECT "power" FROM "electricity_meter" WHERE "power" = -77.25')
               ["results"][0].get("series"), 10, "a valid message sent after the fuzzing to be stored", interval=0.2)
    assert harness.ingest.metrics.rejects.labels("bad_json")._value.get() >= 1  # noqa: SLF001


def test_unknown_cell_and_gateway_are_dead_lettered(harness: _Harness) -> None:
    assert harness.send(json.dumps(_valid(cell="nowhere")).encode(),
                        "kwwk/v1/nowhere/gw-two/telemetry")["reason"] == "unknown_cell"
    assert harness.send(json.dumps(_valid(gateway="gw-ghost")).encode(),
                        "kwwk/v1/twocell/gw-ghost/telemetry")["reason"] == "unknown_gateway"


def test_a_partly_bad_message_stores_the_good_and_dead_letters_the_rest_once_per_reason(
        harness: _Harness, influxdb: InfluxDB1) -> None:
    """Good values are stored; unknown devices and points get one dead letter per reason naming them; an
    unreadable (null) value is counted, not stored; every value is accounted for in the metrics."""
    m = harness.ingest.metrics
    before = {k: m.readings.labels(k)._value.get() for k in ("stored", "rejected", "bad_quality")}  # noqa: SLF001
    ts = int(time.time() * 1000)
    body = _valid(seq=11, polls=[
        {"device": "grid", "ts": ts, "values": {"power": -61.5, "no_such_point": 1.0, "energy_import": None}},
        {"device": "ghost-1", "ts": ts, "values": {"power": 1.0, "energy_import": 2.0}},
        {"device": "ghost-2", "ts": ts, "values": {"power": 3.0}},
    ])
    harness.client.publish(TOPIC, json.dumps(body), qos=1).wait_for_publish(5)
    # a message after it, refused whole: its dead letter comes after all of the first message's
    assert harness.send(b"not json: the end")["reason"] == "bad_json"
    letters = {d["reason"]: d for d in harness.dead[:-1]}
    assert len(harness.dead) == 3 and set(letters) == {"unknown_device", "unknown_point"}, harness.dead
    assert "'ghost-1', 'ghost-2'" in letters["unknown_device"]["detail"]
    assert "'grid.no_such_point'" in letters["unknown_point"]["detail"]
    res = influxdb.query(f'SELECT "power", "energy_import" FROM "electricity_meter" WHERE time = {ts}ms')
    assert res["results"][0]["series"][0]["values"][0][1:] == [-61.5, None]
    after = {k: m.readings.labels(k)._value.get() for k in before}  # noqa: SLF001
    assert {k: after[k] - before[k] for k in after} == {"stored": 1, "rejected": 4, "bad_quality": 1}


# --- what line protocol can carry is stored intact ----------------------------------------------------------

_TRICKY = st.text(alphabet=st.sampled_from(list(" ,=\"'\\abcXYZ09äö€_-.")), min_size=1, max_size=24).filter(
    lambda s: s.strip() == s and not re.search(r'\\(?=[ ,="\\]|$)', s))  # what encode() refuses, tested below


def test_tag_values_with_special_characters_are_stored_intact(influxdb: InfluxDB1) -> None:
    """Spaces, commas, equals signs, quotes and backslashes in tags, keys and measurement names round-trip
    through our line protocol into real InfluxDB."""
    writer = V1Writer(InfluxSettings(url=influxdb.url))
    counter = iter(range(10**6))

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_TRICKY, _TRICKY, st.floats(allow_nan=False, allow_infinity=False, width=64))
    def check(tag: str, field: str, value: float) -> None:
        ts = 1_700_000_000_000 + next(counter)
        writer.write(encode([("fuzz m", (("cell", tag), ("device", "d")), ts, {field: value})]))
        res = influxdb.query(f"SELECT * FROM \"fuzz m\" WHERE time = {ts}ms")
        series = res["results"][0]["series"][0]
        row = dict(zip(series["columns"], series["values"][0], strict=True))
        assert row["cell"] == tag
        assert row[field] == value or (math.isclose(row[field], value, rel_tol=1e-15))

    check()
    writer.close()


def test_what_line_protocol_cannot_carry_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="line break"):
        encode([("m", (("cell", "a\nb"),), 1, {"f": 1.0})])
    for value in ("a\\", "a\\,b", "a\\ b", "a\\=b"):
        with pytest.raises(ValueError, match="backslash"):
            encode([("m", (("cell", value),), 1, {"f": 1.0})])


def test_v2_write_path_to_a_real_v2_api(victoria: VictoriaMetrics) -> None:
    """influxdb-client's /api/v2/write path, against VictoriaMetrics (Debian has no InfluxDB 2.x)."""
    import httpx

    writer = V2Writer(InfluxSettings(url=victoria.url, api="v2", token="t", org="kwwk", bucket="kwwk"))
    ts = int(time.time() * 1000) // 1000 * 1000
    writer.write(encode([("electricity_meter", (("cell", "twocell"), ("device", "grid"), ("gateway", "gw-two")), ts,
                          {"power": -4321.5, "energy_import": 12345.5})]))
    writer.close()
    httpx.post(f"{victoria.url}/internal/force_flush", timeout=5)

    def exported() -> list[dict[str, Any]] | None:
        r = httpx.get(f"{victoria.url}/api/v1/export", params={"match[]": '{__name__=~"electricity_meter_.*"}'},
                      timeout=5)
        lines = [json.loads(line) for line in r.text.splitlines() if line]
        return lines if len(lines) == 2 else None

    lines = wait_until(exported, 10, "both fields of the v2 write exported by VictoriaMetrics", interval=0.3)
    got = {m["metric"]["__name__"]: (m["values"][0], m["timestamps"][0], m["metric"]["device"]) for m in lines}
    assert got["electricity_meter_power"] == (-4321.5, ts, "grid")
    assert got["electricity_meter_energy_import"] == (12345.5, ts, "grid")


def test_storage_rejection_is_dead_lettered_not_retried_forever(harness: _Harness, influxdb: InfluxDB1) -> None:
    """A field InfluxDB refuses (type conflict) dead-letters that message; the rest of the batch is stored."""
    influxdb.query('CREATE DATABASE "kwwk"', method="POST")
    # make "power" an integer field in a new shard-compatible way: write it first as an integer
    import urllib.request
    ts = int(time.time() * 1000)
    req = urllib.request.Request(f"{influxdb.url}/write?db=kwwk&precision=ms",
                                 data=f"electricity_meter,cell=twocell,device=grid,gateway=gw-two power=5i {ts - 5000}"
                                 .encode(), method="POST")
    urllib.request.urlopen(req, timeout=5)  # noqa: S310
    letter = harness.send(json.dumps(_valid(seq=7)).encode())
    assert letter["reason"] == "storage_rejected"


def test_an_older_collectors_session_with_a_status_subscription_dead_letters_no_status(
        mosquitto: Mosquitto, influxdb: InfluxDB1) -> None:
    """Collectors once subscribed to gateway status too, and a resumed session keeps its subscriptions: a status
    queued for it is acknowledged without a dead letter, and the subscription is dropped."""
    settings = COLLECTOR_MQTT.replace(port=mosquitto.port, client_id="upgraded-collector")
    old = paho_client(settings)
    subscribed = threading.Event()
    old.on_subscribe = lambda *_: subscribed.set()
    old.connect(**connect_kwargs(settings))
    old.loop_start()
    old.subscribe("kwwk/v1/+/+/status", qos=1)
    assert subscribed.wait(5)
    old.disconnect()
    old.loop_stop()
    gateway = paho_client(settings.replace(client_id="", session_expiry_s=0))  # queued for the session meanwhile
    gateway.connect(**connect_kwargs(settings.replace(session_expiry_s=0)))
    gateway.loop_start()
    gateway.publish("kwwk/v1/twocell/gw-two/status", b'{"state": "online"}', qos=1).wait_for_publish(5)
    gateway.loop_stop()
    gateway.disconnect()
    h = _Harness(mosquitto.port, influxdb, client_id="upgraded-collector")
    try:
        # a dead letter comes after those of what came before it: the queued status would have had one by now
        assert h.send(b"not json: after the status")["reason"] == "bad_json"
        assert [d["reason"] for d in h.dead] == ["bad_json"], h.dead
        assert h.ingest.metrics.messages.labels("dead_lettered")._value.get() == 1  # noqa: SLF001
    finally:
        h.close()


# --- strict validation: nothing coerced, no stamp later than now + the skew -----------------------------------

def test_coercible_fields_and_stamps_from_the_future_are_dead_lettered_naming_the_field(
        harness: _Harness, influxdb: InfluxDB1) -> None:
    """A string seq, replay "yes", a float or far-future stamp (a `sent` in 2099 would make the gateway "last seen"
    in 2099) are refused by the running collector, the dead letter naming the field; within the skew is stored."""
    from edge.telemetry import MAX_CLOCK_SKEW_S

    now = int(time.time() * 1000)
    ahead = now + (MAX_CLOCK_SKEW_S + 60) * 1000
    poll = _valid()["polls"][0]
    cases = [("seq", _valid(seq="12")), ("seq", _valid(seq=12.0)), ("replay", _valid(replay="yes")),
             ("replay", _valid(replay=1)), ("sent", _valid(sent=float(now))), ("sent", _valid(sent=4_070_908_800_000)),
             ("sent", _valid(sent=ahead)), ("polls.0.ts", _valid(polls=[{**poll, "ts": ahead}])),
             ("polls.0.ts", _valid(polls=[{**poll, "ts": float(now)}])), ("outbox_depth", _valid(outbox_depth="3"))]
    for field, body in cases:
        letter = harness.send(json.dumps(body).encode())
        assert letter["reason"] == "bad_schema", letter
        assert letter["detail"].startswith(f"{field}: "), letter
    soon = now + (MAX_CLOCK_SKEW_S - 60) * 1000  # a gateway clock a few minutes ahead is still taken
    body = _valid(seq=31, sent=soon, polls=[{"device": "grid", "ts": soon, "values": {"power": -12.75}}])
    harness.client.publish(TOPIC, json.dumps(body), qos=1).wait_for_publish(5)
    wait_until(lambda: influxdb.query('SELECT "power" FROM "electricity_meter" WHERE "power" = -12.75')
               ["results"][0].get("series"), 10, "a message within the skew to be stored", interval=0.2)
    assert harness.ingest.metrics.rejects.labels("bad_schema")._value.get() >= len(cases)  # noqa: SLF001
