"""InfluxQL over the v1 /query endpoint, which InfluxDB 1.x, 2.x (DBRP) and 3.x all serve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from collector.storage import InfluxSettings

__all__ = ["InfluxQL", "QueryError", "Series", "ident", "literal"]


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

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=False)) for row in self.values]


class InfluxQL:
    def __init__(self, s: InfluxSettings) -> None:
        self.s = s
        headers = {"Authorization": f"Token {s.token}"} if s.token else {}
        auth = (s.username, s.password or "") if s.username else None
        self._http = httpx.AsyncClient(base_url=s.url, timeout=s.timeout_s, auth=auth, headers=headers)

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
            r = await self._http.post("/query", data={"db": self.s.database, "q": ";".join(statements), "epoch": "ms"})
        except httpx.HTTPError as err:
            msg = f"database unreachable: {err}"
            raise QueryError(msg) from err
        if r.status_code != 200:
            msg = f"database answered {r.status_code}: {r.text[:200]}"
            raise QueryError(msg)
        body = r.json()
        out: list[list[Series]] = []
        for result in body.get("results", []):
            if "error" in result:
                msg = f"query failed: {result['error']}"
                raise QueryError(msg)
            out.append([Series(s["name"], s.get("tags") or {}, s["columns"], s["values"]) for s in result.get("series", [])])
        return out

    async def close(self) -> None:
        await self._http.aclose()
