"""At-least-once ingest: a message is acknowledged to the broker only after InfluxDB accepted it.

The paho adapter of the collector: connect with a persistent session (paho-mqtt 2 with manual acks;
aiomqtt has none), subscribe to the collectors' shared group, hand every message to the acking writer
(collector/acking.py, which encodes through collector/encode.py, writes and acknowledges), publish its dead
letters and the sequence audit's resend requests. The broker's Receive Maximum bounds how many
unacknowledged messages we hold, so memory stays bounded while the database is away: we stop
acknowledging, the broker keeps the rest in our persistent session, and we resume when it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog

from collector.acking import AckingWriter, Message, WriterSettings
from collector.audit import GapAuditor
from collector.encode import Encoder, Rejection
from collector.metrics import CollectorMetrics
from collector.query import BlockingInfluxQL
from collector.registry import Registry
from collector.storage import InfluxSettings, Writer
from edge.messages import DeadLetter
from edge.mqtt import MqttSettings, connect_kwargs, paho_client
from edge.telemetry import TOPIC_ROOT, deadletter_topic, parse_topic

__all__ = ["COLLECTOR_MQTT", "SHARE_GROUP", "CollectorSettings", "Ingest"]

log = structlog.get_logger("kwwk.collector")
SHARE_GROUP = "kwwk-collectors"

#: a fixed client id per replica names its persistent session. A replica that dies and stays away keeps its
#: share of the shared subscription until that session expires: shorter than the gateways' archive (1 h), so
#: the audit can still recover what it swallowed.
COLLECTOR_MQTT = MqttSettings(client_id="kwwk-collector-1", session_expiry_s=900)


@dataclass(frozen=True)
class CollectorSettings:
    mqtt: MqttSettings = COLLECTOR_MQTT
    share_group: str = SHARE_GROUP
    receive_maximum: int = 500
    batch_lines: int = 5000  # InfluxDB's advice for one write
    flush_interval_s: float = 0.5
    writers: int = 2  # batches written at once: one database connection leaves its cores idle
    audit_interval_s: float = 15.0
    audit_grace_s: float = 10.0
    audit_retry_s: float = 30.0

    @property
    def writer(self) -> WriterSettings:
        return WriterSettings(batch_lines=self.batch_lines, flush_interval_s=self.flush_interval_s,
                              writers=self.writers)


class Ingest:
    def __init__(self, settings: CollectorSettings, registry: Registry, writer: Writer,
                 metrics: CollectorMetrics | None = None, auditor_influx: InfluxSettings | None = None,
                 on_stored: Callable[[str, int, int], None] | None = None) -> None:
        self.s = settings
        self.registry = registry
        self.metrics = metrics or CollectorMetrics()
        self.connected = False
        self.subscribed = threading.Event()  # the shared subscription is in place: messages come
        self._stop = threading.Event()
        self.mqtt = settings.mqtt.replace(client_id=settings.mqtt.identifier("kwwk-collector"))
        self._client = paho_client(self.mqtt, client_id_prefix="kwwk-collector", manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self.writer = AckingWriter(settings.writer, Encoder(registry), writer, self.metrics,
                                   ack=self._client.ack, deadletter=self._deadletter, on_stored=on_stored)
        self.auditor = (GapAuditor(BlockingInfluxQL(auditor_influx), self._publish_request, self.metrics,
                                   grace_s=settings.audit_grace_s, retry_s=settings.audit_retry_s)
                        if auditor_influx is not None else None)
        self._auditor_thread: threading.Thread | None = None

    @property
    def stored_readings(self) -> int:
        return self.writer.stored_readings

    def start(self) -> None:
        self._client.connect_async(**connect_kwargs(self.mqtt, ReceiveMaximum=self.s.receive_maximum))
        self._client.loop_start()
        self.writer.start()
        if self.auditor is not None:
            self._auditor_thread = threading.Thread(
                target=self.auditor.run, args=(self._stop, self.s.audit_interval_s, lambda: self.connected),
                name="kwwk.collector.audit", daemon=True)
            self._auditor_thread.start()

    # -- paho's network thread --------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            log.error("broker refused the connection", reason=str(reason))
            return
        self.connected = True
        self.metrics.connected.set(1)
        client.subscribe(f"$share/{self.s.share_group}/{TOPIC_ROOT}/+/+/telemetry", qos=1)
        # collectors before 2026-12 also subscribed to gateway status, and a resumed session keeps its
        # subscriptions: drop that one, or every status change would come here and be dead-lettered
        client.unsubscribe(f"{TOPIC_ROOT}/+/+/status")
        log.info("connected to broker", broker=self.mqtt.address, client_id=self.mqtt.client_id)

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, reasons: list[Any], _p: object) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
        else:
            log.error("broker refused the subscription", reasons=[str(r) for r in reasons])

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        self.connected = False
        self.subscribed.clear()
        self.metrics.connected.set(0)
        if not self._stop.is_set():
            log.warning("lost the broker; reconnecting", reason=str(reason))

    def _on_message(self, client: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        topic = parse_topic(message.topic)
        if topic is not None and topic[2] == "status":  # queued for an older session's subscription: not ours
            client.ack(message.mid, message.qos)
            return
        self.writer.put(Message(message.mid, message.qos, message.topic, bytes(message.payload)))

    # -- what the writer and the auditor publish ----------------------------------------------------
    def _deadletter(self, m: Message, r: Rejection) -> None:
        letter = DeadLetter.of(r.reason, r.detail, m.topic, m.payload, m.received)
        info = self._client.publish(deadletter_topic(_safe(r.cell), _safe(r.gateway)), letter.to_bytes(), qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            info.wait_for_publish(timeout=5)

    def _publish_request(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    # -- lifecycle -----------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.writer.stop(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        if self.auditor is not None and self._auditor_thread is not None:
            self._auditor_thread.join(timeout)  # it sees the stop at once, unless a query is under way
            self.auditor.db.close()

    def health(self) -> dict[str, Any]:
        # before the first accepted write the database counts as fine: a collector with nothing to store is healthy
        db_ok = self.writer.last_write_ok is None or self.writer.database_up
        return {"status": "ok" if self.connected else "degraded", "broker_connected": self.connected,
                "database_ok": db_ok, "queued": self.writer.queued,
                "stored_readings": self.writer.stored_readings}


def _safe(part: str) -> str:
    """A topic level built from untrusted input: no wildcards or separators."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in part)[:48]
    return cleaned or "_"
