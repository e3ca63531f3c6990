"""The wire contract between gateways and the collector: topics and the telemetry message (schema 2).

Both sides import this module, so a change to the contract is a change in one place. The control
messages (status, dead letter, resend request, time beacon) are modelled beside it, in edge/messages.py.

Schema 2 carries one entry per device poll (device, instant, point values), the shape of one InfluxDB
line: a quarter of schema 1's bytes on a gateway's metered uplink, and a fraction of the collector's work.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

__all__ = [
    "SCHEMA",
    "TOPIC_ROOT",
    "Poll",
    "Quality",
    "Reading",
    "TelemetryBatch",
    "deadletter_topic",
    "parse_topic",
    "polls",
    "resend_topic",
    "status_topic",
    "telemetry_topic",
]

SCHEMA = "kwwk.telemetry/2"
TOPIC_ROOT = "kwwk/v1"
Quality = Literal["good", "bad"]
Ident = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=48)]
PointName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
#: strict: a string or a boolean is not a reading; finite: NaN and Infinity are not either
Value = Annotated[float, Field(strict=True, allow_inf_nan=False)] | None

#: 2000-01-01 .. 2100-01-01 in ms: anything outside is a broken clock, not a reading
_TS_MIN, _TS_MAX = 946_684_800_000, 4_102_444_800_000
Timestamp = Annotated[int, Field(ge=_TS_MIN, le=_TS_MAX, description="UTC, milliseconds since the Unix epoch")]


def telemetry_topic(cell: str, gateway: str) -> str:
    return f"{TOPIC_ROOT}/{cell}/{gateway}/telemetry"


def status_topic(cell: str, gateway: str) -> str:
    return f"{TOPIC_ROOT}/{cell}/{gateway}/status"


def resend_topic(cell: str, gateway: str) -> str:
    """Where collectors ask a gateway to send acknowledged batches again (the gateway subscribes)."""
    return f"{TOPIC_ROOT}/{cell}/{gateway}/resend"


def deadletter_topic(cell: str, gateway: str) -> str:
    return f"{TOPIC_ROOT}/_deadletter/{cell}/{gateway}"


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """(cell, gateway, kind) of a kwwk/v1/<cell>/<gateway>/<kind> topic, or None."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        return None
    return parts[2], parts[3], parts[4]


class Reading(NamedTuple):
    """One value of one point at one instant, as the gateway read it and keeps it in its outbox."""

    device: str
    point: str
    ts: int
    value: float | None  # None when quality is bad
    quality: Quality = "good"


class Poll(TypedDict):
    """One read of one device: the values of its points at one instant (null: the point could not be read)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    device: Ident
    ts: Timestamp
    values: Annotated[dict[PointName, Value], Field(min_length=1, max_length=1000)]


class TelemetryBatch(BaseModel):
    """One MQTT message: a gateway's polls, numbered so the collector can see gaps and repeats."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    schema_: Literal["kwwk.telemetry/2"] = Field(SCHEMA, alias="schema")
    cell: Ident
    gateway: Ident
    stream: str = Field(pattern=r"^[a-z0-9]{1,32}$",
                        description="id of the gateway's outbox; sequence numbers count within one stream")
    seq: int = Field(ge=0, description="per-gateway message number; survives restarts")
    sent: Timestamp = Field(description="when the gateway published, UTC ms")
    replay: bool = Field(False, description="true when sent from the outbox after an outage")
    outbox_depth: int | None = Field(None, ge=0, description="readings left in the gateway's outbox when it sent this")
    read_errors: int | None = Field(None, ge=0, description="failed device reads since the gateway started (a counter)")
    polls: list[Poll] = Field(min_length=1, max_length=50_000)

    @property
    def readings(self) -> int:
        """How many point values the message carries (unreadable ones included)."""
        return sum(len(p["values"]) for p in self.polls)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def polls(readings: Iterable[Reading]) -> list[Poll]:
    """Readings grouped by device and instant, in the order first seen."""
    out: dict[tuple[str, int], Poll] = {}
    for r in readings:
        poll = out.get((r.device, r.ts))
        if poll is None:
            poll = out[(r.device, r.ts)] = {"device": r.device, "ts": r.ts, "values": {}}
        poll["values"][r.point] = r.value if r.quality != "bad" else None
    return list(out.values())

