"""The MQTT client the uplink publishes with: a PUBACK's reason code kept, cancellation never swallowed.

aiomqtt 2.5 drops the reason code of a PUBACK and waits for CONNACK/SUBACK with asyncio.wait_for; both are
worked around here, in one place, so the uplink reads as plain publish/subscribe.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt

__all__ = ["CheckedClient", "PublishRefused", "cancel_requests", "raise_if_cancelled"]


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a publish with a failure reason code (0x87 not authorized, 0x97 quota exceeded…)."""

    def __init__(self, code: int, topic: str) -> None:
        super().__init__(f"the broker refused a publish to {topic} with reason code {code:#04x}")
        self.code = code


class CheckedClient(aiomqtt.Client):
    """aiomqtt 2.5 drops the PUBACK reason code, so a publish the broker refused would look delivered and the
    outbox would forget it. This keeps the code (through aiomqtt's internals, hence aiomqtt<3 in pyproject)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reasons: dict[int, int] = {}

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.reasons[mid] = int(getattr(reason_code, "value", 0) or 0)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and return once the broker accepted it; raise PublishRefused when it did not."""
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if not info.is_published():
            confirmation = asyncio.Event()
            with self._pending_call(info.mid, confirmation, self._pending_publishes):
                try:
                    async with asyncio.timeout(self.timeout):  # not wait_for: see _drain
                        await confirmation.wait()
                except TimeoutError as err:
                    msg = f"no PUBACK from the broker within {self.timeout}s"
                    raise aiomqtt.MqttError(msg) from err
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
            try:
                async with asyncio.timeout(self.timeout):
                    await granted
            except TimeoutError as err:
                msg = f"no SUBACK from the broker within {self.timeout}s"
                raise aiomqtt.MqttError(msg) from err


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
