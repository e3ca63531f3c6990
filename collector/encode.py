"""One telemetry message in, what to store and what to refuse out: InfluxDB lines, the readings they carry,
the dead letters (one per reason) and the stamps of the oldest and newest stored reading.

No threads, no MQTT, no I/O: the acking writer calls it for every message, and a test calls it with plain
bytes. It never raises for bad input; every refusal is a `Rejection` naming its reason.

Sequence numbers: a gateway numbers its batches from 0 per stream (its outbox), one per batch, and publishes
the next only after the broker acknowledged the last, so a stream cannot grow faster than MAX_BATCHES_PER_S.
A number further ahead of what is known of its stream than that rate and MAX_SEQ_JUMP allow is
`implausible_seq`: dead-lettered, never stored, so the audit never looks for the batches "between". What is
known: the highest number this replica accepted per stream (and when), else what the audit last read from
the database (`learn`), else nothing but the rate since 2020. Memory per stream is a fixed-size ring, and
the streams kept per gateway are few: bounded by the registry, never by a number a gateway sent.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from collector.lineprotocol import encode as encode_rows
from collector.registry import Registry
from edge.telemetry import TelemetryBatch, parse_topic

__all__ = ["BATCH_MEASUREMENT", "MAX_BATCHES_PER_S", "MAX_SEQ_JUMP", "RECORD_BLOCK", "Encoded", "Encoder",
           "Rejection", "StreamKey", "record_time", "topic_cell_gateway"]

#: one line per received batch (seq, readings, replay, sent, ...), which the sequence audit and the API read.
#: Its series is (cell, gateway, stream, seq_block = seq // RECORD_BLOCK) and its time `record_time(seq, sent)`,
#: within RECORD_BLOCK / 2 ms of `sent` and congruent to seq modulo RECORD_BLOCK: two batches of one stream
#: never share a point (the same batch twice overwrites itself or adds a point), however close their `sent`
#: are; the exact `sent` is a field. One more series per RECORD_BLOCK batches of a stream (a gateway sending a
#: batch every 10 s: about nine a day; one a second: 86) buys that.
BATCH_MEASUREMENT = "kwwk_batches"
RECORD_BLOCK = 1000

#: more batches per second than a gateway can publish (it waits for each PUBACK before the next one)
MAX_BATCHES_PER_S = 1000
#: how far beyond the highest number known for its stream a batch may be, besides what the rate allows since
#: then: batches the broker lost, other replicas' shares. The audit treats a longer missing run as implausible.
MAX_SEQ_JUMP = 100_000
#: no stream is older: what is plausible for a stream nothing is known of
_EPOCH_MS = 1_577_836_800_000  # 2020-01-01
#: streams remembered per gateway (a gateway has one; a new SD card starts another); the least recent goes first
STREAMS_PER_GATEWAY = 8

StreamKey = tuple[str, str, str]  # cell, gateway, stream


class Rejection(NamedTuple):
    """Why (part of) a message is not stored: one dead letter."""

    cell: str
    gateway: str
    reason: str  # bad_json, bad_schema, topic_mismatch, unknown_cell, unknown_gateway, unknown_device, ...
    detail: Any


@dataclass
class Encoded:
    """What one message becomes."""

    lines: str  # line protocol: the readings and the batch record ("" when nothing is to be stored)
    readings: int  # values stored by those lines
    rejections: list[Rejection] = field(default_factory=list)
    cell: str = ""
    gateway: str = ""
    stamps: tuple[int, int] | None = None  # oldest and newest reading stored
    unreadable: int = 0  # values sent as null (the point could not be read): counted, not stored
    rejected: int = 0  # values of unknown devices or points
    repeat: bool = False  # this replica saw the same (stream, seq) before: a redelivery

    @classmethod
    def refused(cls, topic: str, reason: str, detail: Any) -> Encoded:
        """Nothing stored: one dead letter addressed by the topic's cell and gateway."""
        return cls("", 0, [Rejection(*topic_cell_gateway(topic), reason, detail)])

    def storage_refused(self) -> Encoded:
        """The database refused these lines: nothing stored, one more dead letter."""
        return Encoded("", 0, [*self.rejections, Rejection(self.cell, self.gateway, "storage_rejected",
                                                            "the database refused it")],
                       self.cell, self.gateway, None, self.unreadable, self.rejected, self.repeat)


