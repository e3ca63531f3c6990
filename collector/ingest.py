"""At-least-once ingest: a message is acknowledged to the broker only after InfluxDB accepted it.

paho-mqtt 2 with manual acks (aiomqtt has none). The broker's Receive Maximum bounds how many
unacknowledged messages we hold, so memory stays bounded while the database is away: we stop
acknowledging, the broker keeps the rest in our persistent session, and we resume when it returns.
"""

from __future__ import annotations

import json
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from collector.audit import BATCH_MEASUREMENT, GapAuditor
from collector.lineprotocol import Row, encode
from collector.metrics import CollectorMetrics
from collector.registry import Registry
from collector.storage import InfluxSettings, StorageError, Writer
from edge.telemetry import TOPIC_ROOT, TelemetryBatch, deadletter_topic, parse_topic

__all__ = ["CollectorSettings", "Ingest", "SHARE_GROUP"]

log = structlog.get_logger("kwwk.collector")
SHARE_GROUP = "kwwk-collectors"


@dataclass(frozen=True)
class CollectorSettings:
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    client_id: str = "kwwk-collector-1"
    share_group: str = SHARE_GROUP
    batch_points: int = 5000
    flush_interval_s: float = 0.5
    receive_maximum: int = 500
    # A replica that dies and stays away keeps its share of a shared subscription until its session
    # expires; shorter than the gateways' archive (1 h), so the audit can still recover what it swallowed.
    session_expiry_s: int = 900
    audit_interval_s: float = 15.0
    audit_grace_s: float = 10.0
    audit_retry_s: float = 30.0


@dataclass
class _Msg:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received: float = field(default_factory=time.time)


@dataclass
class _Parsed:
    msg: _Msg
    rows: list[Row]
    readings: int
    deadletters: list[tuple[str, str, str, Any]]  # (cell, gateway, reason, detail)


