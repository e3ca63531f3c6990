"""The wire contract between gateways and the collector: topics and the telemetry message (schema 1).

Both sides import this module, so a change to the contract is a change in one place.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "SCHEMA", "Quality", "Reading", "ResendRequest", "TelemetryBatch", "TOPIC_ROOT", "deadletter_topic",
    "parse_topic", "resend_topic", "status_topic", "telemetry_topic",
]

SCHEMA = "kwwk.telemetry/1"
TOPIC_ROOT = "kwwk/v1"
Quality = Literal["good", "estimated", "bad"]
Ident = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=48)]
PointName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]

#: 2000-01-01 .. 2100-01-01 in ms: anything outside is a broken clock, not a reading
_TS_MIN, _TS_MAX = 946_684_800_000, 4_102_444_800_000


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


class Reading(BaseModel):
    """One value of one point at one instant, as the gateway read it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Ident
    point: PointName
    ts: int = Field(ge=_TS_MIN, le=_TS_MAX, description="UTC, milliseconds since the Unix epoch")
    value: float | None = Field(description="in the point's unit; null when quality is bad")
    quality: Quality = "good"

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("value must be a finite number or null")
        return v


class TelemetryBatch(BaseModel):
    """One MQTT message: a gateway's readings, numbered so the collector can see gaps and repeats."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    schema_: Literal["kwwk.telemetry/1"] = Field(SCHEMA, alias="schema")
    cell: Ident
    gateway: Ident
    stream: str = Field(pattern=r"^[a-z0-9]{1,32}$",
                        description="id of the gateway's outbox; sequence numbers count within one stream")
    seq: int = Field(ge=0, description="per-gateway message number; survives restarts")
    sent: int = Field(ge=_TS_MIN, le=_TS_MAX, description="when the gateway published, UTC ms")
    replay: bool = Field(False, description="true when sent from the outbox after an outage")
    outbox_depth: int | None = Field(None, ge=0, description="readings left in the gateway's outbox when it sent this")
    read_errors: int | None = Field(None, ge=0, description="failed device reads since the gateway started (a counter)")
    readings: list[Reading] = Field(min_length=1, max_length=50_000)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class ResendRequest(BaseModel):
    """A collector noticed missing sequence numbers and asks for those batches again."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: str = Field(pattern=r"^[a-z0-9]{1,32}$")
    seqs: list[int] = Field(min_length=1, max_length=1000)
