"""How long the balance engine takes for a day of readings at the demo's 5-second poll interval, on a real
InfluxDB 1.x: a full day's recompute, the 30-second rounds of live data, and a two-hour outbox replay.

Musterdorf's 16 metered counters are simulated for a day (Site.advance every 5 s, values as the site
states them), written in the collector's schema, then balanced.

    python benchmarks/bench_balance.py [--step 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.balance.timegrid import parse_time
from collector.balance.wiring import InfluxEngine
from collector.lineprotocol import Row, encode
from collector.storage import InfluxSettings, V1Writer
from edge.cell import load_cell
from edge.sim.site import Site
from kwwk.dev.localservers import InfluxDB1

ROOT = Path(__file__).resolve().parents[1]


def write_day(cfg, settings: InfluxSettings, day_ms: int, step_s: int) -> int:  # noqa: ANN001
    site = Site(cfg, day_ms / 1000 - 3600)
    gateway = {d.id: g.id for g, d in cfg.devices()}
    roles = [(d.id, p) for _, d in cfg.devices() for p in d.roles]
    writer = V1Writer(settings)
    rows: list[Row] = []
    n = 0
    for t in range(day_ms // 1000 - 3600, day_ms // 1000 + 25 * 3600 + 1, step_s):
        site.advance(t)
        fields: dict[str, dict[str, float]] = {}
        for device, point in roles:
            fields.setdefault(device, {})[point] = site.state[device][point]
            n += 1
        rows += [(cfg.profiles[d].device_class, (("cell", cfg.cell.id), ("gateway", gateway[d]), ("device", d)),
                  t * 1000, f) for d, f in fields.items()]
        if len(rows) >= 20_000:
            writer.write(encode(rows))
            rows = []
    writer.write(encode(rows))
    writer.close()
    return n


async def measure(cfg, settings: InfluxSettings, day_ms: int) -> list[tuple[str, float, str]]:  # noqa: ANN001
    out = []
    async with InfluxEngine({cfg.cell.id: cfg}, settings) as engine:
        t0 = time.perf_counter()
        report = await engine.recompute(cfg.cell.id, day_ms, day_ms + 86_400_000)
        out.append(("recompute one day", time.perf_counter() - t0, report.summary()))
        t0 = time.perf_counter()
        report = await engine.recompute(cfg.cell.id, day_ms, day_ms + 86_400_000)
        out.append(("recompute it again (idempotent)", time.perf_counter() - t0, f"{report.rows} rows rewritten"))
        live = day_ms + 14 * 3_600_000
        t0 = time.perf_counter()
        rounds = 20
        for i in range(rounds):  # what the collector's 30 s rounds recompute during the afternoon
            report = await engine.recompute_touched(cfg.cell.id, live + i * 30_000, live + (i + 1) * 30_000 - 1)
        out.append(("live round (30 s of readings)", (time.perf_counter() - t0) / rounds,
                    f"recomputes {(report.end_ms - report.start_ms) // 900_000} intervals + roll-ups"))
        t0 = time.perf_counter()
        report = await engine.recompute_touched(cfg.cell.id, day_ms + 8 * 3_600_000, day_ms + 10 * 3_600_000)
        out.append(("outbox replay of 2 hours", time.perf_counter() - t0,
                    f"recomputes {(report.end_ms - report.start_ms) // 900_000} intervals + roll-ups"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=5, help="seconds between readings (the poll interval)")
    args = parser.parse_args()
    cfg = load_cell(ROOT / "firmware_configs/cells/musterdorf.yaml")
    day_ms = parse_time("2026-11-02", ZoneInfo(cfg.cell.timezone))
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        server = InfluxDB1(Path(tmp) / "influxdb").start()
        try:
            settings = InfluxSettings(url=server.url, database=server.database)
            t0 = time.perf_counter()
            n = write_day(cfg, settings, day_ms, args.step)
            console.print(f"simulated and stored {n:,} readings ({args.step} s poll) in {time.perf_counter() - t0:.1f} s")
            results = asyncio.run(measure(cfg, settings, day_ms))
        finally:
            server.stop()
    table = Table(title=f"balance engine, musterdorf, {args.step}-second readings, InfluxDB 1.x")
    table.add_column("operation")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for name, seconds, note in results:
        table.add_row(name, f"{seconds:.3f}", note)
    console.print(table)


if __name__ == "__main__":
    main()
