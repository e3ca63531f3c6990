"""The telemetry contract is strict: nothing is coerced, and no stamp is later than the receiver's clock plus
MAX_CLOCK_SKEW_S; each refusal names its field. `edge.telemetry.clock` is "now" (replaced here, no sleeping)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from edge import telemetry
from edge.telemetry import MAX_CLOCK_SKEW_S, TelemetryBatch

NOW_MS = 1_795_304_816_000


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "clock", lambda: NOW_MS / 1000)


def _body(**over: Any) -> dict[str, Any]:
    body = {"schema": "kwwk.telemetry/2", "cell": "musterdorf", "gateway": "gw-1", "stream": "4dd1e5e38667",
            "seq": 1842, "sent": NOW_MS, "replay": False, "outbox_depth": 0, "read_errors": 0,
            "polls": [{"device": "grid", "ts": NOW_MS - 1000, "values": {"power": -1500.0, "energy": 5}}]}
    body.update(over)
    return body


def _poll(**over: Any) -> dict[str, Any]:
    return _body(polls=[{**_body()["polls"][0], **over}])


def _refusal(body: dict[str, Any] | str) -> tuple[str, str]:
    """(where, message) of the first error, as the collector's dead letter names it."""
    with pytest.raises(ValidationError) as info:
        TelemetryBatch.model_validate_json(body if isinstance(body, str) else json.dumps(body))
    first = info.value.errors(include_url=False)[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"]


def test_a_well_formed_message_is_accepted_as_sent() -> None:
    batch = TelemetryBatch.model_validate_json(json.dumps(_body()))
    assert (batch.seq, batch.sent, batch.replay, batch.readings) == (1842, NOW_MS, False, 2)
    assert batch.polls[0]["values"] == {"power": -1500.0, "energy": 5.0}  # a JSON integer is a number


@pytest.mark.parametrize(("body", "field"), [
    (_body(seq="1842"), "seq"),
    (_body(seq=1842.0), "seq"),
    (_body(seq=True), "seq"),
    (_body(replay="yes"), "replay"),
    (_body(replay="true"), "replay"),
    (_body(replay=1), "replay"),
    (_body(sent=float(NOW_MS)), "sent"),
    (_body(sent=NOW_MS + 0.5), "sent"),
    (_body(sent=str(NOW_MS)), "sent"),
    (_body(outbox_depth="3"), "outbox_depth"),
    (_body(read_errors=2.0), "read_errors"),
    (_poll(ts=float(NOW_MS - 1000)), "polls.0.ts"),
    (_poll(ts=str(NOW_MS - 1000)), "polls.0.ts"),
    (_poll(device=7), "polls.0.device"),
    (_poll(values={"power": "1.5"}), "polls.0.values.power"),
    (_poll(values={"power": True}), "polls.0.values.power"),
    (_body(cell=1), "cell"),
    (_body(stream=4711), "stream"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_no_field_is_coerced_and_the_refusal_names_it(body: dict[str, Any], field: str) -> None:
    where, msg = _refusal(body)
    assert where == field, msg
    assert "valid" in msg  # "Input should be a valid integer / boolean / number / string"


def test_integers_fit_64_bits() -> None:
    assert TelemetryBatch.model_validate_json(json.dumps(_body(seq=2**63 - 1))).seq == 2**63 - 1
    assert _refusal(_body(seq=2**63))[0] == "seq"
    assert _refusal(_body(outbox_depth=10**30))[0] == "outbox_depth"


@pytest.mark.parametrize("field", ["sent", "polls.0.ts"])
def test_a_stamp_beyond_the_skew_is_refused_naming_the_field(field: str) -> None:
    ahead = NOW_MS + MAX_CLOCK_SKEW_S * 1000 + 1000
    where, msg = _refusal(_body(sent=ahead) if field == "sent" else _poll(ts=ahead))
    assert where == field
    assert f"{MAX_CLOCK_SKEW_S + 1} s ahead" in msg and f"at most {MAX_CLOCK_SKEW_S} s" in msg


def test_a_sent_in_2099_is_refused() -> None:  # it would make the gateway "last seen" in 2099
    where, msg = _refusal(_body(sent=4_070_908_800_000))
    assert where == "sent" and "ahead of this clock" in msg


def test_stamps_within_the_skew_are_accepted() -> None:
    edge = NOW_MS + MAX_CLOCK_SKEW_S * 1000
    batch = TelemetryBatch.model_validate_json(json.dumps(_poll(ts=edge) | {"sent": edge}))
    assert (batch.sent, batch.polls[0]["ts"]) == (edge, edge)


def test_now_is_read_at_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same message is refused now and accepted once the receiver's clock has caught up (a slow clock)."""
    later = NOW_MS + 3_600_000
    body = json.dumps(_body(sent=later))
    assert _refusal(body)[0] == "sent"
    monkeypatch.setattr(telemetry, "clock", lambda: later / 1000)
    assert TelemetryBatch.model_validate_json(body).sent == later


def test_what_the_gateway_sends_validates_on_its_own_clock() -> None:
    """The gateway's message (built as uplink builds it) round-trips through the strict schema."""
    from edge.telemetry import SCHEMA, Reading, polls

    msg = TelemetryBatch.model_construct(
        schema_=SCHEMA, cell="musterdorf", gateway="gw-1", stream="4dd1e5e38667", seq=7, sent=NOW_MS, replay=True,
        polls=polls([Reading("grid", "power", NOW_MS - 200, -1.5), Reading("grid", "energy", NOW_MS - 200, None,
                                                                             "bad")]),
        outbox_depth=3, read_errors=1)
    again = TelemetryBatch.model_validate_json(msg.to_json())
    assert again == msg
    assert TelemetryBatch.model_validate(json.loads(msg.to_json())) == msg  # from Python objects too
