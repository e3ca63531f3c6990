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
from collector.lineprotocol import encode
from collector.metrics import CollectorMetrics
from collector.registry import Registry
from collector.storage import InfluxSettings, StorageError, Writer
from edge.telemetry import TOPIC_ROOT, TelemetryBatch, deadletter_topic, parse_topic

__all__ = ["SHARE_GROUP", "CollectorSettings", "Ingest"]

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
    batch_lines: int = 5000  # InfluxDB's advice for one write
    flush_interval_s: float = 0.5
    receive_maximum: int = 500
    writers: int = 2  # batches written at once: one database connection leaves its cores idle
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
    lines: str  # line protocol: the readings and the batch record ("" when nothing is to be stored)
    readings: int  # values stored by those lines
    deadletters: list[tuple[str, str, str, Any]]  # (cell, gateway, reason, detail)
    cell: str = ""
    stamps: tuple[int, int] | None = None  # oldest and newest reading stored


class Ingest:
    def __init__(self, settings: CollectorSettings, registry: Registry, writer: Writer,
                 metrics: CollectorMetrics | None = None, auditor_influx: InfluxSettings | None = None,
                 on_stored: Callable[[str, int, int], None] | None = None) -> None:
        self.s = settings
        self.on_stored = on_stored  # (cell, first ts, last ts) of each stored message: late data for the balance
        self.registry = registry
        self.writer = writer
        self.metrics = metrics or CollectorMetrics()
        self._queue: queue.Queue[_Msg] = queue.Queue()  # bounded by the broker: Receive Maximum
        # parsed batches, numbered: written concurrently, acknowledged in the order they came
        self._ready: queue.Queue[tuple[int, list[_Parsed]] | None] = queue.Queue(maxsize=settings.writers)
        self._turn = threading.Condition()
        self._next_ack = 0
        self._stop = threading.Event()
        self._abandoned = threading.Event()
        self._threads: list[threading.Thread] = []
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
        self._threads = [threading.Thread(target=self._parse_loop, name="kwwk.collector.parse", daemon=True)] + [
            threading.Thread(target=self._write_loop, name=f"kwwk.collector.write-{i}", daemon=True)
            for i in range(self.s.writers)]
        for t in self._threads:
            t.start()
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

    # -- the parse thread: validate, encode, batch ------------------------------------------------
    def _parse_loop(self) -> None:
        """Parse messages into batches of about `batch_lines` lines, or what came within the flush interval."""
        number = 0
        while not self._abandoned.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    break
                continue
            batch = [self._parse_safely(first)]
            lines = batch[0].lines.count("\n")
            deadline = time.monotonic() + self.s.flush_interval_s
            while lines < self.s.batch_lines and (timeout := deadline - time.monotonic()) > 0:
                try:
                    p = self._parse_safely(self._queue.get(timeout=timeout))
                except queue.Empty:
                    break
                batch.append(p)
                lines += p.lines.count("\n")
            self._hand_over((number, batch))
            number += 1
        self._hand_over(None)

    def _hand_over(self, batch: tuple[int, list[_Parsed]] | None) -> None:
        while not self._abandoned.is_set():
            try:
                self._ready.put(batch, timeout=0.2)  # blocks while the database is away: memory stays bounded
                return
            except queue.Full:
                continue

    def _parse_safely(self, m: _Msg) -> _Parsed:
        try:
            return self.parse(m)
        except Exception as err:  # a bug of ours: keep the message (dead letter) and the collector running
            log.exception("could not parse a message", topic=m.topic)
            return _Parsed(m, "", 0, [(*self._cell_gw(m), "collector_error", f"{type(err).__name__}: {err}")])

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
            return _Parsed(m, "", 0, [(t_cell, t_gw, reason, f"{where}: {first['msg']}")])
        if (batch.cell, batch.gateway) != (t_cell, t_gw):
            return _Parsed(m, "", 0, [(t_cell, t_gw, "topic_mismatch",
                                       f"payload says {batch.cell}/{batch.gateway}, topic says {t_cell}/{t_gw}")])
        if batch.cell not in self.registry.cells:
            return _Parsed(m, "", 0, [(t_cell, t_gw, "unknown_cell", f"no cell {batch.cell!r} in the registry")])
        if (batch.cell, batch.gateway) not in self.registry.gateways:
            return _Parsed(m, "", 0, [(t_cell, t_gw, "unknown_gateway",
                                       f"cell {batch.cell!r} has no gateway {batch.gateway!r}")])
        self._track_seq(batch)
        lines: list[str] = []
        stamps: list[int] = []
        stored = unreadable = 0
        unknown_devices: dict[str, int] = {}  # device -> values
        unknown_points: list[str] = []
        for poll in batch.polls:  # the hot loop: one line per poll, keys and tags escaped once in the registry
            info = self.registry.devices.get((batch.cell, poll["device"]))
            if info is None or info.gateway != batch.gateway:
                unknown_devices[poll["device"]] = unknown_devices.get(poll["device"], 0) + len(poll["values"])
                continue
            keys = info.field_keys
            fields = []
            for point, value in poll["values"].items():
                key = keys.get(point)
                if key is None:
                    unknown_points.append(f"{poll['device']}.{point}")
                elif value is None:
                    unreadable += 1
                else:
                    fields.append(key + repr(value))
            if fields:
                lines.append(f"{info.line_prefix}{','.join(fields)} {poll['ts']}\n")
                stamps.append(poll["ts"])
                stored += len(fields)
        if unreadable:
            self.metrics.readings.labels("bad_quality").inc(unreadable)
        bad: list[tuple[str, str, str, Any]] = []
        if unknown_devices:
            self.metrics.readings.labels("rejected").inc(sum(unknown_devices.values()))
            bad.append((batch.cell, batch.gateway, "unknown_device",
                        f"not devices of {batch.cell}/{batch.gateway}: {_examples(unknown_devices)}"))
        if unknown_points:
            self.metrics.readings.labels("rejected").inc(len(unknown_points))
            bad.append((batch.cell, batch.gateway, "unknown_point",
                        f"points the devices do not have: {_examples(unknown_points)}"))
        fields = {"seq": float(batch.seq), "readings": float(batch.readings), "replay": 1.0 if batch.replay else 0.0}
        if batch.outbox_depth is not None:
            fields["outbox_depth"] = float(batch.outbox_depth)
        if batch.read_errors is not None:
            fields["read_errors"] = float(batch.read_errors)
        lines.append(encode([(BATCH_MEASUREMENT, (("cell", batch.cell), ("gateway", batch.gateway),
                                                  ("stream", batch.stream)), batch.sent, fields)]))
        return _Parsed(m, "".join(lines), stored, bad, batch.cell, (min(stamps), max(stamps)) if stamps else None)

    def _track_seq(self, batch: TelemetryBatch) -> None:
        """Count repeats seen by this replica; gaps are found by the auditor, which sees what all replicas stored."""
        key = (batch.cell, batch.gateway, batch.stream)
        seen = self._seen.setdefault(key, set())
        if batch.seq in seen:
            self.metrics.seq_duplicates.labels(batch.cell, batch.gateway).inc()
        seen.add(batch.seq)
        if len(seen) > 100_000:
            self._seen[key] = set(sorted(seen)[-50_000:])

    # -- the write thread: store, then acknowledge ---------------------------------------------------
    def _write_loop(self) -> None:
        while (item := self._ready.get()) is not None:
            number, batch = item
            try:
                self._write(batch)
            except _Abandon:
                self._abandoned.set()
                log.warning("stopped while the database is away; messages stay unacknowledged for redelivery",
                            messages=len(batch) + self._queue.qsize())
                return
            with self._turn:  # MQTT wants acknowledgements in the order the messages came
                while self._next_ack != number:
                    if self._abandoned.is_set():
                        return  # an earlier batch was not stored: this one is redelivered with it
                    self._turn.wait(0.2)
                self._settle(batch)
                self._next_ack += 1
                self._turn.notify_all()
            self.metrics.queue_depth.set(self._queue.qsize())
        self._ready.put(None)  # the end, for the other writers too

    def _write(self, parsed: list[_Parsed]) -> None:
        """One write for the whole batch; a batch the database refuses is tried message by message."""
        body = "".join(p.lines for p in parsed)
        if body and not self._write_with_retry(body):
            for p in parsed:
                if p.lines and not self._write_with_retry(p.lines):
                    p.deadletters.append((*self._cell_gw(p.msg), "storage_rejected", "the database refused it"))
                    p.lines, p.readings, p.stamps = "", 0, None

    def _settle(self, parsed: list[_Parsed]) -> None:
        """Dead letters, metrics, then the acknowledgement of each message of a stored batch."""
        now = time.time()
        for p in parsed:
            for cell, gw, reason, detail in p.deadletters:
                self._deadletter(p.msg, cell, gw, reason, detail)
            if p.readings:
                self.metrics.readings.labels("stored").inc(p.readings)
                self.stored_readings += p.readings
            if p.stamps is not None:
                self.metrics.lag_seconds.observe(max(0.0, now - p.stamps[0] / 1000))
                if self.on_stored is not None:
                    try:
                        self.on_stored(p.cell, *p.stamps)
                    except Exception:  # the hook (late data for the balance) must never stop ingest
                        log.exception("on_stored hook failed", cell=p.cell)
            self.metrics.messages.labels("stored" if p.lines and not p.deadletters else
                                         "partial" if p.lines else "dead_lettered").inc()
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
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
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


def _examples(items: dict[str, int] | list[str], shown: int = 5) -> str:
    names = list(items)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def _safe(part: str) -> str:
    """A topic level built from untrusted input: no wildcards or separators."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in part)[:48]
    return cleaned or "_"

