"""What a client sees when something fails: a short JSON message and a request id, never a stack trace.
The trace goes to the log under the same request id.

    install_error_handling(app)
"""

from __future__ import annotations

import json
import secrets
import traceback

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from collector.query import QueryError
from collector.registry import Registry
from edge.cell import CellConfig

__all__ = ["install_error_handling", "known_cell"]

log = structlog.get_logger("kwwk.api")


class _CatchAll:
    """Outermost guard: any exception escaping a route becomes a 500 with a request id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:  # noqa: BLE001 - the point of this guard
            rid = secrets.token_hex(6)
            # the trace as text, without local variables: those would put request headers (tokens) in the log
            log.error("unhandled error in the API", request_id=rid, path=scope.get("path"), method=scope.get("method"),
                      error=repr(err)[:500], traceback=traceback.format_exc(limit=20))
            if started:
                return  # the client sees a cut-off response, nothing more
            body = json.dumps({"detail": "internal error; the operators can find it in the log by its request id",
                               "request_id": rid}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def known_cell(registry: Registry, cell: str) -> CellConfig:
    """The cell's config, or a 404 that lists the cells there are."""
    try:
        return registry.cell(cell)
    except LookupError as err:
        raise HTTPException(404, str(err)) from None


def install_error_handling(app: FastAPI) -> None:
    @app.exception_handler(QueryError)
    async def db_error(request: Request, err: QueryError) -> JSONResponse:
        rid = secrets.token_hex(6)
        log.warning("database query failed", request_id=rid, path=request.url.path, error=str(err)[:500])
        return JSONResponse({"detail": "the database is not available; try again later", "request_id": rid},
                            status_code=503, headers={"Retry-After": "10"})

    app.add_middleware(_CatchAll)
