"""One telemetry message in, what to store and what to refuse out: InfluxDB lines, the readings they carry,
the dead letters (one per reason) and the stamps of the oldest and newest stored reading.

No threads, no MQTT, no I/O: the acking writer calls it for every message, and a test calls it with plain
bytes. It never raises for bad input; every refusal is a `Rejection` naming its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from collector.lineprotocol import encode as encode_rows
from collector.registry import Registry
from edge.telemetry import TelemetryBatch, parse_topic

__all__ = ["BATCH_MEASUREMENT", "Encoded", "Encoder", "Rejection", "topic_cell_gateway"]

#: one line per received batch (seq, readings, replay, ...), which the sequence audit and the API read
BATCH_MEASUREMENT = "kwwk_batches"


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


class Encoder:
    """Validates against the registry and encodes; remembers the sequence numbers it saw to flag repeats."""

    def __init__(self, registry: Registry, remember: int = 100_000) -> None:
        self.registry = registry
        self.remember = remember
        self._seen: dict[tuple[str, str, str], set[int]] = {}

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
                       sum(unknown_devices.values()) + len(unknown_points), self._repeat(batch))

    def _repeat(self, batch: TelemetryBatch) -> bool:
        """Repeats seen by this replica; gaps are found by the auditor, which sees what all replicas stored."""
        key = (batch.cell, batch.gateway, batch.stream)
        seen = self._seen.setdefault(key, set())
        repeat = batch.seq in seen
        seen.add(batch.seq)
        if len(seen) > self.remember:
            self._seen[key] = set(sorted(seen)[-self.remember // 2:])
        return repeat


def _batch_record(batch: TelemetryBatch) -> str:
    fields = {"seq": float(batch.seq), "readings": float(batch.readings), "replay": 1.0 if batch.replay else 0.0}
    if batch.outbox_depth is not None:
        fields["outbox_depth"] = float(batch.outbox_depth)
    if batch.read_errors is not None:
        fields["read_errors"] = float(batch.read_errors)
    return encode_rows([(BATCH_MEASUREMENT, (("cell", batch.cell), ("gateway", batch.gateway),
                                             ("stream", batch.stream)), batch.sent, fields)])


def _examples(items: dict[str, int] | list[str], shown: int = 5) -> str:
    names = list(items)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more
