"""Requests per second and latency of the public summary endpoint under concurrent load, on loopback.

Both demo cells are simulated for two days (Site.advance every 60 s), stored in a real InfluxDB 1.x and
balanced; the API runs under uvicorn in a process of its own (clock pinned to the second day's 14:00,
per-address limit off, so the load generator's one address is not throttled). Concurrent clients, each on
a kept-alive connection of its own, ask
for the summaries for a bounded number of requests or seconds, whichever ends first: once as residents
do (answers cached for 60 s), once without the cache (each answer sums the balance rows again; requests
arriving while one is computed wait for it and share its answer).

    python benchmarks/bench_api.py [--requests 4000] [--concurrency 32] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.balance.wiring import InfluxEngine
from collector.lineprotocol import Row, encode
from collector.storage import InfluxSettings, V1Writer
from edge.cell import CellConfig, load_cell
from edge.sim.site import Site
from edge.sim.ports import reserve_port
from kwwk.dev.localservers import InfluxDB1

ROOT = Path(__file__).resolve().parents[1]
TZ = ZoneInfo("Europe/Berlin")
NOW_S = int(datetime(2026, 11, 2, 14, 0, tzinfo=TZ).timestamp())
START_S = int(datetime(2026, 11, 1, 0, 0, tzinfo=TZ).timestamp()) - 3600
CELLS = ("musterdorf", "lindenau")


def fill(cfg: CellConfig, settings: InfluxSettings) -> None:
    site = Site(cfg, START_S)
    roles = [(g.id, d.id, p) for g, d in cfg.devices() for p in d.roles]
    writer = V1Writer(settings)
    rows: list[Row] = []
    for t in range(START_S, NOW_S + 1, 60):
        site.advance(t)
        fields: dict[tuple[str, str], dict[str, float]] = {}
        for gw, dev, point in roles:
            fields.setdefault((gw, dev), {})[point] = site.state[dev][point]
        rows += [(cfg.profiles[d].device_class, (("cell", cfg.cell.id), ("gateway", g), ("device", d)), t * 1000, f)
                 for (g, d), f in fields.items()]
    writer.write(encode(rows))
    writer.close()


def serve(influx_url: str, port: int, cache_s: float) -> None:
    """The API process."""
    import uvicorn

    from collector.api.app import ApiSettings, create_app
    from collector.registry import Registry
    from edge.obs import setup_logging

    setup_logging("ERROR")  # no operator tokens here, and the benchmark needs none
    cells = {c: load_cell(ROOT / f"firmware_configs/cells/{c}.yaml") for c in CELLS}
    settings = ApiSettings(InfluxSettings(url=influx_url, database="kwwk"), watch_status=False,
                           public_rate_per_s=0, public_cache_s=cache_s, clock=lambda: float(NOW_S))
    uvicorn.run(create_app(Registry(cells), settings), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One GET on a kept-alive connection: the status code (a small client, so the load generator stays
    cheaper than the server it measures)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return status


async def load(port: int, total: int, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal errors, sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < total and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                status = await _get(reader, writer, f"/api/public/cells/{CELLS[(sent + i) % len(CELLS)]}/summary")
                latencies.append(time.perf_counter() - t0)
                errors += status != 200
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


def run(influx_url: str, cache_s: float, total: int, concurrency: int, seconds: float) -> dict[str, float]:
    port = reserve_port()  # the API runs in a process of its own: a port reserved for it (edge.sim.ports)
    proc = multiprocessing.get_context("spawn").Process(target=serve, args=(influx_url, port, cache_s), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                t0 = time.perf_counter()
                first = httpx.get(f"{url}/api/public/cells/musterdorf/summary", timeout=10)
                cold = time.perf_counter() - t0
                assert first.status_code == 200, first.text
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        latencies, errors, took = asyncio.run(load(port, total, concurrency, seconds))
    finally:
        proc.terminate()
        proc.join(10)
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / took, "cold_ms": cold * 1000,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, "max_ms": latencies[-1] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000, help="requests per run (at most)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients at once")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per run (at most)")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        server = InfluxDB1(Path(tmp) / "influxdb").start()
        try:
            settings = InfluxSettings(url=server.url, database=server.database)
            cells = {c: load_cell(ROOT / f"firmware_configs/cells/{c}.yaml") for c in CELLS}
            t0 = time.perf_counter()
            for cfg in cells.values():
                fill(cfg, settings)

            async def balance() -> None:
                async with InfluxEngine(cells, settings) as engine:
                    for c in CELLS:
                        await engine.recompute(c, (START_S + 3600) * 1000, NOW_S * 1000)

            asyncio.run(balance())
            console.print(f"two simulated days of {', '.join(CELLS)} stored and balanced in "
                          f"{time.perf_counter() - t0:.1f} s")
            results = [("cached (60 s), as served", run(server.url, 60.0, args.requests, args.concurrency, args.seconds)),
                       ("no cache (concurrent askers share a query)", run(server.url, 0.0, max(200, args.requests // 10),
                                                                args.concurrency, args.seconds))]
        finally:
            server.stop()
    table = Table(title=f"GET /api/public/cells/<cell>/summary, {args.concurrency} concurrent clients, loopback, "
                        f"uvicorn (1 worker) + InfluxDB 1.x")
    for col in ("run", "requests", "errors", "requests/s", "p50 ms", "p99 ms", "max ms", "first (cold) ms"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in results:
        table.add_row(name, f"{r['requests']:.0f}", f"{r['errors']:.0f}", f"{r['rps']:.0f}", f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}", f"{r['cold_ms']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
