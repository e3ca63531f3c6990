"""The collector's encoder on plain bytes: what a message becomes (lines, readings, stamps) and every reason a
message or part of it is refused. No broker, no database: the integration tests cover those."""

from __future__ import annotations

import json
from typing import Any

import pytest

from collector.encode import BATCH_MEASUREMENT, Encoded, Encoder, Rejection, topic_cell_gateway
from collector.registry import Registry
from edge.cell import load_cell
from tests.conftest import ROOT

TOPIC = "kwwk/v1/twocell/gw-two/telemetry"
TS = 1_795_304_815_000


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(Registry({"twocell": load_cell(ROOT / "tests/data/twocell.yaml")}))


def _body(**over: Any) -> bytes:
    body = {"schema": "kwwk.telemetry/2", "cell": "twocell", "gateway": "gw-two", "stream": "abc123", "seq": 1,
            "sent": TS + 42, "replay": False,
            "polls": [{"device": "grid", "ts": TS, "values": {"power": -1500.0, "energy_import": 90210.5}}]}
    body.update(over)
    return json.dumps(body).encode()


def test_a_good_message_is_one_line_per_poll_plus_the_batch_record(encoder: Encoder) -> None:
    out = Encoder(encoder.registry).encode(TOPIC, _body(polls=[
        {"device": "grid", "ts": TS, "values": {"power": -1500.0, "energy_import": 90210.5}},
        {"device": "chp", "ts": TS + 1000, "values": {"power": 49000.0}},
    ], outbox_depth=3, read_errors=2))
    assert out.lines.splitlines() == [
        f"electricity_meter,cell=twocell,device=grid,gateway=gw-two power=-1500.0,energy_import=90210.5 {TS}",
        f"chp,cell=twocell,device=chp,gateway=gw-two power=49000.0 {TS + 1000}",
        f"{BATCH_MEASUREMENT},cell=twocell,gateway=gw-two,stream=abc123 outbox_depth=3.0,read_errors=2.0,"
        f"readings=3.0,replay=0.0,seq=1.0 {TS + 42}",
    ]
    assert (out.readings, out.cell, out.gateway, out.stamps) == (3, "twocell", "gw-two", (TS, TS + 1000))
    assert (out.rejections, out.unreadable, out.rejected, out.repeat) == ([], 0, 0, False)


def test_an_unreadable_value_is_counted_not_stored(encoder: Encoder) -> None:
    out = encoder.encode(TOPIC, _body(polls=[{"device": "grid", "ts": TS, "values": {"power": 1.5,
                                                                                      "energy_import": None}}]))
    assert out.lines.splitlines()[0] == f"electricity_meter,cell=twocell,device=grid,gateway=gw-two power=1.5 {TS}"
    assert (out.readings, out.unreadable, out.rejections) == (1, 1, [])


def test_a_poll_of_only_unreadable_values_stores_only_the_batch_record(encoder: Encoder) -> None:
    out = encoder.encode(TOPIC, _body(polls=[{"device": "grid", "ts": TS, "values": {"power": None}}]))
    assert [line.split(",")[0] for line in out.lines.splitlines()] == [BATCH_MEASUREMENT]
    assert (out.readings, out.unreadable, out.stamps) == (0, 1, None)


