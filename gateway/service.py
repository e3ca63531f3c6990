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
                             max_bytes=int(spec.max_mb * 2**20), overflow=spec.overflow,
                             write_window_s=spec.write_window_s, sync_interval_s=spec.sync_interval_s,
                             keep_sent_s=spec.keep_sent_s, archive_bytes=int(spec.archive_mb * 2**20),
                             chunk_readings=spec.batch_readings)
        self.uplink = Uplink(cfg.cell.id, self.gateway.id, self.outbox, broker, self.metrics,
                             batch_size=spec.batch_readings)
        self.pollers, self.lines = build_pollers(cfg, self.gateway, self._store, self.metrics)
        self.health = HealthServer(self.metrics.registry, self.healthz, health_host, health_port)
        self._seen: dict[tuple[str, ...], int] = {}  # outbox totals already counted in /metrics
        self.systemd = Systemd()
        self.started = time.time()

    async def _store(self, readings: list[Reading]) -> None:
        stored = await self.outbox.append(readings)
        for r in readings[:stored]:
            self.metrics.readings.labels(r.quality).inc()
        self._sync_outbox_metrics(full=False)
        self.uplink.wakeup.set()

    def _sync_outbox_metrics(self, full: bool = True) -> None:
        """Outbox counters into /metrics (as deltas: they are counters); sizes only when `full` (a stat each)."""
        ob = self.outbox
        for reason, n in ob.dropped.items():
            self._inc(self.metrics.outbox_dropped.labels(reason), ("dropped", reason), n)
        self.metrics.outbox_depth.set(ob.depth)
        if not full:
            return
        self._inc(self.metrics.outbox_commits, ("commits",), ob.stats.commits)
        self._inc(self.metrics.outbox_errors, ("errors",), ob.errors)
        for why, n in ob.stats.committed.items():
            self._inc(self.metrics.outbox_committed.labels(why), ("committed", why), n)
        self.metrics.outbox_in_ram.set(ob.in_ram)
        self.metrics.outbox_disk_bytes.set(ob.disk_bytes())
        self.metrics.outbox_archive.set(len(ob.archive))
        self.metrics.outbox_archive_bytes.set(ob.archive.bytes)
        oldest = ob.oldest_ts()
        self.metrics.outbox_oldest_age.set(max(0.0, time.time() - oldest / 1000) if oldest else 0)

    def _inc(self, counter: Any, key: tuple[str, ...], total: int) -> None:
        new = total - self._seen.get(key, 0)
        if new > 0:
            counter.inc(new)
            self._seen[key] = total

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
                "outbox_depth": self.outbox.depth, "outbox_in_ram": self.outbox.in_ram,
                "outbox_disk_errors": self.outbox.errors,
                "outbox_dropped": dict(self.outbox.dropped), "devices": devices}

    async def _housekeeping(self) -> None:
        """Refresh gauges and pet systemd's watchdog: if the event loop stalls, systemd restarts us."""
        period = min(5.0, self.systemd.watchdog_interval or 5.0)
        while True:
            self.systemd.watchdog()
            await asyncio.sleep(period)
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
        tasks.append(asyncio.create_task(self.outbox.run(), name="kwwk.outbox"))
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
            await self.outbox.close()
            log.info("gateway stopped", gateway=self.gateway.id)
