"""The gateways' retained status messages (kwwk/v1/<cell>/<gateway>/status), kept up to date.

The broker hands over every retained status when we subscribe, and each change after that: `online`
at a gateway's connect, `offline` from its last will or clean stop. A clean session with a random
client id, so several API replicas never share state, and nothing is queued while we are away.
"""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
import structlog

from edge.messages import MessageError, StatusMessage
from edge.mqtt import MqttSettings, connect_kwargs, paho_client
from edge.telemetry import TOPIC_ROOT, parse_topic

__all__ = ["StatusWatcher"]

log = structlog.get_logger("kwwk.api.status")


class StatusWatcher:
    def __init__(self, settings: MqttSettings) -> None:
        # a clean session under a random id (settings.session_expiry_s 0, client_id ""), see the module's doc
        self.settings = settings
        self.connected = False
        self._lock = threading.Lock()
        self._status: dict[tuple[str, str], StatusMessage] = {}
        self._client = paho_client(settings, client_id_prefix="kwwk-api")
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def start(self) -> None:
        self._client.connect_async(**connect_kwargs(self.settings))
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def get(self, cell: str, gateway: str) -> StatusMessage | None:
        with self._lock:
            return self._status.get((cell, gateway))

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: Any, _p: object = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("the broker refused the API's status subscription", reason=str(reason))
            return
        self.connected = True
        client.subscribe(f"{TOPIC_ROOT}/+/+/status", qos=1)

    def _on_disconnect(self, *_: object) -> None:
        self.connected = False

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(msg.topic)
        if parsed is None or parsed[2] != "status":
            return
        key = (parsed[0], parsed[1])
        if not msg.payload:  # a cleared retained message: the gateway was removed
            with self._lock:
                self._status.pop(key, None)
            return
        try:
            body = StatusMessage.parse(msg.payload)
        except MessageError as err:
            log.warning("unreadable gateway status", topic=msg.topic, error=str(err))
            return
        with self._lock:
            self._status[key] = body
