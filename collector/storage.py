"""Write line protocol to InfluxDB: the v1 /write API (InfluxDB 1.x, 3.x) or the v2 API through
influxdb-client (InfluxDB 2.x, 3.x). Reads are InfluxQL everywhere (see collector/query.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

__all__ = ["InfluxSettings", "StorageError", "Writer", "make_writer"]


class StorageError(RuntimeError):
    """The database did not accept a batch; `retryable` says whether trying again can help."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class InfluxSettings:
    url: str = "http://127.0.0.1:8086"
    api: Literal["v1", "v2"] = "v1"
    database: str = "kwwk"  # v1 database (or the DBRP-mapped bucket name on 2.x)
    username: str | None = None
    password: str | None = None
    org: str = "kwwk"  # v2
    bucket: str = "kwwk"  # v2
    token: str | None = None  # v2
    timeout_s: float = 10.0

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """The v1 user and password for HTTP basic auth, None without a user."""
        return (self.username, self.password or "") if self.username else None


class Writer(Protocol):
    def write(self, lines: str) -> None: ...
    def close(self) -> None: ...


class V1Writer:
    def __init__(self, s: InfluxSettings) -> None:
        self.s = s
        self._http = httpx.Client(base_url=s.url, timeout=s.timeout_s, auth=s.basic_auth)

    def write(self, lines: str) -> None:
        try:
            r = self._http.post("/write", params={"db": self.s.database, "precision": "ms"}, content=lines.encode())
        except httpx.HTTPError as err:
            raise StorageError(f"InfluxDB at {self.s.url} unreachable: {err}", retryable=True) from err
        if r.status_code == 204:
            return
        retryable = r.status_code >= 500 or r.status_code in (408, 429)
        raise StorageError(f"InfluxDB /write answered {r.status_code}: {r.text[:300]}", retryable=retryable)

    def close(self) -> None:
        self._http.close()


class V2Writer:
    def __init__(self, s: InfluxSettings) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.s = s
        self._client = InfluxDBClient(url=s.url, token=s.token or "", org=s.org, timeout=int(s.timeout_s * 1000))
        self._api = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, lines: str) -> None:
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._api.write(bucket=self.s.bucket, org=self.s.org, record=lines, write_precision="ms")
        except ApiException as err:
            retryable = err.status is None or err.status >= 500 or err.status in (408, 429)
            raise StorageError(f"InfluxDB v2 write answered {err.status}: {err.body!s:.300}", retryable) from err
        except (HTTPError, OSError) as err:
            raise StorageError(f"InfluxDB at {self.s.url} unreachable: {err}", retryable=True) from err

    def close(self) -> None:
        self._client.close()


def make_writer(s: InfluxSettings) -> Writer:
    return V2Writer(s) if s.api == "v2" else V1Writer(s)
