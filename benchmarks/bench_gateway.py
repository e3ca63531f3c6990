"""Gateway disk writes, CPU and memory per reading, in steady state, through a broker outage and its replay.

Why: a Raspberry Pi's SD card wears with every write (issue 15: 20 Eastron SDM630 at a 1 s poll wrote 6.5 MB
per 1,000 readings, ~140 GB/day). This prints the figures to compare before and after an outbox change: rerun it.

Two scenarios: 20 SDM630 polled every second (benchmarks/data/sdm630x20.yaml, ~260 readings/s), and the demo
cell's gateway gw-musterdorf-1 as `kwwk demo` runs it (firmware_configs/cells/musterdorf.yaml, its 5 s poll).
Each runs real Mosquitto (kwwk.dev.localservers), the simulator (`kwwk sim run`) and the gateway
(`kwwk gateway run`) in processes of their own, and three phases: steady state with the broker up; a broker
outage (Mosquitto stopped); the replay after its return, until the outbox has caught up. Per phase, from
/proc/<gateway pid>/io, /stat and /status and the gateway's /metrics, sampled at the window's start and end:
bytes written to disk per 1,000 readings stored (write_bytes), write syscalls/s (syscw: sockets too), GB/day at
the window's write rate, CPU s per 1,000 readings, RSS and its peak, poll lateness p99 (a bucket estimate from
the histogram), the outbox's files at the phase's end; for the replay, the seconds from the broker's return to
the gateway connected again (its gauge polled every 50 ms) and the replay's duration and rate (the drain rate).
The gateway's log goes to a pipe, not a file, so that its own writes are the outbox's (on a Pi, journald's).

Takes about 2 x (steady + outage + replay + ~15 s): ~25 minutes with the defaults, ~2.5 with --quick.
    .venv/bin/python benchmarks/bench_gateway.py                          # both scenarios, 60 s + 10 min outage
    .venv/bin/python benchmarks/bench_gateway.py --scenario sdm630x20     # the issue's load only
    .venv/bin/python benchmarks/bench_gateway.py --quick                  # steady 20 s, outage 30 s
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.cell import load_cell  # noqa: E402
from edge.sim.ports import listening_ports  # noqa: E402
from kwwk.dev.localservers import Mosquitto, _port_open  # noqa: E402
from tests.conftest import with_reserved_ports  # noqa: E402

KWWK = Path(sys.executable).parent / "kwwk"
#: the gateway and the simulator run this checkout's code, whichever checkout the venv's editable install names
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
SAMPLE_S = 0.05  # how often the replay polls /metrics: the reconnect and drain times are figures
LATENESS = "kwwk_gateway_poll_lateness_seconds"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    key: str
    cell: Path
    gateway: str


SCENARIOS = {s.key: s for s in (
    Scenario("sdm630x20", ROOT / "benchmarks/data/sdm630x20.yaml", "gw-bench"),  # the load
    Scenario("demo", ROOT / "firmware_configs/cells/musterdorf.yaml", "gw-musterdorf-1"),  # its poll, as in the demo
)}


class Metrics:
    """One scrape of the gateway's /metrics, summed over labels where a figure is the gateway's total."""

    def __init__(self, text: str) -> None:
        self.samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]

    def total(self, name: str) -> float:
        return sum(v for n, _, v in self.samples if n == name)

    def buckets(self, histogram: str) -> dict[float, float]:
        """Cumulative count per upper bound (le), over every device."""
        out: dict[float, float] = {}
        for n, labels, v in self.samples:
            if n == histogram + "_bucket":
                le = float(labels["le"])
                out[le] = out.get(le, 0.0) + v
        return out

    @property
    def pending(self) -> float:
        """Readings stored but not yet acknowledged by the broker (nor dropped)."""
        return (self.total("kwwk_gateway_readings_total") - self.total("kwwk_gateway_published_readings_total")
                - self.total("kwwk_gateway_outbox_dropped_total"))


@dataclass(frozen=True)
class Snapshot:
    """The gateway process at one moment: /proc counters and a /metrics scrape."""

    t: float  # time.monotonic()
    io: dict[str, int]
    cpu_s: float
    rss_kib: int
    hwm_kib: int
    metrics: Metrics


def _proc(pid: int) -> tuple[dict[str, int], float, int, int]:
    io = {k: int(v) for k, v in (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, every thread of the process
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return io, cpu, int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


class GatewayProcess:
    """`kwwk gateway run` in a process of its own, health on port 0 (read back from /proc), log kept in memory."""

    def __init__(self, cell: Path, gateway: str, broker_port: int, outbox_dir: Path) -> None:
        self.outbox_dir = outbox_dir
        outbox_dir.mkdir(parents=True)
        self.proc = subprocess.Popen(  # noqa: S603
            [str(KWWK), "gateway", "run", "--cell", str(cell), "--gateway", gateway, "--mqtt-port", str(broker_port),
             "--outbox", str(outbox_dir / f"{gateway}.sqlite"), "--health-port", "0", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        self.log: collections.deque[str] = collections.deque(maxlen=50)
        threading.Thread(target=self._read_log, daemon=True).start()
        self.port = 0

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace").rstrip())

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n" + "\n".join(self.log))

    def ready(self, timeout: float = 60) -> None:
        """Wait for /metrics, the broker connection and the first readings stored."""
        deadline = time.monotonic() + timeout
        while not self.port:
            self._alive()
            self.port = min(listening_ports(self.proc.pid), default=0)
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not serve /metrics:\n" + "\n".join(self.log))
            time.sleep(0.1)
        while True:
            self._alive()
            m = self.metrics()
            if m.total("kwwk_gateway_broker_connected") == 1 and m.total("kwwk_gateway_readings_total") > 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway neither connected nor stored readings:\n" + "\n".join(self.log))
            time.sleep(0.1)

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:  # noqa: S310
            return Metrics(r.read().decode())

    def snapshot(self) -> Snapshot:
        self._alive()
        t = time.monotonic()
        io, cpu, rss, hwm = _proc(self.proc.pid)
        return Snapshot(t, io, cpu, rss, hwm, self.metrics())

    def outbox_bytes(self) -> int:
        """Every file of the outbox's folder (.sqlite, -wal, -shm and whatever else the outbox keeps there)."""
        return sum(p.stat().st_size for p in self.outbox_dir.rglob("*") if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bucket_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> tuple[float, bool] | None:
    """The q-quantile of a cumulative histogram's observations between two scrapes, interpolated linearly within
    its bucket as Prometheus' histogram_quantile does: an estimate, only as fine as the buckets. (bound, True)
    when it falls beyond the last finite bound; None without observations."""
    bounds = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for le, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if math.isinf(le):
                return lower, True
            return lower + (le - lower) * (rank - below) / (cum - below), False
        lower, below = le, cum
    return None


@dataclass
class Row:
    """One scenario x phase: the figures of its window."""

    scenario: str
    phase: str
    a: Snapshot
    b: Snapshot
    outbox_bytes: int
    reconnect_s: float | None = None
    replay_s: float | None = None
    replayed: float = 0.0
    drained: bool = True

    @property
    def seconds(self) -> float:
        return self.b.t - self.a.t

    @property
    def readings(self) -> float:
        return self.b.metrics.total("kwwk_gateway_readings_total") - self.a.metrics.total("kwwk_gateway_readings_total")

    def delta(self, key: str) -> int:
        return self.b.io[key] - self.a.io[key]

    def cells(self) -> list[str]:
        per_k = self.readings / 1000
        written = self.delta("write_bytes")
        p99 = bucket_quantile(0.99, self.a.metrics.buckets(LATENESS), self.b.metrics.buckets(LATENESS))
        replay = ""
        if self.replay_s is not None:
            # both ends are samples SAMPLE_S apart: a replay shorter than a few of them gets bounds, not a value
            most = self.replay_s + SAMPLE_S
            replay = (f"< {most:.2f} s, > {self.replayed / most:,.0f}/s" if most < 5 * SAMPLE_S else
                      f"{self.replay_s:.2f} s, {self.replayed / self.replay_s:,.0f}/s")
        if not self.drained:
            replay = f"not drained in {self.seconds:.0f} s" + (f" ({replay})" if replay else "")
        return [
            self.scenario, self.phase, f"{self.seconds:.0f}", f"{self.readings:,.0f}",
            f"{written / per_k:,.0f}" if per_k else "-", f"{written / self.readings:,.1f}" if per_k else "-",
            f"{self.delta('syscw') / self.seconds:,.1f}", f"{written / self.seconds * 86400 / 1e9:,.2f}",
            f"{(self.b.cpu_s - self.a.cpu_s) / per_k:.3f}" if per_k else "-",
            f"{self.b.rss_kib / 1024:.0f} ({self.b.hwm_kib / 1024:.0f})",
            "-" if p99 is None else (f"> {p99[0] * 1000:g} ms" if p99[1] else f"{p99[0] * 1000:.2g} ms"),
            f"{self.outbox_bytes:,}",
            "" if self.reconnect_s is None else f"{self.reconnect_s:.2f}",
            replay,
        ]


HEADERS = ["scenario", "phase", "window s", "readings", "disk B / 1k readings", "B / reading", "write syscalls/s",
           "GB/day", "CPU s / 1k readings", "RSS MiB (peak)", "poll lateness p99*", "outbox on disk, B",
           "broker back → connected, s", "replay: duration, readings/s"]


class Bench:
    def __init__(self, steady_s: float, outage_s: float, progress: Progress) -> None:
        self.steady_s = steady_s
        self.outage_s = outage_s
        self.progress = progress

    def _wait(self, task: TaskID, seconds: float, each: Callable[[], None] = lambda: None) -> None:
        """Let a window's time pass (on purpose: the figures are rates over it), showing it."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            each()
            self.progress.update(task, completed=seconds - max(0.0, end - time.monotonic()))

    @contextmanager
    def _servers(self, sc: Scenario, work: Path) -> Iterator[tuple[Mosquitto, GatewayProcess]]:
        cell = with_reserved_ports(sc.cell, work / "cells")  # `kwwk sim run` serves the configured ports
        broker = Mosquitto(work / "mosquitto").start()
        with (work / "sim.log").open("wb") as sim_log:
            sim = subprocess.Popen(  # noqa: S603
                [str(KWWK), "sim", "run", "--cell", str(cell), "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL, stderr=sim_log, env=ENV)
        gw: GatewayProcess | None = None
        try:
            ports = {d.connection.port for _, d in load_cell(cell).devices() if d.connection.port}
            deadline = time.monotonic() + 30
            while not all(_port_open(p) for p in ports):  # every endpoint served before the gateway starts
                if sim.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the simulator did not serve {sorted(ports)}; see {work / 'sim.log'}")
                time.sleep(0.1)
            gw = GatewayProcess(cell, sc.gateway, broker.port, work / "outbox")
            gw.ready()
            yield broker, gw
        finally:
            if gw is not None:
                gw.stop()
            sim.terminate()
            sim.wait(20)
            broker.stop()

    def run(self, sc: Scenario, work: Path) -> list[Row]:
        gateway = load_cell(sc.cell).gateway(sc.gateway)
        name = f"{sc.key}: {len(gateway.devices)} dev, {gateway.poll_interval:g} s"
        interval = gateway.poll_interval
        task = self.progress.add_task(f"{name}: starting", total=None)
        rows: list[Row] = []
        with self._servers(sc, work) as (broker, gw):
            self._wait(task, max(5.0, 2 * interval))  # imports, connections and first polls are not steady state

            self.progress.update(task, description=f"{name}: steady state", total=self.steady_s, completed=0)
            waiting: list[float] = []  # readings waiting for their PUBACK while the broker is up, once a second
            a = gw.snapshot()
            self._wait(task, self.steady_s, lambda: waiting.append(gw.metrics().pending))
            b = gw.snapshot()
            rows.append(Row(name, "steady", a, b, gw.outbox_bytes()))
            per_round = b.metrics.total("kwwk_gateway_readings_total") - a.metrics.total("kwwk_gateway_readings_total")
            per_round *= interval / (b.t - a.t)

            self.progress.update(task, description=f"{name}: broker outage", total=self.outage_s, completed=0)
            broker.stop()
            a = gw.snapshot()
            self._wait(task, self.outage_s)
            b = gw.snapshot()
            rows.append(Row(name, "outage", a, b, gw.outbox_bytes()))

            self.progress.update(task, description=f"{name}: replay", total=None, completed=0)
            broker.start()
            rows.append(self._replay(name, task, gw, caught_up=max([*waiting, per_round]) + 1))
        self.progress.update(task, description=f"{name}: done", total=1, completed=1)
        return rows

    def _replay(self, name: str, task: TaskID, gw: GatewayProcess, caught_up: float) -> Row:
        """From the broker's return until no more readings wait than in steady state (at most 3x the outage)."""
        a = gw.snapshot()
        backlog = a.metrics.pending
        self.progress.update(task, total=max(1.0, backlog - caught_up), completed=0)
        connected_at: float | None = None
        deadline = a.t + max(120.0, 3 * self.outage_s)
        drained = False
        while time.monotonic() < deadline:
            m = gw.metrics()
            now = time.monotonic()
            if connected_at is None and m.total("kwwk_gateway_broker_connected") == 1:
                connected_at = now
            if connected_at is not None and m.pending <= caught_up:
                drained = True
                break
            self.progress.update(task, completed=max(0.0, backlog - m.pending))
            time.sleep(SAMPLE_S)
        b = gw.snapshot()
        replayed = (b.metrics.total("kwwk_gateway_published_readings_total")
                    - a.metrics.total("kwwk_gateway_published_readings_total"))
        return Row(name, "replay", a, b, gw.outbox_bytes(),
                   reconnect_s=None if connected_at is None else connected_at - a.t,
                   replay_s=None if connected_at is None else b.t - connected_at, replayed=replayed, drained=drained)


def _revision() -> str:
    """The commit measured, and whether the working tree (which the gateway runs) differs from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)  # noqa: S603, S607
        return done.stdout.strip()
    head = git("log", "--oneline", "-1")
    if not head:
        return f"{ROOT} (not a git checkout)"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "gateway", "edge", "kwwk").splitlines()]
    return head + (f" (+ uncommitted: {', '.join(dirty)})" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steady-s", type=float, default=60, help="steady-state window (default 60)")
    parser.add_argument("--outage-s", type=float, default=600, help="broker outage (default 600)")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="steady 20 s, outage 30 s: to check it still runs")
    args = parser.parse_args()
    if args.quick:
        args.steady_s, args.outage_s = 20, 30
    scenarios = list(SCENARIOS.values()) if args.scenario == "both" else [SCENARIOS[args.scenario]]
    console = Console(width=None if sys.stdout.isatty() else 250)
    revision = _revision()
    rows: list[Row] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bench = Bench(args.steady_s, args.outage_s, progress)
        for sc in scenarios:
            with tempfile.TemporaryDirectory(prefix=f"bench-gateway-{sc.key}-") as tmp:  # on disk: /tmp is ext4 here
                rows += bench.run(sc, Path(tmp))
    command = (f".venv/bin/python benchmarks/bench_gateway.py --scenario {args.scenario} "
               f"--steady-s {args.steady_s:g} --outage-s {args.outage_s:g}")
    console.print(f"reproduce: {command}")
    console.print(f"measured: {revision}")
    t = Table(title="gateway disk writes, CPU, memory (own process; loopback Mosquitto, simulator in its own process)")
    for i, h in enumerate(HEADERS):
        t.add_column(h, justify="left" if i < 2 else "right", no_wrap=i < 2)
    for r in rows:
        t.add_row(*r.cells())
    console.print(t)
    console.print("disk: write_bytes of /proc/<gateway pid>/io over the window, per reading stored in it "
                  "(kwwk_gateway_readings_total); GB/day at the window's rate. Write syscalls include sockets. "
                  "CPU: utime+stime. RSS: VmRSS at the window's end, peak VmHWM since start.\n"
                  "* poll lateness p99: a bucket estimate (kwwk_gateway_poll_lateness_seconds, bucket deltas over "
                  "the window, interpolated within the bucket). Steady state: /metrics scraped once a second. "
                  "Outbox: every file beside the outbox at the "
                  f"phase's end. Replay: the broker's return until no more readings wait than in steady state "
                  f"(/metrics polled every {SAMPLE_S * 1000:.0f} ms, which costs the gateway a little CPU); "
                  "its rate is readings acknowledged / time since connected again.")


if __name__ == "__main__":
    main()
