"""The gateway process: pollers feed the outbox, the uplink drains it, health and metrics watch both."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import structlog

from edge.cell import CellConfig
from edge.mqtt import MqttSettings
from edge.obs import HealthServer
from edge.telemetry import Reading
from gateway.metrics import GatewayMetrics
from gateway.outbox import Outbox
from gateway.poller import build_pollers
from gateway.systemd import Systemd
from gateway.uplink import Uplink

__all__ = ["GatewayService"]

log = structlog.get_logger("kwwk.gateway")


class GatewayService:
    def __init__(self, cfg: CellConfig, gateway_id: str, broker: MqttSettings, outbox_path: Path,
                 health_host: str = "127.0.0.1", health_port: int = 0) -> None:
        self.cfg = cfg
        self.gateway = cfg.gateway(gateway_id)
        self.metrics = GatewayMetrics()
        spec = self.gateway.outbox
        self.outbox = Outbox(outbox_path, max_readings=spec.max_readings, max_age_s=spec.max_age_days * 86400,
                             max_bytes=int(spec.max_mb * 2**20), overflow=spec.overflow, fsync=spec.fsync)
        self.uplink = Uplink(cfg.cell.id, self.gateway.id, self.outbox, broker, self.metrics,
                             batch_size=spec.batch_readings)
        self.pollers, self.lines = build_pollers(cfg, self.gateway, self._store, self.metrics)
        self.health = HealthServer(self.metrics.registry, self.healthz, health_host, health_port)
        self._dropped_seen: dict[str, int] = {}
        self.systemd = Systemd()
        self.started = time.time()

    def _store(self, readings: list[Reading]) -> None:
        stored = self.outbox.append(readings)
        for r in readings[:stored]:
            self.metrics.readings.labels(r.quality).inc()
        self._sync_outbox_metrics()
        self.uplink.wakeup.set()

    def _sync_outbox_metrics(self) -> None:
        for reason, n in self.outbox.dropped.items():
            new = n - self._dropped_seen.get(reason, 0)
            if new:
                self.metrics.outbox_dropped.labels(reason).inc(new)
                self._dropped_seen[reason] = n
        self.metrics.outbox_depth.set(self.outbox.depth)
        oldest = self.outbox.oldest_ts()
        self.metrics.outbox_oldest_age.set(max(0.0, time.time() - oldest / 1000) if oldest else 0)

    def healthz(self) -> dict[str, Any]:
        devices = {
            p.device.id: {"last_ok": p.last_ok, "error": p.last_error,
                          "stale": p.last_ok is None or time.time() - p.last_ok > 3 * p.interval + 5}
            for p in self.pollers
        }
        broker_ok = self.uplink.connected
        status = "ok" if broker_ok and not all(d["stale"] for d in devices.values()) else "degraded"
        return {"status": status, "gateway": self.gateway.id, "cell": self.cfg.cell.id, "broker_connected": broker_ok,
                "last_puback": self.uplink.last_puback, "publish_refused": self.uplink.last_refusal,
                "outbox_depth": self.outbox.depth,
                "outbox_dropped": dict(self.outbox.dropped), "devices": devices}

    async def _housekeeping(self) -> None:
        """Expire old readings, refresh gauges, and pet systemd's watchdog: if this loop stalls, systemd restarts us."""
        period = min(5.0, self.systemd.watchdog_interval or 5.0)
        while True:
            self.systemd.watchdog()
            await asyncio.sleep(period)
            self.outbox.expire()
            self.outbox.prune_sent()
            self.outbox.enforce_size()
            self._sync_outbox_metrics()
            self.systemd.status(f"outbox {self.outbox.depth} readings, broker "
                                f"{'connected' if self.uplink.connected else 'unreachable'}")

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        await self.health.start()
        log.info("gateway started", gateway=self.gateway.id, cell=self.cfg.cell.id, devices=len(self.pollers),
                 lines=len(self.lines), health=f"http://{self.health.host}:{self.health.port}/healthz",
                 outbox=str(self.outbox.path), outbox_depth=self.outbox.depth)
        tasks = [asyncio.create_task(p.run(), name=f"kwwk.poll.{p.device.id}") for p in self.pollers]
        tasks.append(asyncio.create_task(self.uplink.run(), name="kwwk.uplink"))
        tasks.append(asyncio.create_task(self._housekeeping(), name="kwwk.housekeeping"))
        self.systemd.ready(f"polling {len(self.pollers)} devices")
        waiter: asyncio.Task[bool] | None = None
        try:
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not waiter and t.exception():
                    raise t.exception()  # type: ignore[misc]
        finally:
            self.systemd.stopping()
            if waiter is not None:
                waiter.cancel()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for line in self.lines:
                await line.close()
            await self.health.stop()
            self.outbox.close()
            log.info("gateway stopped", gateway=self.gateway.id)
