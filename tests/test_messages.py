"""edge.messages: the control messages of the wire contract, each written and read through one model."""

from __future__ import annotations

import json

import pytest

from edge.messages import (
    TIME_SCHEMA,
    TIME_TOPIC,
    DeadLetter,
    MessageError,
    ResendRequest,
    StatusMessage,
    TimeBeacon,
    time_beacon_payload,
)
from edge.telemetry import SCHEMA


def test_status_round_trip_and_what_a_gateway_publishes() -> None:
    online = StatusMessage.now("musterdorf", "gw-1", "online", outbox_readings=42, now=1_700_000_000.25)
    assert json.loads(online.to_bytes()) == {"schema": SCHEMA, "cell": "musterdorf", "gateway": "gw-1",
                                             "state": "online", "ts": 1_700_000_000_250, "outbox_readings": 42}
    assert StatusMessage.parse(online.to_bytes()) == online
    offline = StatusMessage.now("musterdorf", "gw-1", "offline", now=1.0)
    assert "outbox_readings" not in json.loads(offline.to_bytes())  # the will: a depth in it would be stale


def test_status_reader_is_lenient_about_informative_fields() -> None:
    s = StatusMessage.parse(b'{"state": "OFFLINE", "ts": 1700000000123.7, "outbox_readings": -1, "new": 1}')
    assert (s.state, s.ts, s.outbox_readings, s.cell) == ("offline", 1_700_000_000_123, None, None)
    s = StatusMessage.parse(b'{"state": "online", "ts": "yesterday", "outbox_readings": "many"}')
    assert (s.ts, s.outbox_readings) == (None, None)
    assert StatusMessage.parse(json.dumps({"state": "x" * 100}).encode()).state == "x" * 32


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1, 2]", b"{}", b'{"state": null}', b'{"state": {}}'])
def test_unreadable_status(payload: bytes) -> None:
    with pytest.raises(MessageError, match="unreadable StatusMessage"):
        StatusMessage.parse(payload)
    assert issubclass(MessageError, ValueError)


def test_dead_letter_keeps_a_bounded_payload() -> None:
    d = DeadLetter.of("bad_json", "Expecting value", "kwwk/v1/c/g/telemetry", b"\xff" + b"a" * 70000, 1.5)
    body = json.loads(d.to_bytes())
    assert list(body) == ["reason", "detail", "topic", "received", "payload"]
    assert body["received"] == 1500 and body["payload"].startswith("\ufffd") and len(body["payload"]) == 65536
    assert DeadLetter.parse(d.to_bytes()) == d
    assert json.loads(DeadLetter.of("x", None, "t", b"", 0).to_bytes())["detail"] is None
    names = DeadLetter.of("unknown_point", ["grid.foo", "pv.bar"], "t", b"{}", 0)
    assert DeadLetter.parse(names.to_bytes()).detail == ["grid.foo", "pv.bar"]


def test_resend_request_is_strict() -> None:
    r = ResendRequest(stream="4dd1e5e38667", seqs=[3, 4])
    assert ResendRequest.parse(r.to_bytes()) == r and json.loads(r.to_bytes()) == {"stream": "4dd1e5e38667",
                                                                                  "seqs": [3, 4]}
    for bad in (b'{"stream": "UPPER", "seqs": [1]}', b'{"stream": "a", "seqs": []}',
                b'{"stream": "a", "seqs": [1], "more": 1}', b"{"):
        with pytest.raises(MessageError):
            ResendRequest.parse(bad)


def test_time_beacon() -> None:
    assert TIME_TOPIC == "kwwk/v1/_time"
    body = json.loads(time_beacon_payload(600, now=1_700_000_000.5, source="central"))
    assert body == {"schema": TIME_SCHEMA, "ts": 1_700_000_000_500, "expiry": 600, "source": "central"}
    b = TimeBeacon.parse(time_beacon_payload(60, now=2.0, source="c"))
    assert (b.ts, b.expiry, b.source, b.schema_) == (2000, 60, "c", "kwwk.time/1")
    with pytest.raises(MessageError):
        TimeBeacon.parse(b'{"schema": "kwwk.time/1", "expiry": 60}')
