"""The collector process: ingest, plus /healthz and /metrics."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import structlog

from collector.audit import with_audit
from collector.balance.trigger import DirtyRanges, run_balance_loop
from collector.balance.wiring import InfluxEngine
from collector.ingest import CollectorSettings, Ingest
from collector.registry import Registry
from collector.storage import InfluxSettings, make_writer
from edge.obs import HealthServer

__all__ = ["run_collector"]

log = structlog.get_logger("kwwk.collector")


async def run_collector(settings: CollectorSettings, influx: InfluxSettings, registry: Registry,
                        health_host: str = "127.0.0.1", health_port: int = 0,
                        stop: asyncio.Event | None = None, balance_interval_s: float = 30.0) -> None:
    stop = stop or asyncio.Event()
    dirty = DirtyRanges()  # what was stored since the last balance round, late data included
    ingest = Ingest(settings, registry, make_writer(influx), auditor_influx=influx, on_stored=dirty.note)
    if ingest.auditor is not None:  # what the audit reads of each stream bounds what the encoder takes as plausible
        ingest.auditor.on_streams = ingest.writer.encoder.learn

    async def check_health() -> dict[str, Any]:
        result = ingest.health()
        if inspect.isawaitable(result):
            result = await result
        return with_audit(result, ingest.auditor)  # a dead or stuck audit: 503

    balance = InfluxEngine(registry.cells, influx)
    balance_task = asyncio.create_task(run_balance_loop(balance.engine, dirty, stop, interval_s=balance_interval_s),
                                       name="kwwk.balance")
    health = HealthServer(ingest.metrics.registry, check_health, health_host, health_port)
    await health.start()
    ingest.start()
    log.info("collector started", client_id=ingest.mqtt.client_id, influx=influx.url, api=influx.api,
             cells=sorted(registry.cells), health=f"http://{health_host}:{health.port}/healthz")
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(ingest.stop)
        stop.set()
        await asyncio.gather(balance_task, return_exceptions=True)
        await balance.close()
        await health.stop()
        log.info("collector stopped")
