"""The collector's encoder on plain bytes: what a message becomes (lines, readings, stamps) and every reason a
message or part of it is refused. No broker, no database: the integration tests cover those."""

from __future__ import annotations

import json
from typing import Any

import pytest

from collector.encode import (
    BATCH_MEASUREMENT,
    MAX_BATCHES_PER_S,
    MAX_SEQ_JUMP,
    RECORD_BLOCK,
    STREAMS_PER_GATEWAY,
    Encoded,
    Encoder,
    Rejection,
    record_time,
    topic_cell_gateway,
)
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
        f"{BATCH_MEASUREMENT},cell=twocell,gateway=gw-two,seq_block=0,stream=abc123 outbox_depth=3.0,"
        f"read_errors=2.0,readings=3.0,replay=0.0,sent={float(TS + 42)!r},seq=1.0 {TS + 1}",
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


# -- sequence numbers: what is plausible, what one replica remembers, how batch records are keyed ---------------
NOW = TS / 1000 + 60  # the encoder's clock in these tests: a minute after the readings


def _clocked(encoder: Encoder, now: list[float]) -> Encoder:
    return Encoder(encoder.registry, clock=lambda: now[0])


@pytest.mark.parametrize("seq", [10**12, 2**63 - 1])
def test_an_absurd_number_on_a_stream_nothing_is_known_of_is_implausible(encoder: Encoder, seq: int) -> None:
    """Nothing known of the stream (no audit has read the database yet): at most one batch per ms since 2020."""
    out = _clocked(encoder, [NOW]).encode(TOPIC, _body(seq=seq, stream="evil"))
    assert (out.lines, out.readings) == ("", 0)
    ((cell, gateway, reason, detail),) = out.rejections
    assert (cell, gateway, reason) == ("twocell", "gw-two", "implausible_seq")
    assert f"seq {seq} of stream 'evil'" in detail
    assert "nothing is known of the stream" in detail


def test_a_jump_beyond_what_the_gateway_can_have_sent_since_is_implausible(encoder: Encoder) -> None:
    now = [NOW]
    enc = _clocked(encoder, now)
    assert not enc.encode(TOPIC, _body(seq=5)).rejections
    assert not enc.encode(TOPIC, _body(seq=5 + MAX_SEQ_JUMP)).rejections, "within the jump: plausible"
    out = enc.encode(TOPIC, _body(seq=5 + 2 * MAX_SEQ_JUMP + 1))
    assert [r.reason for r in out.rejections] == ["implausible_seq"]
    assert f"the highest this collector accepted is {5 + MAX_SEQ_JUMP}" in out.rejections[0].detail
    now[0] += 10  # ten seconds later the gateway can have sent 10 * MAX_BATCHES_PER_S more
    assert not enc.encode(TOPIC, _body(seq=5 + 2 * MAX_SEQ_JUMP + 10 * MAX_BATCHES_PER_S)).rejections
    assert not enc.encode(TOPIC, _body(seq=6)).rejections, "an older number (a re-send) is always plausible"


def test_what_the_audit_read_bounds_new_and_known_streams(encoder: Encoder) -> None:
    enc = _clocked(encoder, [NOW])
    enc.learn({("twocell", "gw-two", "abc123"): 3_000_000}, at=NOW)
    assert not enc.encode(TOPIC, _body(seq=3_000_001)).rejections, "a restarted replica takes an old stream on"
    out = enc.encode(TOPIC, _body(seq=3_000_000, stream="fresh"))
    assert [r.reason for r in out.rejections] == ["implausible_seq"]
    assert "the stream is new" in out.rejections[0].detail
    assert not enc.encode(TOPIC, _body(seq=17, stream="fresh")).rejections, "a new stream starts low"


def test_memory_per_gateway_is_a_few_streams_of_fixed_size(encoder: Encoder) -> None:
    enc = _clocked(encoder, [NOW])
    for i in range(200):  # a hostile sender inventing streams
        enc.encode(TOPIC, _body(seq=i, stream=f"s{i}"))
    streams = enc._streams[("twocell", "gw-two")]  # noqa: SLF001
    assert list(streams) == [f"s{i}" for i in range(200 - STREAMS_PER_GATEWAY, 200)], "the least recent go"
    assert {len(st.ring) for st in streams.values()} == {enc.remember}


def _record_key(out: Encoded) -> tuple[str, str]:
    """(series, time) of the batch record: InfluxDB's identity of a point."""
    series_and_fields, ts = out.lines.splitlines()[-1].rsplit(" ", 1)
    return series_and_fields.split(" ")[0], ts


def test_batch_records_of_different_batches_never_share_a_point(encoder: Encoder) -> None:
    """Re-sends 1 ms apart (and batches sent within the same ms) keep one point each; the same batch twice is
    the same point or another point with the same seq, never another batch's point."""
    enc = _clocked(encoder, [NOW])
    keys = {}
    for seq in (0, 1, 2, 999, 1000, 1001, 2000, RECORD_BLOCK * 7 + 3):
        for sent in (TS, TS + 1, TS + 499, TS + 500):
            keys.setdefault(_record_key(enc.encode(TOPIC, _body(seq=seq, sent=sent))), set()).add(seq)
    assert all(len(seqs) == 1 for seqs in keys.values()), keys
    for seq in range(0, 3000, 7):
        for sent in (TS, TS + 1, TS + 777):
            t = record_time(seq, sent)
            assert abs(t - sent) <= RECORD_BLOCK // 2 and (t - seq) % RECORD_BLOCK == 0
