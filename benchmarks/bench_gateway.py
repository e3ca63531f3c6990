"""Gateway figures: outbox replay drain rate, steady-state CPU per 1,000 readings, resident memory.

Runs real Mosquitto and the simulator on loopback; prints a table. About a minute.
    .venv/bin/python benchmarks/bench_gateway.py
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.telemetry import Reading  # noqa: E402
from gateway.metrics import GatewayMetrics  # noqa: E402
from gateway.outbox import Outbox  # noqa: E402
from gateway.settings import gateway_mqtt  # noqa: E402
from gateway.uplink import Uplink  # noqa: E402
from edge.cell import load_cell  # noqa: E402
from edge.sim.ports import reserve_port  # noqa: E402
from kwwk.dev.localservers import Mosquitto, _port_open  # noqa: E402
from tests.conftest import with_reserved_ports  # noqa: E402

BACKLOG = 200_000
STEADY_S = 30


async def drain_rate(broker_port: int, workdir: Path) -> tuple[float, float]:
    """Fill an outbox as a long outage would, then time the replay to the broker (readings/s)."""
    outbox = Outbox(workdir / "drain.sqlite", fsync="normal")
    t0 = int(time.time() * 1000) - BACKLOG * 10
    batch = []
    for i in range(BACKLOG):
        batch.append(Reading(f"dev{i % 14}", "power", t0 + i * 10, float(i)))
        if len(batch) == 10_000:
            outbox.append(batch)
            batch.clear()
    uplink = Uplink("benchcell", "gw-bench", outbox, gateway_mqtt(port=broker_port), GatewayMetrics(),
                    batch_size=500)
    start = time.perf_counter()
    task = asyncio.create_task(uplink.run())
    while outbox.depth:  # polled finely: the drain time is the figure
        await asyncio.sleep(0.05)
    took = time.perf_counter() - start
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    outbox.close()
    return BACKLOG / took, took


def _proc_stat(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))  # type: ignore[union-attr]
    return cpu, rss_kb


def _readings(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kwwk_gateway_readings_total{"))


def steady_state(broker_port: int, workdir: Path) -> tuple[float, float, float]:
    """The musterdorf gateway (14 devices) polling every second against the simulator in its own process."""
    text = (ROOT / "firmware_configs/cells/musterdorf.yaml").read_text().replace("poll_interval: 5", "poll_interval: 1")
    (workdir / "src").mkdir()
    (workdir / "src/musterdorf.yaml").write_text(text)
    cell = with_reserved_ports(workdir / "src/musterdorf.yaml", workdir / "cells")
    kwwk = Path(sys.executable).parent / "kwwk"
    sim = subprocess.Popen([str(kwwk), "sim", "run", "--cell", str(cell)], stdout=subprocess.DEVNULL,  # noqa: S603
                           stderr=subprocess.DEVNULL)
    health = reserve_port()  # the gateway runs in a process of its own: a port reserved for it (edge.sim.ports)
    ports = {d.connection.port for _, d in load_cell(cell).devices() if d.connection.port}
    deadline = time.monotonic() + 20
    while not all(_port_open(p) for p in ports):  # the simulator serves every endpoint before the gateway starts
        if sim.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the simulator did not serve {sorted(ports)}")
        time.sleep(0.1)
    gw = subprocess.Popen([str(kwwk), "gateway", "run", "--cell", str(cell), "--gateway", "gw-musterdorf-1",  # noqa: S603
                           "--mqtt-port", str(broker_port), "--outbox", str(workdir / "steady.sqlite"),
                           "--health-port", str(health), "--log-level", "WARNING"],
                          stdout=subprocess.DEVNULL, stderr=(workdir / "gateway.log").open("wb"))
    try:
        time.sleep(5)  # time passing on purpose: imports and first polls are not steady state
        if gw.poll() is not None:
            raise RuntimeError("gateway exited: " + (workdir / "gateway.log").read_text()[-2000:])
        cpu0, _ = _proc_stat(gw.pid)
        n0 = _readings(health)
        time.sleep(STEADY_S)  # the measured window
        cpu1, rss = _proc_stat(gw.pid)
        n1 = _readings(health)
    finally:
        gw.terminate()
        sim.terminate()
        gw.wait(20)
        sim.wait(20)
    return (cpu1 - cpu0) / ((n1 - n0) / 1000), (n1 - n0) / STEADY_S, rss / 1024


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto").start()
        try:
            with console.status(f"replaying a backlog of {BACKLOG:,} readings"):
                rate, took = asyncio.run(drain_rate(broker.port, work))
            with console.status(f"steady state for {STEADY_S}s"):
                cpu_per_k, per_s, rss_mb = steady_state(broker.port, work)
        finally:
            broker.stop()
    t = Table(title="gateway (loopback Mosquitto, simulator in its own process)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("replay drain rate", f"{rate:,.0f} readings/s ({BACKLOG:,} in {took:.1f} s, 500 per message)")
    t.add_row("steady-state CPU", f"{cpu_per_k:.3f} CPU-s per 1,000 readings ({per_s:,.0f} readings/s, 14 devices, 1 s polls)")
    t.add_row("resident memory", f"{rss_mb:.0f} MiB (gateway process, steady state)")
    console.print(t)


if __name__ == "__main__":
    main()
