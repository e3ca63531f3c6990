"""TCP ports for local test and dev servers, without the bind-and-close race.

Picking a port by binding port 0 and closing the socket is a race: the kernel may hand the same
port to the next caller (a fresh clone's test run once gave two simulated endpoints one port). Two
ways that cannot collide:

- `listening_ports(pid)`: a server that can bind port 0 itself (pymodbus, InfluxDB, VictoriaMetrics)
  does so, and we read the port it got back from /proc (Linux-only dev tooling).
- `reserve_port()`: for a server that cannot bind 0 (Mosquitto 2.0: `listener 0` means a Unix
  socket), and for "a port where nothing listens". The port comes from outside the kernel's
  ephemeral range, so no bind(0) and no outgoing connection is ever given it, and it is claimed with
  an exclusive flock on a file per port, held until this process exits. Every process using this
  module skips a locked port, the kernel frees the lock when the process dies (no stale claims), and
  a port something else listens on is skipped too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

__all__ = ["listening_ports", "reserve_port"]

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp
#: ports of `kwwk demo` (documented for users) and everything below: never reserved
_LOWEST = 20000
_held: dict[int, int] = {}  # port -> fd holding its lock, for this process' lifetime


def _ephemeral() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux' default


def _candidates() -> list[int]:
    lo, hi = _ephemeral()
    ports = [p for p in range(_LOWEST, 65536) if not lo <= p <= hi]
    random.shuffle(ports)  # concurrent runs rarely try the same ones first
    return ports


def _lock_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"kwwk-ports-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _nothing_listens(port: int) -> bool:
    """True when no socket listens on the port (a check of one given port, not a way to pick one)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserve_port() -> int:
    """A loopback TCP port that is this process' alone until it exits; see the module docstring."""
    lock_dir = _lock_dir()
    for port in _candidates():
        if port in _held:
            continue
        fd = os.open(lock_dir / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                continue  # another process (or another reservation here) holds it
            raise
        if not _nothing_listens(port):
            os.close(fd)
            continue
        _held[port] = fd
        return port
    msg = "no free port left to reserve"
    raise RuntimeError(msg)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (IPv4 and IPv6), from /proc/net/tcp{,6} and /proc/<pid>/fd."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
