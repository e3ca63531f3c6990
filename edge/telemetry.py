"""The wire contract between gateways and the collector: topics and the telemetry message (schema 2).

Both sides import this module, so a change to the contract is a change in one place. The control
messages (status, dead letter, resend request, time beacon) are modelled beside it, in edge/messages.py.

Schema 2 carries one entry per device poll (device, instant, point values), the shape of one InfluxDB
line: a quarter of schema 1's bytes on a gateway's metered uplink, and a fraction of the collector's work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Annotated, Literal, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

__all__ = [
    "MAX_CLOCK_SKEW_S",
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
#: how far a sender's clock may be ahead of the receiver's: `sent` and `polls[].ts` later than now + this are
#: refused (a reading from the future is a broken clock, and would make a gateway "last seen" then)
MAX_CLOCK_SKEW_S = 300
#: the receiver's clock (s since the epoch) that "now" is read from; a test replaces it instead of sleeping
clock: Callable[[], float] = time.time
#: the largest integer InfluxDB, SQLite and the gateway's outbox can hold
_INT_MAX = 2**63 - 1


def _not_ahead(ts: int) -> int:
    """A stamp no later than the receiver's clock plus MAX_CLOCK_SKEW_S (read at validation, not at import)."""
    ahead_s = ts / 1000 - clock()
    if ahead_s > MAX_CLOCK_SKEW_S:
        msg = f"{ts} is {ahead_s:.0f} s ahead of this clock; at most {MAX_CLOCK_SKEW_S} s are accepted"
        raise ValueError(msg)
    return ts


Timestamp = Annotated[int, Field(ge=_TS_MIN, le=_TS_MAX, description="UTC, milliseconds since the Unix epoch"),
                      AfterValidator(_not_ahead)]
Count = Annotated[int, Field(ge=0, le=_INT_MAX)]


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

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[misc]
    device: Ident
    ts: Timestamp
    values: Annotated[dict[PointName, Value], Field(min_length=1, max_length=1000)]


class TelemetryBatch(BaseModel):
    """One MQTT message: a gateway's polls, numbered so the collector can see gaps and repeats.

    Strict: nothing is coerced (a string is no number, 1 is no boolean, 1.0 is no integer timestamp), and no
    stamp may be later than the receiver's clock (`clock`) plus MAX_CLOCK_SKEW_S. An error names the field."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)
    schema_: Literal["kwwk.telemetry/2"] = Field(SCHEMA, alias="schema")
    cell: Ident
    gateway: Ident
    stream: str = Field(pattern=r"^[a-z0-9]{1,32}$",
                        description="id of the gateway's outbox; sequence numbers count within one stream")
    seq: Count = Field(description="per-gateway message number; survives restarts")
    sent: Timestamp = Field(description="when the gateway published, UTC ms")
    replay: bool = Field(False, description="true when sent from the outbox after an outage")
    outbox_depth: Count | None = Field(None, description="readings left in the gateway's outbox when it sent this")
    read_errors: Count | None = Field(None, description="failed device reads since the gateway started (a counter)")
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

