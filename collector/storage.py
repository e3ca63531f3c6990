"""Write line protocol to InfluxDB: the v1 /write API (InfluxDB 1.x, 3.x) or the v2 API through
influxdb-client (InfluxDB 2.x, 3.x). Reads are InfluxQL everywhere (see collector/query.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

__all__ = ["DATA_REFUSED", "DatabaseState", "InfluxSettings", "StorageError", "Writer", "classify", "make_writer"]


#: what the last write said about the database: "ok", or why nothing can be stored at the moment
DatabaseState = Literal["ok", "auth_failed", "forbidden", "database_missing", "unreachable", "server_error"]
#: a refusal of the data itself (a field-type conflict, unparsable or too large a body): dead-letter it
DATA_REFUSED = "data_refused"


class StorageError(RuntimeError):
    """The database did not accept a batch.

    `kind` says why: DATA_REFUSED when the refusal is about the data itself (retrying the same lines cannot
    help: dead-letter them), else a DatabaseState naming what an operator has to fix or wait for (retry:
    the data is fine). `retryable` is `kind != DATA_REFUSED`.
    """

    def __init__(self, message: str, retryable: bool | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind or ("server_error" if retryable or retryable is None else DATA_REFUSED)
        self.retryable = self.kind != DATA_REFUSED


#: refusals with 400/422 that are about the server's configuration or limits, not the lines: retry them
_NOT_ABOUT_DATA = ("database is required", "database not found", "bucket not found", "retention policy not found",
                   "max-series-per-database limit", "max-values-per-tag limit", "cache maximum memory size exceeded")


def classify(status: int | None, body: str) -> str:
    """DATA_REFUSED or the DatabaseState for a write answered with HTTP `status` (None: no answer).

    What the servers answer (InfluxDB 1.6 checked against a real influxd, see tests/test_database_errors.py):
    401 wrong or missing credentials, 403 a user without write privilege, 404 "database not found" (1.x) or
    "bucket not found" (2.x), 400 "partial write: field type conflict" / "unable to parse" (1.x, 3.x),
    422 for the same on 2.x, 413 a body over max-body-size. VictoriaMetrics 1.79 answers 204 even to a line it
    cannot parse (it logs and skips it), so it never refuses data. Only 400, 413 and 422 whose text is not
    about configuration or limits are refusals of the data; everything else keeps the messages for a retry.
    """
    text = body.lower()
    if status is None:
        return "unreachable"
    if status in (400, 413, 422) and not any(phrase in text for phrase in _NOT_ABOUT_DATA):
        return DATA_REFUSED
    if status == 401:
        return "auth_failed"
    if status == 403:
        return "forbidden"
    if status == 404 or "not found" in text:
        return "database_missing"
    return "server_error"  # 5xx, 408, 429, a limit, an unexpected answer: not the data's fault


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
        """The v1 user and password for HTTP basic auth, None without a user.

        Without a username, a v1 `token` of the form "user:password" is those credentials (the form InfluxDB
        1.8+ takes as `Authorization: Token user:password`), so `--influx-token` / KWWK_INFLUX_TOKEN carries
        them for both APIs and a rotated credential is changed in one place."""
        if self.username:
            return (self.username, self.password or "")
        if self.api == "v1" and self.token and ":" in self.token:
            user, _, password = self.token.partition(":")
            return (user, password)
        return None


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
            raise StorageError(f"InfluxDB at {self.s.url} unreachable: {err}", kind="unreachable") from err
        if r.status_code == 204:
            return
        raise StorageError(f"InfluxDB /write answered {r.status_code}: {r.text[:300]}",
                           kind=classify(r.status_code, r.text))

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
            body = err.body.decode(errors="replace") if isinstance(err.body, bytes) else str(err.body or "")
            raise StorageError(f"InfluxDB v2 write answered {err.status}: {body:.300}",
                               kind=classify(err.status or None, body)) from err
        except (HTTPError, OSError) as err:
            raise StorageError(f"InfluxDB at {self.s.url} unreachable: {err}", kind="unreachable") from err

    def close(self) -> None:
        self._client.close()


def make_writer(s: InfluxSettings) -> Writer:
    return V2Writer(s) if s.api == "v2" else V1Writer(s)