@pytest.mark.parametrize(("topic", "payload", "reason", "detail"), [
    (TOPIC, b"{not json", "bad_json", "Invalid JSON"),
    (TOPIC, _body(schema="kwwk.telemetry/1"), "bad_schema", "schema: "),
    (TOPIC, _body(seq=-1), "bad_schema", "seq: "),
    (TOPIC, _body(polls=[{"device": "grid", "ts": TS, "values": {"power": "1.5"}}]), "bad_schema", "polls.0.values"),
    (TOPIC, _body(polls=[{"device": "grid", "ts": TS, "values": {"power": True}}]), "bad_schema", "polls.0.values"),
    (TOPIC, _body(polls=[{"device": "grid", "ts": 5, "values": {"power": 1.0}}]), "bad_schema", "polls.0.ts"),
    (TOPIC, _body().replace(b"-1500.0", b"NaN"), "bad_schema", "polls.0.values"),
    (TOPIC, _body(gateway="gw-other"), "topic_mismatch", "payload says twocell/gw-other, topic says twocell/gw-two"),
    ("kwwk/v1/nowhere/gw-two/telemetry", _body(cell="nowhere"), "unknown_cell", "no cell 'nowhere' in the registry"),
    ("kwwk/v1/twocell/gw-ghost/telemetry", _body(gateway="gw-ghost"), "unknown_gateway",
     "cell 'twocell' has no gateway 'gw-ghost'"),
])
def test_a_refused_message_stores_nothing_and_names_its_reason(encoder: Encoder, topic: str, payload: bytes,
                                                               reason: str, detail: str) -> None:
    out = encoder.encode(topic, payload)
    assert (out.lines, out.readings, out.stamps) == ("", 0, None)
    assert len(out.rejections) == 1
    cell, gateway, got_reason, got_detail = out.rejections[0]
    assert (cell, gateway) == topic_cell_gateway(topic)
    assert got_reason == reason
    assert detail in got_detail


def test_unknown_devices_and_points_are_one_rejection_per_reason_and_the_rest_is_stored(encoder: Encoder) -> None:
    out = encoder.encode(TOPIC, _body(polls=[
        {"device": "grid", "ts": TS, "values": {"power": -61.5, "no_such_point": 1.0, "energy_import": None}},
        *({"device": f"ghost-{i}", "ts": TS, "values": {"power": 1.0, "energy_import": 2.0}} for i in range(7)),
    ]))
    assert out.rejections == [
        Rejection("twocell", "gw-two", "unknown_device",
                  "not devices of twocell/gw-two: 'ghost-0', 'ghost-1', 'ghost-2', 'ghost-3', 'ghost-4' and 2 more"),
        Rejection("twocell", "gw-two", "unknown_point", "points the devices do not have: 'grid.no_such_point'"),
    ]
    assert (out.readings, out.unreadable, out.rejected) == (1, 1, 7 * 2 + 1)
    assert out.lines.startswith(f"electricity_meter,cell=twocell,device=grid,gateway=gw-two power=-61.5 {TS}\n")


def test_a_device_of_another_gateway_of_the_cell_is_unknown_here() -> None:
    cfg = load_cell(ROOT / "tests/data/twocell.yaml")
    registry = Registry({"twocell": cfg})
    registry.gateways.add(("twocell", "gw-three"))  # a second gateway of the cell, without the devices
    out = Encoder(registry).encode("kwwk/v1/twocell/gw-three/telemetry", _body(gateway="gw-three"))
    assert [r.reason for r in out.rejections] == ["unknown_device"]
    assert out.readings == 0


def test_a_repeated_sequence_number_is_flagged_per_stream(encoder: Encoder) -> None:
    enc = Encoder(encoder.registry, remember=4)
    assert [enc.encode(TOPIC, _body(seq=s)).repeat for s in (1, 2, 1)] == [False, False, True]
    assert enc.encode(TOPIC, _body(seq=1, stream="other")).repeat is False
    for s in range(10, 20):  # past what it remembers: the oldest are forgotten, the newest kept
        enc.encode(TOPIC, _body(seq=s))
    assert enc.encode(TOPIC, _body(seq=19)).repeat is True
    assert enc.encode(TOPIC, _body(seq=1)).repeat is False


def test_storage_refused_keeps_the_rejections_and_adds_its_own(encoder: Encoder) -> None:
    out = encoder.encode(TOPIC, _body(polls=[{"device": "ghost", "ts": TS, "values": {"power": 1.0}},
                                             {"device": "grid", "ts": TS, "values": {"power": 1.0}}]))
    refused = out.storage_refused()
    assert (refused.lines, refused.readings, refused.stamps) == ("", 0, None)
    assert [r.reason for r in refused.rejections] == ["unknown_device", "storage_rejected"]
    assert refused.rejections[-1][:2] == ("twocell", "gw-two")


def test_other_topics_are_addressed_to_the_placeholder() -> None:
    assert topic_cell_gateway("something/else") == ("_", "_")
    assert Encoded.refused("x", "collector_error", "boom").rejections == [Rejection("_", "_", "collector_error",
                                                                                   "boom")]