def topic_cell_gateway(topic: str) -> tuple[str, str]:
    """(cell, gateway) a telemetry topic names, ("_", "_") for any other topic."""
    t = parse_topic(topic)
    return (t[0], t[1]) if t else ("_", "_")


class _Stream:
    """What one replica knows of one stream: the highest number accepted, when, and a ring of recent numbers."""

    __slots__ = ("at_ms", "hi", "ring")

    def __init__(self, remember: int) -> None:
        self.hi = -1
        self.at_ms = 0
        self.ring = array("q", [-1]) * remember  # slot seq % remember holds the last number seen there


class Encoder:
    """Validates against the registry and encodes; refuses implausible sequence numbers, flags repeats."""

    def __init__(self, registry: Registry, remember: int = 1024, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.remember = remember
        self.clock = clock
        self._streams: dict[tuple[str, str], OrderedDict[str, _Stream]] = {}  # (cell, gateway) -> stream -> state
        self._stored: tuple[int, Mapping[StreamKey, int]] | None = None  # when the database said, what it said

    def learn(self, highest: Mapping[StreamKey, int], at: float) -> None:
        """The highest number stored per stream, as the database said at `at` (s): what the audit read.
        Called from the audit's thread; one reference is replaced, nothing is mutated."""
        self._stored = (int(at * 1000), dict(highest))

    def seq_limit(self, key: StreamKey, now_ms: int) -> tuple[int, str]:
        """The highest number a batch of this stream can plausibly carry now, and what that is based on: the
        most lenient of what this replica accepted and what the database last said."""
        known: list[tuple[int, int, str]] = []  # (highest, when, what says so)
        st = self._streams.get(key[:2], {}).get(key[2])
        if st is not None:
            known.append((st.hi, st.at_ms, f"the highest this collector accepted is {st.hi}"))
        if self._stored is not None:
            at, stored = self._stored
            known.append((stored[key], at, f"the highest stored is {stored[key]}") if key in stored else
                         (0, at, "the stream is new"))
        return max((base + MAX_SEQ_JUMP + MAX_BATCHES_PER_S * max(0, now_ms - at) // 1000, said)
                   for base, at, said in known or [(0, _EPOCH_MS, "nothing is known of the stream")])

    def encode(self, topic: str, payload: bytes) -> Encoded:
        """Validate one message; return what to store and what to dead-letter (never raises for bad input)."""
        t_cell, t_gw = topic_cell_gateway(topic)
        try:
            batch = TelemetryBatch.model_validate_json(payload)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            reason = "bad_json" if first["type"] == "json_invalid" else "bad_schema"
            where = ".".join(str(p) for p in first["loc"])
            return Encoded.refused(topic, reason, f"{where}: {first['msg']}")
        if (batch.cell, batch.gateway) != (t_cell, t_gw):
            return Encoded.refused(topic, "topic_mismatch",
                                   f"payload says {batch.cell}/{batch.gateway}, topic says {t_cell}/{t_gw}")
        if batch.cell not in self.registry.cells:
            return Encoded.refused(topic, "unknown_cell", f"no cell {batch.cell!r} in the registry")
        if (batch.cell, batch.gateway) not in self.registry.gateways:
            return Encoded.refused(topic, "unknown_gateway", f"cell {batch.cell!r} has no gateway {batch.gateway!r}")
        now_ms = int(self.clock() * 1000)
        limit, said = self.seq_limit((batch.cell, batch.gateway, batch.stream), now_ms)
        if batch.seq > limit:
            return Encoded.refused(topic, "implausible_seq",
                                   f"seq {batch.seq} of stream {batch.stream!r} is beyond what the gateway can have "
                                   f"sent: at most {limit} ({said}, at most {MAX_BATCHES_PER_S} batches/s since)")
        lines: list[str] = []
        stamps: list[int] = []
        stored = unreadable = 0
        unknown_devices: dict[str, int] = {}  # device -> values
        unknown_points: list[str] = []
        for poll in batch.polls:  # the hot loop: one line per poll, keys and tags escaped once in the registry
            info = self.registry.devices.get((batch.cell, poll["device"]))
            if info is None or info.gateway != batch.gateway:
                unknown_devices[poll["device"]] = unknown_devices.get(poll["device"], 0) + len(poll["values"])
                continue
            keys = info.field_keys
            fields = []
            for point, value in poll["values"].items():
                key = keys.get(point)
                if key is None:
                    unknown_points.append(f"{poll['device']}.{point}")
                elif value is None:
                    unreadable += 1
                else:
                    fields.append(key + repr(value))
            if fields:
                lines.append(f"{info.line_prefix}{','.join(fields)} {poll['ts']}\n")
                stamps.append(poll["ts"])
                stored += len(fields)
        rejections: list[Rejection] = []
        if unknown_devices:
            rejections.append(Rejection(batch.cell, batch.gateway, "unknown_device",
                                        f"not devices of {batch.cell}/{batch.gateway}: {_examples(unknown_devices)}"))
        if unknown_points:
            rejections.append(Rejection(batch.cell, batch.gateway, "unknown_point",
                                        f"points the devices do not have: {_examples(unknown_points)}"))
        lines.append(_batch_record(batch))
        return Encoded("".join(lines), stored, rejections, batch.cell, batch.gateway,
                       (min(stamps), max(stamps)) if stamps else None, unreadable,
                       sum(unknown_devices.values()) + len(unknown_points), self._repeat(batch, now_ms))

    def _repeat(self, batch: TelemetryBatch, now_ms: int) -> bool:
        """Repeats seen by this replica (within its last `remember` numbers of the stream); gaps are found by the
        auditor, which sees what all replicas stored."""
        streams = self._streams.setdefault((batch.cell, batch.gateway), OrderedDict())
        st = streams.get(batch.stream)
        if st is None:
            st = streams[batch.stream] = _Stream(self.remember)
            if len(streams) > STREAMS_PER_GATEWAY:
                streams.popitem(last=False)
        else:
            streams.move_to_end(batch.stream)
        slot = batch.seq % self.remember
        repeat = st.ring[slot] == batch.seq
        st.ring[slot] = batch.seq
        if batch.seq > st.hi:
            st.hi, st.at_ms = batch.seq, now_ms
        return repeat


def record_time(seq: int, sent: int) -> int:
    """The batch record's time (ms): the instant nearest `sent` that is congruent to `seq` modulo RECORD_BLOCK."""
    offset = (seq - sent) % RECORD_BLOCK
    return sent + offset if offset < RECORD_BLOCK // 2 else sent + offset - RECORD_BLOCK


def _batch_record(batch: TelemetryBatch) -> str:
    fields = {"seq": float(batch.seq), "readings": float(batch.readings), "replay": 1.0 if batch.replay else 0.0,
              "sent": float(batch.sent)}
    if batch.outbox_depth is not None:
        fields["outbox_depth"] = float(batch.outbox_depth)
    if batch.read_errors is not None:
        fields["read_errors"] = float(batch.read_errors)
    tags = (("cell", batch.cell), ("gateway", batch.gateway), ("stream", batch.stream),
            ("seq_block", str(batch.seq // RECORD_BLOCK)))
    return encode_rows([(BATCH_MEASUREMENT, tags, record_time(batch.seq, batch.sent), fields)])


def _examples(items: dict[str, int] | list[str], shown: int = 5) -> str:
    names = list(items)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more
