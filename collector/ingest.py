"""At-least-once ingest: a message is acknowledged to the broker only after InfluxDB accepted it.

The paho adapter of the collector: connect with a persistent session (paho-mqtt 2 with manual acks;
aiomqtt has none), subscribe to the collectors' shared group, hand every message to the acking writer
(collector/acking.py, which encodes through collector/encode.py, writes and acknowledges), publish its dead
letters and the sequence audit's resend requests. The broker's Receive Maximum bounds how many
unacknowledged messages we hold, so memory stays bounded while the database is away: we stop
acknowledging, the broker keeps the rest in our persistent session, and we resume when it returns.

A clean stop leaves nothing parked in the shared group: it unsubscribes, stores and acknowledges what
came, then DISCONNECTs with Session Expiry Interval 0, so the broker deals everything to the other
replicas at once (the session is kept instead when something could not be stored, for redelivery).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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

__all__ = ["COLLECTOR_MQTT", "COLLECTOR_SESSION_EXPIRY_S", "SHARE_GROUP", "CollectorSettings", "Ingest"]

log = structlog.get_logger("kwwk.collector")
SHARE_GROUP = "kwwk-collectors"

#: a fixed client id per replica names its persistent session (with the shipped broker config the client id is
#: the replica's own username). The session expiry is a trade-off. A replica SIGKILLed and not back keeps its
#: turn of the shared subscription until its session expires: the broker parks a share of all telemetry there,
#: and drops it at expiry, when the survivors' audit asks the gateways for it again (their archive keeps 1 h).
#: So the expiry plus an audit round (audit_interval_s + audit_grace_s) is how late such a reading can be: 5 s
#: keeps every reading within 30 s of its publication (tests/test_replicas.py measures it). The price: a
#: replica (or the only collector) away longer than 5 s finds no session; what the broker got meanwhile comes
#: back through resend requests from the gateways' archive instead of the broker's queue (later, and only
#: within the archive's hour). A clean stop ends the session at once (see Ingest.stop): nothing is parked.
COLLECTOR_SESSION_EXPIRY_S = 5
COLLECTOR_MQTT = MqttSettings(client_id="kwwk-collector-1", session_expiry_s=COLLECTOR_SESSION_EXPIRY_S)


@dataclass(frozen=True)
class CollectorSettings:
    mqtt: MqttSettings = COLLECTOR_MQTT
    share_group: str = SHARE_GROUP
    receive_maximum: int = 500
    batch_lines: int = 5000  # InfluxDB's advice for one write
    flush_interval_s: float = 0.5
    writers: int = 2  # batches written at once: one database connection leaves its cores idle
    # fast enough that what a killed replica's session swallowed is asked for again within seconds of its expiry
    audit_interval_s: float = 3.0
    audit_grace_s: float = 3.0
    audit_retry_s: float = 6.0
    leave_quiet_s: float = 0.3  # a clean stop: no message for this long after the UNSUBACK, so all that came is in

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
        self._held: set[int] = set()  # message ids received, not yet acknowledged (a redelivery keeps its id)
        self._last_message = 0.0  # time.monotonic() of the last message received
        self._held_lock = threading.Lock()
        self._unsubacks: set[int] = set()  # message ids of the UNSUBACKs received
        self._unsuback = threading.Condition()
        self.mqtt = settings.mqtt.replace(client_id=settings.mqtt.identifier("kwwk-collector"))
        self._client = paho_client(self.mqtt, client_id_prefix="kwwk-collector", manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_unsubscribe
        self.writer = AckingWriter(settings.writer, Encoder(registry), writer, self.metrics,
                                   ack=self._ack, deadletter=self._deadletter, on_stored=on_stored)
        self.auditor = (GapAuditor(BlockingInfluxQL(auditor_influx), self._publish_request, self.metrics,
                                   grace_s=settings.audit_grace_s, retry_s=settings.audit_retry_s)
                        if auditor_influx is not None else None)
        self._auditor_thread: threading.Thread | None = None

    @property
    def stored_readings(self) -> int:
        return self.writer.stored_readings

    @property
    def share_topic(self) -> str:
        return f"$share/{self.s.share_group}/{TOPIC_ROOT}/+/+/telemetry"

    @property
    def held(self) -> int:
        """Messages received and not acknowledged yet."""
        with self._held_lock:
            return len(self._held)

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
        client.subscribe(self.share_topic, qos=1)
        # collectors before 2026-12 also subscribed to gateway status, and a resumed session keeps its
        # subscriptions: drop that one, or every status change would come here and be dead-lettered
        client.unsubscribe(f"{TOPIC_ROOT}/+/+/status")
        log.info("connected to broker", broker=self.mqtt.address, client_id=self.mqtt.client_id)

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, reasons: list[Any], _p: object) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
        else:
            log.error("broker refused the subscription", reasons=[str(r) for r in reasons])

    def _on_unsubscribe(self, _c: mqtt.Client, _u: object, mid: int, _reasons: object, _p: object) -> None:
        with self._unsuback:
            self._unsubacks.add(mid)
            self._unsuback.notify_all()

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
        with self._held_lock:
            self._held.add(message.mid)
            self._last_message = time.monotonic()
        self.writer.put(Message(message.mid, message.qos, message.topic, bytes(message.payload)))

    def _ack(self, mid: int, qos: int) -> None:
        self._client.ack(mid, qos)
        with self._held_lock:
            self._held.discard(mid)

    # -- what the writer and the auditor publish ----------------------------------------------------
    def _deadletter(self, m: Message, r: Rejection) -> None:
        letter = DeadLetter.of(r.reason, r.detail, m.topic, m.payload, m.received)
        # the durable copy is already on disk (collector/deadletters.py): the notice is queued, never waited for,
        # so a notice cannot hold the writer while back-pressure holds paho's network thread
        self._client.publish(deadletter_topic(_safe(r.cell), _safe(r.gateway)), letter.to_bytes(), qos=1)

    def _publish_request(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    # -- lifecycle -----------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Leave the shared group, store and acknowledge what came, end the session (nothing parked at the
        broker); a session with messages that could not be stored is kept, for their redelivery."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        left = self._leave_group(deadline - timeout / 2)
        self.writer.stop(max(0.0, deadline - time.monotonic()))
        held = self.held
        end = left and held == 0
        if end:  # MQTT 5: the Session Expiry Interval may be lowered on DISCONNECT; 0 ends the session now
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
        else:
            self._client.disconnect()
        self._client.loop_stop()
        log.info("left the broker", session="ended" if end else "kept for redelivery", unacknowledged=held,
                 client_id=self.mqtt.client_id)
        if self.auditor is not None and self._auditor_thread is not None:
            self._auditor_thread.join(timeout)  # it sees the stop at once, unless a query is under way
            self.auditor.db.close()

    def _leave_group(self, deadline: float) -> bool:
        """Unsubscribe from the shared group and wait until what the broker had sent us is in and acknowledged;
        True when it is (before `deadline`, time.monotonic())."""
        if not self.connected:
            return False
        rc, mid = self._client.unsubscribe(self.share_topic)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return False
        with self._unsuback:
            if not self._unsuback.wait_for(lambda: mid in self._unsubacks, max(0.0, deadline - time.monotonic())):
                return False
        while time.monotonic() < deadline:  # the broker may still send what it had queued for us before the UNSUBACK
            with self._held_lock:
                quiet = time.monotonic() - self._last_message >= self.s.leave_quiet_s
                if quiet and not self._held:
                    return True
            time.sleep(0.05)
        return False

    def health(self) -> dict[str, Any]:
        # the writer's own view of the database: ok until a write fails for a reason that is not the data's
        # (a wrong token, a missing database, a server away), which holds everything unacknowledged: degraded
        db_ok = self.writer.database_state == "ok"
        return {"status": "ok" if self.connected and db_ok else "degraded", "broker_connected": self.connected,
                "database_ok": db_ok, "database_state": self.writer.database_state,
                "database_error": self.writer.database_error, "queued": self.writer.queued,
                "stored_readings": self.writer.stored_readings}


def _safe(part: str) -> str:
    """A topic level built from untrusted input: no wildcards or separators."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in part)[:48]
    return cleaned or "_"
