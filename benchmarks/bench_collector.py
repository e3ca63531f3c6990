"""Collector figures, in one run: the database's direct-write ceiling, the collector's sustained end-to-end rate
(gateway-format MQTT -> InfluxDB), their ratio, and p50/p99 latency from a reading's timestamp to it being stored.

Real Mosquitto and InfluxDB 1.x on loopback; about a minute.
    .venv/bin/python benchmarks/bench_collector.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.ingest import CollectorSettings, Ingest  # noqa: E402
from collector.lineprotocol import encode  # noqa: E402
from collector.registry import Registry  # noqa: E402
from collector.storage import InfluxSettings, V1Writer  # noqa: E402
from edge.cell import CellConfig  # noqa: E402
from edge.profile import get_profile  # noqa: E402
from edge.telemetry import Reading, TelemetryBatch, telemetry_topic  # noqa: E402
from kwwk.localservers import InfluxDB1, Mosquitto  # noqa: E402

GATEWAYS, DEVICES = 10, 10
POINTS = [p.name for p in get_profile("eastron_sdm630").points if p.publish]
READINGS_PER_MESSAGE = 520  # 40 device polls of 13 points: what a gateway sends in one batch
TOTAL_READINGS = 600_000


def _cell() -> CellConfig:
    return CellConfig.model_validate({
        "cell": {"id": "benchcell", "name": "Bench"},
        "gateways": [{"id": f"gw-{g}", "devices": [
            {"id": f"m{g}-{d}", "profile": "eastron_sdm630", "connection": {"host": "127.0.0.1", "port": 1502}}
            for d in range(DEVICES)]} for g in range(GATEWAYS)]})


def _messages(t0: int, count: int, first: int = 0) -> list[tuple[str, bytes, int]]:
    """(topic, payload, readings) in gateway format: message m comes from gateway m % GATEWAYS, which numbers
    its own messages."""
    out = []
    per_msg_polls = READINGS_PER_MESSAGE // len(POINTS)
    for m in range(first, first + count):
        g = m % GATEWAYS
        readings = []
        for k in range(per_msg_polls):
            ts = t0 - ((m - first) * per_msg_polls + k) * 7  # unique per device, never in the future
            dev = f"m{g}-{k % DEVICES}"
            readings += [Reading.model_construct(device=dev, point=p, ts=ts, value=float(k + i), quality="good")
                         for i, p in enumerate(POINTS)]
        batch = TelemetryBatch.model_construct(schema_="kwwk.telemetry/1", cell="benchcell", gateway=f"gw-{g}",
                                               stream="bench", seq=m // GATEWAYS, sent=t0, replay=False,
                                               readings=readings)
        out.append((telemetry_topic("benchcell", f"gw-{g}"), batch.to_json(), len(readings)))
    return out


def ceiling(influx: InfluxDB1) -> float:
    """Readings/s when prebuilt line protocol of the same shape is posted straight to /write (5,000 lines a batch)."""
    t0 = 1_600_000_000_000
    rows = [("electricity_meter", (("cell", "ceiling"), ("device", f"m{i % 100}"), ("gateway", "gw")), t0 + i * 7,
             {p: float(i + j) for j, p in enumerate(POINTS)}) for i in range(TOTAL_READINGS // len(POINTS))]
    bodies = [encode(rows[i:i + 5000]).encode() for i in range(0, len(rows), 5000)]
    with httpx.Client(timeout=60) as http:
        start = time.perf_counter()
        for body in bodies:
            http.post(f"{influx.url}/write", params={"db": influx.database, "precision": "ms"}, content=body)
        took = time.perf_counter() - start
    return len(rows) * len(POINTS) / took


class _LatencyWriter(V1Writer):
    """The real v1 writer, noting when each batch was accepted (InfluxDB 1.x serves a write once it is accepted)."""

    def __init__(self, s: InfluxSettings) -> None:
        super().__init__(s)
        self.lags: list[float] = []

    def write(self, lines: str) -> None:
        super().write(lines)
        now = time.time() * 1000
        for line in lines.splitlines():
            if line.startswith("electricity_meter"):
                self.lags.append(now - int(line.rsplit(" ", 1)[1]))


def _publish(port: int, messages: list[tuple[str, bytes, int]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{id(messages)}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload, _n in messages]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def end_to_end(mosquitto: Mosquitto, influx: InfluxDB1, rate: float | None, total: int) -> tuple[float, list[float]]:
    """Readings/s through the real collector (Ingest): flat out when rate is None, else paced like a live fleet."""
    writer = _LatencyWriter(InfluxSettings(url=influx.url, database=influx.database))
    ingest = Ingest(CollectorSettings(mqtt_port=mosquitto.port, client_id=f"bench-collector-{rate}",
                                      batch_points=5000, flush_interval_s=0.2, receive_maximum=1000),
                    Registry({"benchcell": _cell()}), writer)
    ingest.start()
    while not ingest.connected:
        time.sleep(0.05)
    time.sleep(0.5)
    count = total // READINGS_PER_MESSAGE
    start = time.perf_counter()
    if rate is None:
        msgs = _messages(1_650_000_000_000, count)
        start = time.perf_counter()
        threads = [threading.Thread(target=_publish, args=(mosquitto.port, msgs[i::4])) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        _live_publisher(mosquitto.port, rate, count).join()
    want = count * (READINGS_PER_MESSAGE // len(POINTS) * len(POINTS))
    while ingest.stored_readings < want and time.perf_counter() - start < 300:
        time.sleep(0.05)
    took = time.perf_counter() - start
    ingest.stop()
    return ingest.stored_readings / took, writer.lags


def _live_publisher(port: int, rate: float, count: int) -> threading.Thread:
    """Publish `count` messages at `rate` readings/s, each stamped when it is built (a live gateway fleet)."""

    def run() -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-live", protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", port)
        client.loop_start()
        begin = time.time()
        infos = []
        for m in range(count):
            due = begin + m * READINGS_PER_MESSAGE / rate
            if (wait := due - time.time()) > 0:
                time.sleep(wait)
            ((topic, payload, _n),) = _messages(int(time.time() * 1000), 1, first=m)
            infos.append(client.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(60)
        client.loop_stop()
        client.disconnect()

    t = threading.Thread(target=run)
    t.start()
    return t


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        mosquitto = Mosquitto(Path(tmp) / "mosquitto").start()
        influx = InfluxDB1(Path(tmp) / "influx").start()
        try:
            with console.status("direct-write ceiling"):
                top = ceiling(influx)
            with console.status("collector end to end, as fast as it goes"):
                e2e, _ = end_to_end(mosquitto, influx, None, TOTAL_READINGS)
            live_rate = e2e / 2
            with console.status(f"latency at a sustained {live_rate:,.0f} readings/s"):
                _, lags = end_to_end(mosquitto, influx, live_rate, int(live_rate * 20))
        finally:
            influx.stop()
            mosquitto.stop()
    q = statistics.quantiles(lags, n=100)
    t = Table(title="collector (loopback Mosquitto 2.0, InfluxDB 1.6, one collector)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("database direct-write ceiling", f"{top:,.0f} readings/s (line protocol, 5,000 lines per POST)")
    t.add_row("collector end to end", f"{e2e:,.0f} readings/s (gateway-format MQTT, {TOTAL_READINGS:,} readings)")
    t.add_row("ratio", f"{e2e / top:.0%} of the ceiling (target: at least 50 %)")
    t.add_row("latency reading -> stored", f"p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms at {live_rate:,.0f} readings/s "
                                            f"(half the end-to-end rate)")
    console.print(t)


if __name__ == "__main__":
    main()
