"""Test helpers that talk to the real servers: an MQTT recorder, waiting on a condition, InfluxDB row reads,
an ASGI app served over real HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import paho.mqtt.client as mqtt
import pytest
import uvicorn
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.telemetry import Reading
from gateway.service import GatewayService
from kwwk.dev.localservers import InfluxDB1


def wire_readings(message: dict[str, Any]) -> list[Reading]:
    """The readings of a telemetry message as published (null values are the unreadable ones)."""
    return [Reading(p["device"], point, p["ts"], v, "good" if v is not None else "bad")
            for p in message["polls"] for point, v in p["values"].items()]


class Recorder:
    """Subscribes (persistent session, so a broker restart loses nothing) and keeps every message."""

    def __init__(self, port: int, topic: str = "kwwk/v1/+/+/telemetry", client_id: str = "test-recorder",
                 username: str | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.raw: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.raw.append((msg.topic, bytes(msg.payload)))
            try:
                self.messages.append(json.loads(msg.payload))
            except ValueError:
                pass

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RecordingGateway(GatewayService):
    """The real gateway, also remembering every reading it stored in its outbox."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.produced: list[Reading] = []

    async def _store(self, readings: list[Reading]) -> None:
        self.produced.extend(readings)
        await super()._store(readings)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str],
               interval: float = 0.05) -> Any:
    """Call predicate until it returns something truthy and return that; fail naming `what` after timeout s
    (a callable `what` is asked at that moment, to say what was last seen).

    For plain (non-async) tests; async tests use `wait_for`, which lets the event loop run meanwhile."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what() if callable(what) else what}; last: {last!r}")
        time.sleep(interval)


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Await predicate (plain or async) until truthy and return that; fail naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def rows(influx: InfluxDB1, measurement: str, where: str = "") -> list[dict[str, Any]]:
    """Every stored row of a measurement (time in ms), as dicts, tags included."""
    res = influx.query(f'SELECT * FROM "{measurement}" {where}')
    series = res["results"][0].get("series", [])
    out: list[dict[str, Any]] = []
    for s in series:
        out.extend(dict(zip(s["columns"], v, strict=True)) for v in s["values"])
    return out


class LiveServer:
    """An ASGI app under uvicorn in a thread of its own, on a port the system picks (port 0) and reports."""

    def __init__(self, app: object) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,  # type: ignore[arg-type]
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="live-app", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 15, "uvicorn to start")
        if not self.server.started:
            msg = "the app's server thread died while starting"
            raise RuntimeError(msg)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
