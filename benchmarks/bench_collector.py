"""Collector figures, in one run: the database's direct-write ceiling, the collector's sustained end-to-end rate
(gateway-format MQTT -> InfluxDB), their ratio, and p50/p99 latency from a reading's timestamp to it being stored.

Real Mosquitto and InfluxDB 1.x on loopback, the collector in this process, the gateway fleet in processes
of its own (gateways are other machines: they must not share the collector's interpreter lock). All on one
machine, so the database, the broker, the fleet and the collector share its cores. About a minute.
    .venv/bin/python benchmarks/bench_collector.py                    # about six minutes on two cores
    .venv/bin/python benchmarks/bench_collector.py --readings 52000   # a quick check that it still runs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.ingest import COLLECTOR_MQTT, CollectorSettings, Ingest
from collector.lineprotocol import encode
from collector.registry import Registry
from collector.storage import InfluxSettings, V1Writer
from edge.cell import CellConfig
from edge.codec import encode_value
from edge.profile import get_profile
from edge.telemetry import SCHEMA, Reading, TelemetryBatch, polls, telemetry_topic
from kwwk.dev.localservers import InfluxDB1, Mosquitto

GATEWAYS, DEVICES = 10, 10
PROFILE = get_profile("eastron_sdm630")
POINTS = [p.name for p in PROFILE.points if p.publish]
_TYPICAL = {"voltage": 230.0, "current": 5.2, "power": 1190.0, "frequency": 50.0, "energy": 123456.7}


def _published(point: str, variation: int) -> float:
    """A meter-like value as a gateway publishes it: encoded to the profile's registers and decoded back."""
    p = PROFILE.by_name[point]
    base = next(v for k, v in _TYPICAL.items() if point.startswith(k))
    word_order, byte_order = PROFILE.orders(p)
    words = encode_value(base * (1 + (variation - 50) / 1000), p.type, word_order=word_order, byte_order=byte_order)
    image = {p.table: {PROFILE.wire(p) + i: w for i, w in enumerate(words)}}
    value = PROFILE.decode_points(image, [p]).values.get(p.name)
    assert isinstance(value, float)
    return value


VALUES = [[_published(p, v) for v in range(100)] for p in POINTS]
READINGS_PER_MESSAGE = 520  # 40 device polls of 13 points: what a gateway sends in one batch
TOTAL_READINGS = 5_200_000


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
            readings += [Reading(dev, p, ts, VALUES[i][(m + k) % 100]) for i, p in enumerate(POINTS)]
        batch = TelemetryBatch.model_construct(schema_=SCHEMA, cell="benchcell", gateway=f"gw-{g}",
                                               stream="bench", seq=m // GATEWAYS, sent=t0, replay=False,
                                               polls=polls(readings))
        out.append((telemetry_topic("benchcell", f"gw-{g}"), batch.to_json(), len(readings)))
    return out


