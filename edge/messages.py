"""The wire contract's control messages, beside the telemetry message (edge/telemetry.py): each modelled once.

| message | topic | written by | read by |
|---|---|---|---|
| StatusMessage | `kwwk/v1/<cell>/<gateway>/status`, retained | the gateway (`online` at connect and every minute with its outbox depth, `offline` as last will and on a clean stop), `commission verify` (`commissioning`) | the API's status watcher |
| DeadLetter | `kwwk/v1/_deadletter/<cell>/<gateway>` | the collector, for what it cannot store | operators |
| ResendRequest | `kwwk/v1/<cell>/<gateway>/resend` | the collector's sequence audit | the gateway |
| TimeBeacon | `kwwk/v1/_time`, retained, with a Message Expiry Interval | `kwwk broker beacon` | `commission verify` |

Each has `to_bytes()` and `parse(bytes)`; parse raises MessageError (a ValueError) for anything unreadable, so
nobody reads a control payload with json.loads by hand. Readers are lenient where a gateway of another
version may say more (unknown fields are ignored); the telemetry message itself stays strict.
"""

from __future__ import annotations

import socket
import time
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from edge.errors import KwwkError
from edge.telemetry import SCHEMA, TOPIC_ROOT

__all__ = [
    "TIME_SCHEMA",
    "TIME_TOPIC",
    "DeadLetter",
    "MessageError",
    "ResendRequest",
    "StatusMessage",
    "TimeBeacon",
    "time_beacon_payload",
]

#: retained beacon with the central side's clock (readable by every gateway, written by collectors)
TIME_TOPIC = f"{TOPIC_ROOT}/_time"
TIME_SCHEMA = "kwwk.time/1"
DEADLETTER_PAYLOAD_MAX = 65536  # bytes of the refused payload a dead letter keeps


class MessageError(KwwkError, ValueError):
    """A control payload that is not valid JSON or not the message it should be."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    @classmethod
    def parse(cls, payload: bytes | bytearray | str) -> Self:
        try:
            return cls.model_validate_json(payload)
        except ValidationError as err:
            msg = f"unreadable {cls.__name__}: {err.errors(include_url=False)[0]['msg']}"
            raise MessageError(msg) from None


def _number_or_none(v: Any) -> Any:
    """A field that is informative only: a wrong type is treated as absent, not as a broken message."""
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _depth(v: Any) -> Any:
    v = _number_or_none(v)
    return int(v) if v is not None and v >= 0 else None


def _state(v: Any) -> str:
    if v is None or isinstance(v, dict | list):
        msg = "a status needs a state"
        raise ValueError(msg)
    return str(v).lower()[:32]


class StatusMessage(_Message):
    """A gateway's retained status: what it is doing, since when, and how much it still has to send."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")
    schema_: str = Field(SCHEMA, alias="schema")
    cell: str | None = None
    gateway: str | None = None
    state: Annotated[str, BeforeValidator(_state)] = Field(
        description="online | offline | commissioning | whatever a gateway said, lower-cased")
    ts: Annotated[int | None, BeforeValidator(lambda v: None if (n := _number_or_none(v)) is None else int(n))] = Field(
        None, description="when the gateway said it, UTC ms")
    outbox_readings: Annotated[int | None, BeforeValidator(_depth)] = Field(
        None, description="readings waiting in the gateway's outbox (online only: a will would carry a stale one)")
    by: str | None = Field(None, description="who published it when not the gateway itself")

    @classmethod
    def now(cls, cell: str, gateway: str, state: str, *, outbox_readings: int | None = None,
            by: str | None = None, now: float | None = None) -> StatusMessage:
        ts = int((time.time() if now is None else now) * 1000)
        return cls(cell=cell, gateway=gateway, state=state, ts=ts, outbox_readings=outbox_readings, by=by)


class DeadLetter(_Message):
    """A message the collector could not (fully) store, and why."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    reason: str = Field(description="bad_json, bad_schema, unknown_device, storage_rejected, ...")
    detail: Any = Field(None, description="what exactly: a validation error, the unknown names")
    topic: str
    received: int = Field(description="when the collector received it, UTC ms")
    payload: str = Field(description=f"the message as received (its first {DEADLETTER_PAYLOAD_MAX} bytes)")

    @classmethod
    def of(cls, reason: str, detail: Any, topic: str, payload: bytes, received: float) -> DeadLetter:
        """A dead letter for a payload received at `received` (seconds since the epoch)."""
        return cls(reason=reason, detail=detail, topic=topic, received=int(received * 1000),
                   payload=payload[:DEADLETTER_PAYLOAD_MAX].decode("utf-8", errors="replace"))

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()  # detail: null stays, so every dead letter has the same fields


class ResendRequest(_Message):
    """A collector noticed missing sequence numbers and asks for those batches again."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: str = Field(pattern=r"^[a-z0-9]{1,32}$")
    seqs: list[int] = Field(min_length=1, max_length=1000)


class TimeBeacon(_Message):
    """The central side's clock, kept retained; its age is the expiry minus the remaining interval the broker
    forwards, so a gateway can check its own clock without NTP (see gateway/commission/checks.py)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")
    schema_: str = Field(TIME_SCHEMA, alias="schema")
    ts: int = Field(description="the publisher's clock, UTC ms")
    expiry: int = Field(ge=0, description="the Message Expiry Interval it was sent with, s")
    source: str = Field("?", description="who sent it (a host name)")


def time_beacon_payload(expiry: int, now: float | None = None, source: str | None = None) -> bytes:
    """The retained time beacon: the publisher's clock (UTC ms), the Message Expiry Interval it is sent
    with (so a reader can tell its age from the remaining interval the broker forwards), and who sent it."""
    ts = int((time.time() if now is None else now) * 1000)
    return TimeBeacon(ts=ts, expiry=int(expiry), source=source or socket.gethostname()).to_bytes()
