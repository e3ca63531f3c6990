"""Real Mosquitto, InfluxDB 1.x and VictoriaMetrics from the system packages, run in a folder of our own.

Used by `kwwk demo` and by the integration tests: each server gets its own config, data folder and
loopback port, and is stopped (and its folder kept for inspection) afterwards. Without a port
given, a server that can bind port 0 does so and `port` is read back from the running process; one
that cannot (Mosquitto) gets a reserved port (edge.sim.ports explains why neither can collide). A
restart reuses the port the first start got.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from edge.sim.ports import listening_ports, reserve_port

__all__ = ["InfluxDB1", "LocalServer", "Mosquitto", "ServerMissing", "VictoriaMetrics"]


class ServerMissing(RuntimeError):
    """The server's program is not installed; the message says which package to install."""


def _find(program: str, package: str, extra_dirs: tuple[str, ...] = ("/usr/sbin", "/usr/bin")) -> str:
    found = shutil.which(program) or next((f"{d}/{program}" for d in extra_dirs if Path(f"{d}/{program}").exists()), None)
    if not found:
        msg = f"{program} not found: install the Debian package '{package}' (make setup does this)"
        raise ServerMissing(msg)
    return found


class LocalServer:
    name = "server"
    #: False for a server that cannot bind port 0: it gets a reserved port instead
    binds_port_zero = True

    def __init__(self, workdir: Path | str, port: int | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        #: 0 until a server that binds port 0 has started; then the port it got, kept for restarts
        self.port = port or (0 if self.binds_port_zero else reserve_port())
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> LocalServer:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,  # noqa: S603
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n{self._tail()}"
                raise RuntimeError(msg)
            if (self.port or self._learn_ports()) and self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        msg = f"{self.name} did not become ready on port {self.port} in {timeout:.0f}s; see {self.log_path}"
        raise RuntimeError(msg)

    def _learn_ports(self) -> bool:
        """Read back the port(s) a server started on port 0 got; False while it has not bound them yet.

        A restart then asks for the same port explicitly. Between a stop and that restart the port is
        free, and the kernel could hand it to another process' bind(0) in that moment; with ~28k
        ephemeral ports handed out in turn that is rare enough not to handle beyond the clear
        start-up error (the log shows "address already in use")."""
        assert self.proc is not None
        ports = listening_ports(self.proc.pid)
        if not ports:
            return False
        self.port = min(ports)
        return True

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback only
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


class Mosquitto(LocalServer):
    """Mosquitto run from the shipped production config (firmware_configs/mosquitto/mosquitto.conf), so
    the demo and the tests exercise its persistence and queue settings. Paths and the listener are
    made local; `extra` adds lines (TLS listeners, password and ACL files)."""

    name = "mosquitto"
    binds_port_zero = False  # Mosquitto 2.0: `listener 0` means a Unix socket, and TCP port 0 is refused
    SHIPPED = Path(__file__).resolve().parents[2] / "firmware_configs" / "mosquitto" / "mosquitto.conf"
    #: production lines that name files of the deployment, or its listeners
    _LOCAL = ("persistence_location", "password_file", "acl_file", "cafile", "certfile", "keyfile", "listener",
              "allow_anonymous", "autosave_interval")

    def __init__(self, workdir: Path | str, port: int | None = None, extra: str = "", anonymous: bool = True) -> None:
        super().__init__(workdir, port)
        self.extra = extra
        self.anonymous = anonymous

    def config(self) -> str:
        user = pwd.getpwuid(os.getuid()).pw_name
        shipped = [line for line in self.SHIPPED.read_text().splitlines()
                   if line.strip() and not line.startswith("#") and line.split()[0] not in self._LOCAL]
        return "\n".join([
            f"user {user}",
            *shipped,
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            f"listener {self.port} 127.0.0.1",
            self.extra,
            "",
        ])

    def command(self) -> list[str]:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config())
        return [_find("mosquitto", "mosquitto"), "-c", str(conf)]

    def ready(self) -> bool:
        return _port_open(self.port)


class InfluxDB1(LocalServer):
    """InfluxDB 1.x (Debian's influxdb): /write and /query with InfluxQL.

    With `auth=(user, password)` it runs with `[http] auth-enabled = true` and that user as its admin (created
    on start when missing); `query` then authenticates as it. `auth` may be changed between a stop and a
    start: a server restarted with auth on keeps its data."""

    name = "influxd"

    def __init__(self, workdir: Path | str, port: int | None = None, database: str = "kwwk",
                 auth: tuple[str, str] | None = None) -> None:
        super().__init__(workdir, port)
        self.rpc_port = 0  # the backup/restore RPC service: bound to port 0, nobody connects to it
        self.database = database
        self.auth = auth

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = self.dir / "influxdb.conf"
        conf.write_text(f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{self.dir}/meta"
[data]
  dir = "{self.dir}/data"
  wal-dir = "{self.dir}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  max-body-size = 0
  auth-enabled = {"true" if self.auth else "false"}
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
""")
        return [_find("influxd", "influxdb"), "run", "-config", str(conf)]

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/ping")

    def _learn_ports(self) -> bool:
        """influxd listens twice (HTTP and RPC) once started: HTTP is the one that answers /ping."""
        assert self.proc is not None
        ports = listening_ports(self.proc.pid)
        http = [p for p in sorted(ports) if len(ports) >= 2 and _http_ok(f"http://127.0.0.1:{p}/ping")]
        if not http:
            return False
        self.port = http[0]
        return True

    def start(self, timeout: float = 30.0) -> InfluxDB1:
        super().start(timeout)
        if self.auth:  # the first admin user is created unauthenticated; once there, even CREATE USER needs it
            user, password = self.auth
            create = f"CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES"
            try:
                self.query(create, method="POST", authenticate=False)
            except urllib.error.HTTPError as err:
                if err.code not in (401, 403):
                    raise
                self.query(create, method="POST")
        self.query(f'CREATE DATABASE "{self.database}"', method="POST")
        return self

    def query(self, q: str, method: str = "GET", epoch: str = "ms", authenticate: bool = True) -> dict[str, object]:
        import base64
        import json

        params = urllib.parse.urlencode({"q": q, "db": self.database, "epoch": epoch})
        if method == "GET":
            req = urllib.request.Request(f"{self.url}/query?{params}")
        else:
            req = urllib.request.Request(f"{self.url}/query", data=params.encode(), method="POST")
        if self.auth and authenticate:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(self.auth).encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback only
            return json.loads(r.read())


class VictoriaMetrics(LocalServer):
    """VictoriaMetrics: a real server that accepts InfluxDB's /api/v2/write (for the v2 write path)."""

    name = "victoria-metrics"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [_find("victoria-metrics", "victoria-metrics"), f"-storageDataPath={self.dir}/data",
                f"-httpListenAddr=127.0.0.1:{self.port}", "-search.latencyOffset=0s", "-loggerLevel=ERROR"]

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/health")
