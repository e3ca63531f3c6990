"""The gateways' retained status messages (kwwk/v1/<cell>/<gateway>/status), kept up to date.

The broker hands over every retained status when we subscribe, and each change after that: `online`
at a gateway's connect, `offline` from its last will or clean stop. A clean session with a random
client id, so several API replicas never share state, and nothing is queued while we are away.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from edge.telemetry import TOPIC_ROOT, parse_topic

__all__ = ["GatewayStatus", "StatusWatcher"]

log = structlog.get_logger("kwwk.api.status")


@dataclass(frozen=True)
class GatewayStatus:
    state: str  # online | offline | whatever a gateway said, lower-cased
    ts: int | None  # when the gateway said it (ms)
    outbox_readings: int | None  # when the gateway reports it in its status


class StatusWatcher:
    def __init__(self, host: str, port: int, username: str | None = None, password: str | None = None,
                 tls: bool = False, ca_file: str | None = None) -> None:
        self.host, self.port = host, port
        self.connected = False
        self._lock = threading.Lock()
        self._status: dict[tuple[str, str], GatewayStatus] = {}
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"kwwk-api-{secrets.token_hex(4)}",
                                   protocol=mqtt.MQTTv5)
        if username:
            self._client.username_pw_set(username, password)
        if tls:
            self._client.tls_set_context(ssl.create_default_context(cafile=ca_file))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.5, 30)

    def start(self) -> None:
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=True)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def get(self, cell: str, gateway: str) -> GatewayStatus | None:
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
            body = json.loads(msg.payload)
            state = str(body["state"]).lower()[:32]
            ts = body.get("ts")
            depth = body.get("outbox_readings")
            status = GatewayStatus(state, int(ts) if isinstance(ts, int | float) else None,
                                   int(depth) if isinstance(depth, int | float) and depth >= 0 else None)
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable gateway status", topic=msg.topic)
            return
        with self._lock:
            self._status[key] = status