def ceiling(influx: InfluxDB1, writers: int, t0: int, total: int) -> float:
    """Readings/s when prebuilt line protocol of the same shape is posted straight to /write (5,000 lines a
    batch) by `writers` concurrent connections."""
    rows = [("electricity_meter", (("cell", "ceiling"), ("device", f"m{i % 100}"), ("gateway", "gw")), t0 + i * 7,
             {p: VALUES[j][i % 100] for j, p in enumerate(POINTS)}) for i in range(total // len(POINTS))]
    bodies = [encode(rows[i:i + 5000]).encode() for i in range(0, len(rows), 5000)]

    def post(share: list[bytes]) -> None:
        with httpx.Client(timeout=60) as http:
            for body in share:
                http.post(f"{influx.url}/write", params={"db": influx.database, "precision": "ms"},
                          content=body).raise_for_status()

    threads = [threading.Thread(target=post, args=(bodies[k::writers],)) for k in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(rows) * len(POINTS) / (time.perf_counter() - start)


class _LatencyWriter(V1Writer):
    """The real v1 writer, noting when each batch was accepted (InfluxDB 1.x serves a write once it is accepted)."""

    def __init__(self, s: InfluxSettings, track: bool) -> None:
        super().__init__(s)
        self.track = track  # off when measuring throughput: it costs the collector's process time
        self.lags: list[float] = []

    def write(self, lines: str) -> None:
        super().write(lines)
        if not self.track:
            return
        now = time.time() * 1000
        for line in lines.splitlines():
            if line.startswith("electricity_meter"):
                self.lags.append(now - int(line.rsplit(" ", 1)[1]))


def _publish(port: int, messages: list[tuple[str, bytes, int]] | None, live: tuple[float, int] | None,
             ready: Any, go: Any) -> None:
    """A gateway fleet's connection, in a process of its own (gateways are other machines, not our GIL): the
    given messages flat out, or `live` = (readings/s, messages), each stamped when it is built."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{multiprocessing.current_process().pid}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.release()
    go.wait()
    infos = []
    if messages is not None:
        infos = [client.publish(topic, payload, qos=1) for topic, payload, _n in messages]
    elif live is not None:
        rate, count = live
        begin = time.time()
        for m in range(count):
            if (wait := begin + m * READINGS_PER_MESSAGE / rate - time.time()) > 0:
                time.sleep(wait)
            ((topic, payload, _n),) = _messages(int(time.time() * 1000), 1, first=m)
            infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def _cpu_seconds(mosquitto: Mosquitto, influx: InfluxDB1) -> dict[str, float]:
    """CPU seconds used so far by each part: where a shared machine's cores go."""
    def proc(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    assert mosquitto.proc is not None and influx.proc is not None
    return {"collector": me.ru_utime + me.ru_stime, "gateway fleet": kids.ru_utime + kids.ru_stime,
            "Mosquitto": proc(mosquitto.proc.pid), "InfluxDB": proc(influx.proc.pid)}


def _fleet(port: int, messages: list[tuple[str, bytes, int]] | None, live: tuple[float, int] | None = None,
           processes: int = 2) -> Callable[[], None]:
    """Start the fleet's processes, connected and waiting; the returned call sets them going and waits for them."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=_publish, args=(port, messages[k::processes] if messages else None, live, ready, go))
             for k in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()

    def run() -> None:
        go.set()
        for p in procs:
            p.join()

    return run


def _collector(mosquitto: Mosquitto, influx: InfluxDB1, client_id: str, track: bool) -> tuple[Ingest, _LatencyWriter]:
    writer = _LatencyWriter(InfluxSettings(url=influx.url, database=influx.database), track)
    # a share group of its own: the stopped session of an earlier run keeps its share until it expires
    ingest = Ingest(CollectorSettings(mqtt=COLLECTOR_MQTT.replace(port=mosquitto.port, client_id=client_id),
                                      share_group=client_id, flush_interval_s=0.2, receive_maximum=1000),
                    Registry({"benchcell": _cell()}), writer)
    ingest.start()
    if not ingest.subscribed.wait(30):
        msg = "the collector did not subscribe within 30 s"
        raise RuntimeError(msg)
    return ingest, writer


def end_to_end(mosquitto: Mosquitto, influx: InfluxDB1, mode: str, total: int, t0: int = 0,
               rate: float = 0) -> tuple[float, list[float], dict[str, float]]:
    """Readings/s through the real collector (Ingest), and the CPU seconds each part used per million readings.

    mode "live": the fleet publishes flat out while the collector runs (fleet, broker, collector and database
    share the cores); "backlog": the fleet published while the collector was away, which then drains its
    session (the machine is the collector's, the broker's and the database's); "paced": a live fleet at `rate`,
    each message stamped when built, for the latency figure.
    """
    count = total // READINGS_PER_MESSAGE
    client_id = f"bench-collector-{mode}"
    if mode == "backlog":
        ingest, _ = _collector(mosquitto, influx, client_id, track=False)
        ingest.stop()  # its session stays and queues what comes
        _fleet(mosquitto.port, _messages(t0, count))()
    go = (_fleet(mosquitto.port, _messages(t0, count)) if mode == "live" else
          _fleet(mosquitto.port, None, (rate, count), processes=1) if mode == "paced" else None)
    cpu0 = _cpu_seconds(mosquitto, influx)
    start = time.perf_counter()
    ingest, writer = _collector(mosquitto, influx, client_id, track=mode == "paced")
    start = start if mode == "backlog" else time.perf_counter()
    if go is not None:
        go()
    want = count * (READINGS_PER_MESSAGE // len(POINTS) * len(POINTS))
    while ingest.stored_readings < want and time.perf_counter() - start < 300:
        time.sleep(0.01)
    took = time.perf_counter() - start
    cpu = {k: (v - cpu0[k]) / ingest.stored_readings * 1e6 for k, v in _cpu_seconds(mosquitto, influx).items()}
    ingest.stop()
    return ingest.stored_readings / took, writer.lags, cpu


def _counted(influx: InfluxDB1, t0: int) -> int:
    """Lines of the run that started at t0 (its stamps go back from t0) that InfluxDB holds."""
    res = influx.query('SELECT count("power") FROM "electricity_meter" WHERE "cell" = \'benchcell\' '
                       f"AND time <= {t0}ms AND time > {t0 - 5_000_000_000}ms")
    return int(res["results"][0]["series"][0]["values"][0][1])  # type: ignore[index]


def measure(console: Console, layout: str, total: int) -> dict[str, Any]:
    """Every figure, on fresh servers. layout "shared": all parts share every core; "own core": InfluxDB has
    core 0 to itself in both the ceiling and the end-to-end runs (as on a host of its own), the rest core 1."""
    out: dict[str, Any] = {}
    cores = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp:
        mosquitto = Mosquitto(Path(tmp) / "mosquitto").start()
        influx = InfluxDB1(Path(tmp) / "influx").start()
        try:
            if layout == "own core":
                assert influx.proc is not None and mosquitto.proc is not None
                db, rest = {min(cores)}, cores - {min(cores)}
                # affinity is per thread on Linux; threads started later inherit it from their parent thread
                for tid in os.listdir(f"/proc/{influx.proc.pid}/task"):
                    os.sched_setaffinity(int(tid), db)
                for pid in (0, mosquitto.proc.pid):  # 0: this thread, before the collector's and fleet's start
                    os.sched_setaffinity(pid, rest)
            with console.status(f"{layout}: direct-write ceiling"):
                out["ceilings"] = {n: ceiling(influx, n, 1_500_000_000_000 + n * 10_000_000_000, total)
                                   for n in (1, 2, 4)}
            for mode, t0 in (("live", 1_650_000_000_000), ("backlog", 1_640_000_000_000)):
                with console.status(f"{layout}: collector end to end, {mode}"):
                    rate, _, cpu = end_to_end(mosquitto, influx, mode, total, t0)
                    out[mode] = (rate, cpu, _counted(influx, t0))
            out["paced"] = paced = out["live"][0] / 2
            with console.status(f"{layout}: latency at a sustained {paced:,.0f} readings/s"):
                _, lags, _ = end_to_end(mosquitto, influx, "paced", int(paced * 20), rate=paced)
            out["lag"] = statistics.quantiles(lags, n=100)
        finally:
            influx.stop()
            mosquitto.stop()
            os.sched_setaffinity(0, cores)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=TOTAL_READINGS,
                        help=f"readings a run (default {TOTAL_READINGS:,}; fewer make noisier figures)")
    total = parser.parse_args().readings
    console = Console()
    layouts = ["shared", "own core"] if len(os.sched_getaffinity(0)) >= 2 else ["shared"]
    figures = {layout: measure(console, layout, total) for layout in layouts}
    polls = total // READINGS_PER_MESSAGE * (READINGS_PER_MESSAGE // len(POINTS))
    t = Table(title=f"collector: loopback Mosquitto 2.0, InfluxDB 1.6, one collector, {os.cpu_count()} cores; "
                    f"{total:,} SDM630 readings a run (13 a line, 520 a message), target: at least 50 %")
    t.add_column("figure")
    for layout in layouts:
        t.add_column("all share every core" if layout == "shared" else "InfluxDB on a core of its own",
                     justify="right")
    rows: dict[str, list[str]] = {}
    for f in figures.values():
        tops = f["ceilings"]
        top_n = max(tops, key=lambda n: tops[n])
        top = tops[top_n]
        rows.setdefault("database direct-write ceiling", []).append(
            f"{top:,.0f}/s with {top_n} writers (" + ", ".join(f"{n}: {v:,.0f}" for n, v in tops.items()) + ")")
        for mode, what in (("live", "fleet publishing meanwhile"), ("backlog", "draining what the fleet sent before")):
            rate, cpu, counted = f[mode]
            rows.setdefault(f"end to end, {what}", []).append(f"{rate:,.0f}/s = {rate / top:.0%} of the ceiling")
            rows.setdefault(f"  lines counted in InfluxDB ({mode})", []).append(f"{counted:,} of {polls:,}")
            rows.setdefault(f"  CPU s per million readings ({mode})", []).append(
                ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        q = f["lag"]
        rows.setdefault("latency reading -> stored, at half the live rate", []).append(
            f"p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms at {f['paced']:,.0f}/s")
    for name, values in rows.items():
        t.add_row(name, *values)
    console.print(t)


if __name__ == "__main__":
    main()
