"""Poll devices on their own schedules; a slow or dead device never delays devices on other lines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from edge.cell import CellConfig, Device, Gateway
from edge.modbus import DeviceReader, LineRegistry, ModbusLine
from edge.profile import Point
from edge.ratelimit import summarised
from edge.telemetry import Reading
from gateway.metrics import GatewayMetrics

__all__ = ["DevicePoller", "build_pollers"]

log = structlog.get_logger("kwwk.gateway.poller")


@dataclass
class DevicePoller:
    device: Device
    reader: DeviceReader
    points: list[Point]
    interval: float
    sink: Callable[[list[Reading]], Awaitable[None]]  # returns once the outbox has them
    metrics: GatewayMetrics
    last_ok: float | None = None
    last_error: str | None = None

    async def run(self) -> None:
        """Poll at start + k·interval (no drift); a poll that overruns skips the slots it missed."""
        start = time.monotonic()
        k = 0
        while True:
            due = start + k * self.interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.metrics.poll_lateness.labels(self.device.id).observe(max(0.0, -delay))
            await self.poll_once()
            k_next = int((time.monotonic() - start) // self.interval) + 1
            if k_next > k + 1:
                self.metrics.polls_skipped.labels(self.device.id).inc(k_next - k - 1)
            k = max(k + 1, k_next)

    async def poll_once(self) -> list[Reading]:
        ts = int(time.time() * 1000)
        t0 = time.perf_counter()
        result = await self.reader.read(self.points)
        self.metrics.poll_duration.labels(self.device.id).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(self.device.id).inc(result.requests)
        readings: list[Reading] = []
        for p in self.points:
            if p.name in result.errors or not p.numeric:
                continue
            value = result.values.get(p.name)
            if isinstance(value, str):
                continue
            readings.append(Reading(self.device.id, p.name, ts, float(value) if value is not None else None,
                                    "good" if value is not None else "bad"))
        if result.errors:
            reasons = {e.reason for e in result.errors.values()}
            for reason in reasons:
                self.metrics.read_errors.labels(self.device.id, reason).inc()
            first = next(iter(result.errors.values()))
            self.last_error = str(first)
            self.metrics.reads.labels(self.device.id, "failed" if not readings else "partial").inc()
            summarised(log, "device read failed", (self.device.id, *sorted(reasons)),  # not a line per poll
                       device=self.device.id, points=len(result.errors), reason=sorted(reasons), error=str(first))
        else:
            self.last_error = None
            self.metrics.reads.labels(self.device.id, "ok").inc()
        if readings:
            self.last_ok = time.time()
            await self.sink(readings)
        return readings


def build_pollers(cfg: CellConfig, gateway: Gateway, sink: Callable[[list[Reading]], Awaitable[None]],
                  metrics: GatewayMetrics) -> tuple[list[DevicePoller], list[ModbusLine]]:
    """One poller per device; devices on the same physical line share one ModbusLine (one request in flight)."""
    lines = LineRegistry()  # also refuses one serial port configured twice with different settings
    pollers = []
    for dev in gateway.devices:
        spec, unit = cfg.line_spec(gateway, dev)
        reader = DeviceReader(lines.get(spec), cfg.profiles[dev.id], unit)
        interval = dev.poll_interval or gateway.poll_interval
        pollers.append(DevicePoller(dev, reader, cfg.published_points(dev), interval, sink, metrics))
    return pollers, list(lines)
