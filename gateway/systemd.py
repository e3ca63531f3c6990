"""systemd readiness and watchdog (the sd_notify protocol); silent when not started by systemd.

Written out rather than taken from the `sdnotify` package, which sends on a blocking socket: a
notify socket whose reader is slow would then stall the gateway's event loop.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Systemd"]


class Systemd:
    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr  # "@" names an abstract socket
        usec = os.environ.get("WATCHDOG_USEC", "")
        #: how often to pet the watchdog: half its timeout, as sd_watchdog_enabled(3) advises
        self.watchdog_interval: float | None = int(usec) / 2e6 if usec.isdigit() else None

    def _notify(self, message: str) -> None:
        if not self._addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            try:
                s.sendto(message.encode(), self._addr)
            except OSError:
                pass  # systemd gone or its queue full: the next ping will try again

    def ready(self, status: str) -> None:
        self._notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self._notify("WATCHDOG=1")

    def stopping(self) -> None:
        self._notify("STOPPING=1")