class Ingest:
    def __init__(self, settings: CollectorSettings, registry: Registry, writer: Writer,
                 metrics: CollectorMetrics | None = None, auditor_influx: InfluxSettings | None = None,
                 on_stored: Callable[[str, int, int], None] | None = None) -> None:
        self.s = settings
        self.on_stored = on_stored  # (cell, first ts, last ts) of each stored message: late data for the balance
        self.registry = registry
        self.writer = writer
        self.metrics = metrics or CollectorMetrics()
        self._queue: queue.Queue[_Msg] = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._seen: dict[tuple[str, str, str], set[int]] = {}
        self.gateway_status: dict[tuple[str, str], dict[str, Any]] = {}
        self.last_write_ok: float | None = None
        self.connected = False
        self.stored_readings = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                                   protocol=mqtt.MQTTv5, manual_ack=True)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self._client.tls_set_context(ssl.create_default_context(cafile=settings.ca_file))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.2, 2)
        self.auditor = (GapAuditor(auditor_influx, self._publish_request, self.metrics, grace_s=settings.audit_grace_s,
                                  retry_s=settings.audit_retry_s)
                        if auditor_influx is not None else None)
        self._auditor_thread: threading.Thread | None = None

    # -- MQTT side (paho's network thread) -----------------------------------------------------
    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.s.session_expiry_s
        props.ReceiveMaximum = self.s.receive_maximum
        self._client.connect_async(self.s.mqtt_host, self.s.mqtt_port, keepalive=30, clean_start=False,
                                   properties=props)
        self._client.loop_start()
        self._worker = threading.Thread(target=self._work, name="kwwk.collector.writer", daemon=True)
        self._worker.start()
        if self.auditor is not None:
            self._auditor_thread = threading.Thread(target=self._audit_loop, name="kwwk.collector.audit", daemon=True)
            self._auditor_thread.start()

    def _audit_loop(self) -> None:
        assert self.auditor is not None
        while not self._stop.wait(self.s.audit_interval_s):
            if self.connected:
                self.auditor.run_once()

    def _publish_request(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            log.error("broker refused the connection", reason=str(reason))
            return
        self.connected = True
        self.metrics.connected.set(1)
        client.subscribe(f"$share/{self.s.share_group}/{TOPIC_ROOT}/+/+/telemetry", qos=1)
        client.subscribe(f"{TOPIC_ROOT}/+/+/status", qos=1)
        log.info("connected to broker", host=self.s.mqtt_host, port=self.s.mqtt_port, client_id=self.s.client_id)

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        self.connected = False
        self.metrics.connected.set(0)
        if not self._stop.is_set():
            log.warning("lost the broker; reconnecting", reason=str(reason))

    def _on_message(self, client: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(message.topic)
        if parsed is not None and parsed[2] == "status":
            try:
                self.gateway_status[(parsed[0], parsed[1])] = json.loads(message.payload)
            except ValueError:
                log.warning("unreadable gateway status", topic=message.topic)
            client.ack(message.mid, message.qos)
            return
        self._queue.put(_Msg(message.mid, message.qos, message.topic, bytes(message.payload)))
        self.metrics.queue_depth.set(self._queue.qsize())

    # -- the writer thread ---------------------------------------------------------------------
    def _collect(self) -> list[_Msg]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        readings = 0
        deadline = time.monotonic() + self.s.flush_interval_s
        while readings < self.s.batch_points:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                m = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            batch.append(m)
            readings += m.payload.count(b'"point"')
        return batch

    def _work(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            msgs = self._collect()
            if not msgs:
                continue
            parsed = [self.parse(m) for m in msgs]
            try:
                self._store(parsed)
            except _Abandon:
                log.warning("stopped while the database is away; messages stay unacknowledged for redelivery",
                            messages=len(msgs) + self._queue.qsize())
                return
            self.metrics.queue_depth.set(self._queue.qsize())

    def parse(self, m: _Msg) -> _Parsed:
        """Validate one message; return what to store and what to dead-letter (never raises)."""
        topic = parse_topic(m.topic)
        t_cell, t_gw = (topic[0], topic[1]) if topic else ("_", "_")
        try:
            batch = TelemetryBatch.model_validate_json(m.payload)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            reason = "bad_json" if first["type"] == "json_invalid" else "bad_schema"
            where = ".".join(str(p) for p in first["loc"])
            return _Parsed(m, [], 0, [(t_cell, t_gw, reason, f"{where}: {first['msg']}")])
        if (batch.cell, batch.gateway) != (t_cell, t_gw):
            return _Parsed(m, [], 0, [(t_cell, t_gw, "topic_mismatch",
                                       f"payload says {batch.cell}/{batch.gateway}, topic says {t_cell}/{t_gw}")])
        if batch.cell not in self.registry.cells:
            return _Parsed(m, [], 0, [(t_cell, t_gw, "unknown_cell", f"no cell {batch.cell!r} in the registry")])
        if (batch.cell, batch.gateway) not in self.registry.gateways:
            return _Parsed(m, [], 0, [(t_cell, t_gw, "unknown_gateway",
                                       f"cell {batch.cell!r} has no gateway {batch.gateway!r}")])
        self._track_seq(batch)
        rows: dict[tuple[str, str, int], dict[str, float]] = {}
        meas: dict[tuple[str, str, int], str] = {}
        bad: list[tuple[str, str, str, Any]] = []
        stored = 0
        for r in batch.readings:
            info = self.registry.device(batch.cell, r.device)
            if info is None or info.gateway != batch.gateway:
                bad.append((batch.cell, batch.gateway, "unknown_device", f"{r.device!r} is not a device of "
                                                                         f"{batch.cell}/{batch.gateway}"))
                continue
            if r.point not in info.points:
                bad.append((batch.cell, batch.gateway, "unknown_point", f"device {r.device!r} has no point {r.point!r}"))
                continue
            if r.value is None:
                self.metrics.readings.labels("bad_quality").inc()
                continue
            key = (info.measurement, r.device, r.ts)
            rows.setdefault(key, {})[r.point] = r.value
            meas[key] = info.measurement
            stored += 1
        out: list[Row] = [
            (measurement, (("cell", batch.cell), ("gateway", batch.gateway), ("device", device)), ts, fields)
            for (measurement, device, ts), fields in rows.items()
        ]
        fields = {"seq": float(batch.seq), "readings": float(len(batch.readings)),
                  "replay": 1.0 if batch.replay else 0.0}
        if batch.outbox_depth is not None:
            fields["outbox_depth"] = float(batch.outbox_depth)
        if batch.read_errors is not None:
            fields["read_errors"] = float(batch.read_errors)
        out.append((BATCH_MEASUREMENT, (("cell", batch.cell), ("gateway", batch.gateway), ("stream", batch.stream)),
                    batch.sent, fields))
        return _Parsed(m, out, stored, bad)

    def _track_seq(self, batch: TelemetryBatch) -> None:
        """Count repeats seen by this replica; gaps are found by the auditor, which sees what all replicas stored."""
        key = (batch.cell, batch.gateway, batch.stream)
        seen = self._seen.setdefault(key, set())
        if batch.seq in seen:
            self.metrics.seq_duplicates.labels(batch.cell, batch.gateway).inc()
        seen.add(batch.seq)
        if len(seen) > 100_000:
            self._seen[key] = set(sorted(seen)[-50_000:])

    def _store(self, parsed: list[_Parsed]) -> None:
        encoded: dict[int, str] = {}
        for i, p in enumerate(parsed):
            if not p.rows:
                continue
            try:
                encoded[i] = encode(p.rows)
            except ValueError as err:  # valid JSON, but nothing InfluxDB could store as written
                p.deadletters.append((*self._cell_gw(p.msg), "unstorable", str(err)))
                p.rows, p.readings = [], 0
        if encoded and not self._write_with_retry("".join(encoded.values())):
            # the database refused the batch as such: find the message(s) it cannot take
            for i, lines in encoded.items():
                p = parsed[i]
                if not self._write_with_retry(lines):
                    p.deadletters.append((*self._cell_gw(p.msg), "storage_rejected", "the database refused it"))
                    p.rows, p.readings = [], 0
        now = time.time()
        for p in parsed:
            for cell, gw, reason, detail in p.deadletters:
                self._deadletter(p.msg, cell, gw, reason, detail)
            if p.rows:
                self.metrics.readings.labels("stored").inc(p.readings)
                self.stored_readings += p.readings
                for row in p.rows:
                    if row[0] != BATCH_MEASUREMENT:
                        self.metrics.lag_seconds.observe(max(0.0, now - row[2] / 1000))
                stamps = [row[2] for row in p.rows if row[0] != BATCH_MEASUREMENT]
                if stamps and self.on_stored is not None:
                    self.on_stored(dict(p.rows[0][1])["cell"], min(stamps), max(stamps))
            self.metrics.messages.labels("stored" if p.rows and not p.deadletters else
                                         "partial" if p.rows else "dead_lettered").inc()
            self._client.ack(p.msg.mid, p.msg.qos)

    @staticmethod
    def _cell_gw(m: _Msg) -> tuple[str, str]:
        t = parse_topic(m.topic)
        return (t[0], t[1]) if t else ("_", "_")

    def _write_with_retry(self, lines: str) -> bool:
        """True when stored; False when the database rejects the data itself. Retries outages forever."""
        attempt = 0
        while True:
            t0 = time.perf_counter()
            try:
                self.writer.write(lines)
            except StorageError as err:
                self.metrics.write_errors.labels(str(err.retryable).lower()).inc()
                if not err.retryable:
                    log.error("database rejected a batch", error=str(err))
                    return False
                self.metrics.database_up.set(0)
                attempt += 1
                delay = random.uniform(0.2, min(10.0, 0.5 * 2 ** min(attempt, 5)))  # noqa: S311
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("database unavailable; holding messages unacknowledged", error=str(err),
                                attempt=attempt, queued=self._queue.qsize())
                if self._stop.wait(delay) and attempt > 3:
                    # stopping while the database is away: leave the messages unacknowledged for redelivery
                    raise _Abandon from err
                continue
            self.metrics.write_seconds.observe(time.perf_counter() - t0)
            self.metrics.database_up.set(1)
            self.last_write_ok = time.time()
            if attempt:
                log.info("database back; writing resumed", attempts=attempt)
            return True

    def _deadletter(self, m: _Msg, cell: str, gateway: str, reason: str, detail: Any) -> None:
        self.metrics.rejects.labels(reason).inc()
        log.warning("dead-lettered", reason=reason, detail=str(detail)[:300], topic=m.topic)
        body = json.dumps({"reason": reason, "detail": detail, "topic": m.topic, "received": int(m.received * 1000),
                           "payload": m.payload[:65536].decode("utf-8", errors="replace")})
        info = self._client.publish(deadletter_topic(_safe(cell), _safe(gateway)), body, qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            info.wait_for_publish(timeout=5)

    # -- lifecycle -----------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._worker:
            self._worker.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self.writer.close()

    def health(self) -> dict[str, Any]:
        db_ok = self.last_write_ok is not None and self.metrics.database_up._value.get() == 1  # noqa: SLF001
        return {"status": "ok" if self.connected else "degraded", "broker_connected": self.connected,
                "database_ok": db_ok or self.last_write_ok is None, "queued": self._queue.qsize(),
                "stored_readings": self.stored_readings}


class _Abandon(Exception):  # noqa: N818 - internal control flow
    pass


def _safe(part: str) -> str:
    """A topic level built from untrusted input: no wildcards or separators."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in part)[:48]
    return cleaned or "_"

