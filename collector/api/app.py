"""The API application: wires the operator endpoints (token required), the public endpoints and the
residents' page, health and metrics.

    app = create_app(registry, ApiSettings(influx, tokens_file=Path("var/api-tokens")))

| who | what |
|---|---|
| anyone | `/` (the residents' page), `/api/public/…` (cached, rate-limited aggregates), `/healthz`, `/metrics` |
| operators (`Authorization: Bearer <token>`) | `/api/cells…`, `/api/gateways`, `/api/alliance/balance`, CSV exports |
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from collector.api.auth import operator_auth
from collector.api.balance import make_router as make_balance_router
from collector.api.errors import install_error_handling
from collector.api.export import make_export_router
from collector.api.gateways import make_gateways_router
from collector.api.observe import RequestMetrics
from collector.api.operator import make_operator_router
from collector.api.page import mount_page
from collector.api.public import make_public_router
from collector.api.ratelimit import RateLimiter
from collector.api.status import StatusWatcher
from collector.api.timerange import bounded_times
from collector.api.tokens import TokenStore
from collector.encode import BATCH_MEASUREMENT
from collector.query import InfluxQL, QueryError, ident
from collector.registry import Registry
from collector.storage import InfluxSettings
from edge.mqtt import MqttSettings

__all__ = ["ApiSettings", "create_app"]

log = structlog.get_logger("kwwk.api")

_DESCRIPTION = """Cells, gateways, devices and balances for operators; aggregates for residents.

**Operators** send `Authorization: Bearer <token>`; a token comes from `kwwk api token create --name <you>`
and is stored only as its SHA-256 in the API's tokens file.
**Public** endpoints (`/api/public/…`) need no token: totals only, never a single customer's meter,
cached for a minute and limited per client address.
"""


#: the API's broker connection: a clean session under a random id, so replicas never share state
API_MQTT = MqttSettings(reconnect_min_s=0.5, reconnect_max_s=30.0)


@dataclass(frozen=True)
class ApiSettings:
    influx: InfluxSettings
    #: the broker, for the gateways' retained status (read with the `api` account: kwwk broker acl)
    mqtt: MqttSettings = API_MQTT
    #: the hashed operator tokens (collector/api/tokens.py); None or a missing file: operators cannot log in
    tokens_file: Path | None = None
    #: subscribe to the gateways' retained status (online/offline) while serving
    watch_status: bool = True
    #: public endpoints: requests per second per client address (0: unlimited), and the burst allowed
    public_rate_per_s: float = 2.0
    public_burst: int = 30
    public_cache_s: float = 60.0
    #: seconds since the epoch; tests and benchmarks pin it
    clock: Callable[[], float] = field(default=time.time, compare=False)


def create_app(registry: Registry, settings: ApiSettings) -> FastAPI:
    metrics = CollectorRegistry()
    db = InfluxQL(settings.influx)
    tokens = TokenStore(settings.tokens_file)
    watcher = StatusWatcher(settings.mqtt) if settings.watch_status else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if watcher is not None:
            watcher.start()
        if not tokens.configured:
            log.warning("no operator tokens: operator endpoints refuse every request; create one with "
                        "`kwwk api token create --name <you>`", tokens_file=str(settings.tokens_file))
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()
            await db.close()

    app = FastAPI(title="KWWK Telemetry API", version="1", lifespan=lifespan, description=_DESCRIPTION)
    app.add_middleware(RequestMetrics, registry=metrics)
    install_error_handling(app)

    operator = [Depends(operator_auth(tokens))]
    app.include_router(make_operator_router(registry, db), dependencies=operator)
    app.include_router(make_gateways_router(registry, db, watcher, settings.clock), dependencies=operator)
    app.include_router(make_balance_router(registry, db), dependencies=[*operator, Depends(bounded_times)])
    app.include_router(make_export_router(registry, db), dependencies=operator)
    limiter = RateLimiter(settings.public_rate_per_s, settings.public_burst)
    app.include_router(make_public_router(registry, db, settings.clock, limiter, settings.public_cache_s))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """Broker, database, and the last telemetry of every gateway; 503 when degraded."""
        db_ok = await db.ping()
        broker_ok = await _tcp_ok(settings.mqtt.host, settings.mqtt.port)
        gateways: dict[str, Any] = {}
        if db_ok:
            try:
                (series,) = await db.query(f"SELECT last({ident('seq')}) FROM {ident(BATCH_MEASUREMENT)} "
                                           f"GROUP BY {ident('cell')}, {ident('gateway')}")
                now = time.time() * 1000
                for s in series:
                    ts = s.values[0][0]
                    gateways[f"{s.tags['cell']}/{s.tags['gateway']}"] = {
                        "last_telemetry": ts, "age_s": round((now - ts) / 1000, 1), "last_seq": s.values[0][1]}
            except QueryError:
                db_ok = False
        for cell, gw in sorted(registry.gateways):
            gateways.setdefault(f"{cell}/{gw}", {"last_telemetry": None, "age_s": None, "last_seq": None})
        ok = db_ok and broker_ok
        return JSONResponse({"status": "ok" if ok else "degraded", "database": db_ok, "broker": broker_ok,
                             "gateways": gateways}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    mount_page(app)
    return app


async def _tcp_ok(host: str, port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True
