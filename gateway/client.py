"""The MQTT client the uplink publishes with: a PUBACK's reason code kept, cancellation never swallowed, a wait
for the broker's answer ended by the connection's loss.

aiomqtt 2.5 drops the reason code of a PUBACK, waits for CONNACK/SUBACK with asyncio.wait_for, and leaves a wait
for CONNACK/PUBACK/SUBACK running to its timeout when the connection drops under it (only its message iterator
watches for the loss); all are worked around here, in one place, so the uplink reads as plain publish/subscribe.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as mqtt

__all__ = ["CheckedClient", "PublishRefused", "cancel_requests", "raise_if_cancelled"]

T = TypeVar("T")


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a publish with a failure reason code (0x87 not authorized, 0x97 quota exceeded…)."""

    def __init__(self, code: int, topic: str) -> None:
        super().__init__(f"the broker refused a publish to {topic} with reason code {code:#04x}")
        self.code = code


class CheckedClient(aiomqtt.Client):
    """aiomqtt 2.5 drops the PUBACK reason code, so a publish the broker refused would look delivered and the
    outbox would forget it. This keeps the code, and ends every wait for the broker's answer when the connection
    is lost (through aiomqtt's internals, hence aiomqtt<3 in pyproject)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reasons: dict[int, int] = {}

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.reasons[mid] = int(getattr(reason_code, "value", 0) or 0)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        """A connection lost before its CONNACK fails the connect at once. aiomqtt ignores a loss before CONNACK,
        so a broker stopped while starting up, or killed between accepting and answering, held the connect
        for the whole timeout (10 s in the uplink) although the connection was already gone."""
        if self._lock.locked() and not self._connected.done():  # connecting (not after a clean exit)
            msg = f"the broker closed the connection before answering it ({reason_code})"
            self._connected.set_exception(aiomqtt.MqttError(msg))
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    async def _answer(self, answer: Awaitable[T], what: str) -> T:
        """Wait for the broker's answer, at most `timeout` s, and no longer than the connection lasts.

        Without the second bound a broker that died mid-wait held the caller for the whole timeout (10 s in the
        uplink) after it had gone; the first bound is for a broker that is there but does not answer. An answer
        that came in just before the loss still counts. asyncio.wait, not wait_for: see raise_if_cancelled."""
        waiting = asyncio.ensure_future(answer)
        lost = self._disconnected
        try:
            await asyncio.wait((waiting, lost), timeout=None if self.timeout == math.inf else self.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()  # nothing when answered; else the wait is over either way
        if waiting.done() and not waiting.cancelled():
            return waiting.result()
        if lost.done():
            cause = None if lost.cancelled() else lost.exception()
            msg = f"the connection to the broker was lost while waiting for its {what}"
            raise aiomqtt.MqttError(msg) from cause
        msg = f"no {what} from the broker within {self.timeout}s"
        raise aiomqtt.MqttError(msg)

    async def publish_acked(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and return once the broker accepted it; raise PublishRefused when it did not, MqttError when
        there was no answer (the connection was lost, or the timeout passed)."""
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if not info.is_published():
            confirmation = asyncio.Event()
            with self._pending_call(info.mid, confirmation, self._pending_publishes):
                await self._answer(confirmation.wait(), "PUBACK")
        code = self.reasons.pop(info.mid, 0)
        if code >= 0x80:
            raise PublishRefused(code, topic)

    async def subscribe_acked(self, topic: str, *, qos: int = 1) -> None:
        """Subscribe and return on SUBACK; aiomqtt's subscribe() waits with wait_for (see raise_if_cancelled)."""
        result, mid = self._client.subscribe(topic, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise aiomqtt.MqttCodeError(result, "Could not subscribe to topic")
        granted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        with self._pending_call(mid, granted, self._pending_subscribes):
            await self._answer(granted, "SUBACK")


def cancel_requests() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def raise_if_cancelled(before: int) -> None:
    """aiomqtt 2.5 waits for CONNACK with asyncio.wait_for, which on Python 3.11 can swallow a cancellation that
    arrives with the answer: the task then runs on as if never stopped (seen: a gateway that ignored SIGTERM
    right after connecting). A cancellation requested since `before` (this task's count of cancel requests,
    which 3.11's TaskGroup leaves raised after a failed child, so only a rise means anything) is raised here."""
    if cancel_requests() > before:
        raise asyncio.CancelledError
