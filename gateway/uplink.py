"""Publish the outbox to the broker: QoS 1, a retained birth and last-will, TLS and per-gateway credentials."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiomqtt
import structlog

from edge.messages import MessageError, ResendRequest, StatusMessage
from edge.mqtt import MqttSettings, aiomqtt_client_kwargs
from edge.telemetry import (
    SCHEMA,
    TelemetryBatch,
    polls,
    resend_topic,
    status_topic,
    telemetry_topic,
)
from gateway.client import CheckedClient, PublishRefused, cancel_requests, raise_if_cancelled
from gateway.metrics import GatewayMetrics
from gateway.outbox import Batch, Outbox
from gateway.settings import gateway_client_id

__all__ = ["PublishRefused", "Uplink"]

log = structlog.get_logger("kwwk.gateway.uplink")


class Uplink:
    def __init__(self, cell: str, gateway: str, outbox: Outbox, settings: MqttSettings, metrics: GatewayMetrics,
                 batch_size: int = 500, flush_interval: float = 1.0, status_interval: float = 60.0) -> None:
        self.cell = cell
        self.gateway = gateway
        self.outbox = outbox
        # the client id names the gateway's persistent session: never a random one
        self.settings = settings if settings.client_id else settings.replace(client_id=gateway_client_id(gateway))
        self.metrics = metrics
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.status_interval = status_interval
        self.wakeup = asyncio.Event()
        self.connected = False
        self.last_puback: float | None = None
        self.topic = telemetry_topic(cell, gateway)
        self.status = status_topic(cell, gateway)
        self.resend = resend_topic(cell, gateway)
        self._resent_at: dict[tuple[str, int], float] = {}
        self.last_refusal: str | None = None

    def _status(self, state: str) -> bytes:
        # the will is fixed at connect time: a depth in it would be stale
        depth = self.outbox.depth if state == "online" else None
        return StatusMessage.now(self.cell, self.gateway, state, outbox_readings=depth).to_bytes()

    async def _heartbeat(self, client: CheckedClient) -> None:
        """Refresh the retained online status, so operators see the current outbox depth and a live clock."""
        while True:
            await asyncio.sleep(self.status_interval)
            await client.publish_acked(self.status, self._status("online"), retain=True)

    async def run(self) -> None:
        """Stay connected; reconnect with jittered exponential backoff (the settings' reconnect bounds)."""
        s = self.settings
        backoff = s.backoff()
        will = aiomqtt.Will(self.status, self._status("offline"), qos=1, retain=True)
        while True:
            requested = cancel_requests()
            try:
                async with CheckedClient(**aiomqtt_client_kwargs(s), will=will, timeout=10) as client:
                    try:
                        raise_if_cancelled(requested)  # aiomqtt's connect waits with wait_for
                        backoff.success()
                        self.connected = True
                        self.outbox.online = True  # readings wait in RAM for the PUBACK (gateway/outbox.py)
                        self.metrics.connected.set(1)
                        self.metrics.connects.labels("ok").inc()
                        log.info("connected to broker", host=s.host, port=s.port, tls=s.tls)
                        await client.publish_acked(self.status, self._status("online"), retain=True)
                        await client.subscribe_acked(self.resend, qos=1)
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._drain(client), name=f"kwwk[{self.gateway}].drain")
                            tg.create_task(self._answer_resends(client), name=f"kwwk[{self.gateway}].resend")
                            tg.create_task(self._heartbeat(client), name=f"kwwk[{self.gateway}].status")
                    except asyncio.CancelledError:
                        # a clean stop: the will only fires on an unclean one, so say offline ourselves
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(2):
                                await client.publish_acked(self.status, self._status("offline"), retain=True)
                        raise
            except* aiomqtt.MqttError as group:
                err = group.exceptions[0]
                self.metrics.connects.labels("failed").inc()
                if isinstance(err, PublishRefused):
                    self.metrics.refused.labels(f"{err.code:#04x}").inc()
                    self.last_refusal = str(err)
                    log.error("the broker refuses our publishes; readings stay in the outbox", error=str(err),
                              outbox=self.outbox.depth, hint="check this gateway's credentials and broker ACL")
                if self.connected:
                    log.warning("lost the broker", error=str(err), outbox=self.outbox.depth)
                else:
                    log.warning("cannot reach the broker", error=str(err), attempt=backoff.failures + 1,
                                outbox=self.outbox.depth)
            finally:
                self.connected = False
                self.metrics.connected.set(0)
                await self.outbox.go_offline()  # what waited in RAM for the broker goes to disk now
            await asyncio.sleep(backoff.failure())

    async def _drain(self, client: CheckedClient) -> None:
        for again in self.outbox.in_flight():  # numbered before a crash or disconnect: same seq again
            await self._send(client, again, resend=True)
        while True:
            batch = await self.outbox.next_batch(self.batch_size)
            if batch is None:
                self.wakeup.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the
                # event, and the task then never stops (seen: a gateway hanging on SIGTERM)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval):
                        await self.wakeup.wait()
                continue
            await self._send(client, batch)

    async def _answer_resends(self, client: CheckedClient) -> None:
        """Send archived batches again when a collector found their sequence numbers missing."""
        async for message in client.messages:
            try:
                request = ResendRequest.parse(message.payload)  # type: ignore[arg-type]
            except MessageError as err:
                log.warning("ignored a malformed resend request", error=str(err)[:200])
                continue
            now = time.monotonic()
            for seq in sorted(set(request.seqs)):
                key = (request.stream, seq)
                if now - self._resent_at.get(key, -1e9) < 5:
                    continue  # several collector replicas ask for the same batch at about the same time
                batch = self.outbox.sent_batch(key)
                if batch is None:
                    self.metrics.resend_missing.inc()
                    log.warning("asked to resend a batch no longer kept", stream=request.stream, seq=seq,
                                archived=len(self.outbox.archive))
                    continue
                self._resent_at[key] = now
                await self._send(client, batch, resend=True, archived=True)
                self.metrics.resent.inc()
            if len(self._resent_at) > 10_000:
                self._resent_at = {s: t for s, t in self._resent_at.items() if now - t < 5}

    async def _send(self, client: CheckedClient, batch: Batch, resend: bool = False, archived: bool = False) -> None:
        msg = TelemetryBatch.model_construct(
            schema_=SCHEMA, cell=self.cell, gateway=self.gateway, stream=batch.stream, seq=batch.seq,
            sent=int(time.time() * 1000), replay=batch.replay or resend, polls=polls(batch.readings),
            outbox_depth=self.outbox.depth, read_errors=self.metrics.read_errors_total())
        await client.publish_acked(self.topic, msg.to_json())  # returns after a successful PUBACK, else raises
        if archived:
            return
        await self.outbox.ack(batch.key)
        self.last_puback = time.time()
        self.metrics.last_puback.set(self.last_puback)
        self.metrics.published.labels(str(batch.replay or resend).lower()).inc()
        self.metrics.published_readings.inc(len(batch.readings))

