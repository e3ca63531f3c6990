"""InfluxQL over the v1 /query endpoint, which InfluxDB 1.x, 2.x (DBRP) and 3.x all serve.

One way to build a request and read its answer, with two faces: `InfluxQL` for the API and the balance
(asyncio), `BlockingInfluxQL` for the collector's audit thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from collector.storage import InfluxSettings

__all__ = ["BlockingInfluxQL", "InfluxQL", "QueryError", "Series", "ident", "literal"]


class QueryError(RuntimeError):
    pass


def ident(name: str) -> str:
    """A quoted InfluxQL identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal(value: str) -> str:
    """A quoted InfluxQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Series:
    name: str
    tags: dict[str, str]
    columns: list[str]
    values: list[list[Any]]


def _client_options(s: InfluxSettings) -> dict[str, Any]:
    headers = {"Authorization": f"Token {s.token}"} if s.token else {}
    return {"base_url": s.url, "timeout": s.timeout_s, "auth": s.basic_auth, "headers": headers}


def _form(s: InfluxSettings, statements: tuple[str, ...]) -> dict[str, str]:
    return {"db": s.database, "q": ";".join(statements), "epoch": "ms"}


def _unreachable(err: Exception) -> QueryError:
    return QueryError(f"database unreachable: {err}")


def _results(r: httpx.Response) -> list[list[Series]]:
    """One list of series per statement; QueryError for an error status, an unreadable body or a failed statement."""
    if r.status_code != 200:
        msg = f"database answered {r.status_code}: {r.text[:200]}"
        raise QueryError(msg)
    try:
        body = r.json()
    except ValueError as err:
        msg = f"database answered something other than JSON: {r.text[:200]}"
        raise QueryError(msg) from err
    out: list[list[Series]] = []
    for result in body.get("results", []):
        if "error" in result:
            msg = f"query failed: {result['error']}"
            raise QueryError(msg)
        out.append([Series(s["name"], s.get("tags") or {}, s["columns"], s["values"]) for s in result.get("series", [])])
    return out


class InfluxQL:
    def __init__(self, s: InfluxSettings) -> None:
        self.s = s
        self._http = httpx.AsyncClient(**_client_options(s))

    async def ping(self) -> bool:
        try:
            r = await self._http.get("/ping")
        except httpx.HTTPError:
            return False
        return r.status_code in (200, 204)

    async def query(self, *statements: str) -> list[list[Series]]:
        """Run statements in one request; one list of series per statement."""
        if not statements:
            return []
        try:
            r = await self._http.post("/query", data=_form(self.s, statements))
        except httpx.HTTPError as err:
            raise _unreachable(err) from err
        return _results(r)

    async def close(self) -> None:
        await self._http.aclose()


class BlockingInfluxQL:
    """The same client for a thread of its own: every call blocks."""

    def __init__(self, s: InfluxSettings) -> None:
        self.s = s
        self._http = httpx.Client(**_client_options(s))

    def query(self, *statements: str) -> list[list[Series]]:
        """Run statements in one request; one list of series per statement."""
        if not statements:
            return []
        try:
            r = self._http.post("/query", data=_form(self.s, statements))
        except httpx.HTTPError as err:
            raise _unreachable(err) from err
        return _results(r)

    def close(self) -> None:
        self._http.close()
