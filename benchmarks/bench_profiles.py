"""Requests per full read, merged against one request per point, and decoded values per second.

Every profile in edge/profiles is served by a real pymodbus TCP server, in a separate process, as
its own unit id with a synthetic register image (plausible values for its points, zeros between
them). The engine reads each device in full, repeatedly, first with the read planner's merged plan,
then one request per point, and checks that both give the same values.

    python benchmarks/bench_profiles.py [--seconds 1.0] [--profile ID ...]

Runs in well under a minute for the whole library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.modbus import DeviceReader, LineSpec, ModbusLine
from edge.planner import plan, plan_single
from edge.profile import Profile, get_profile, profile_ids
from edge.sim.image import Image, image_for, synthetic_values
from edge.sim.modbus_server import SimServer
from edge.sim.ports import reserve_port

TOTAL_BUDGET = 30.0  # seconds of reading, at most, across all profiles and both modes


@dataclass
class Row:
    profile: str
    points: int = 0
    merged: int = 0
    single: int = 0
    merged_reads_s: float = 0.0
    merged_values_s: float = 0.0
    single_values_s: float = 0.0
    check: str = ""


def serve(units: dict[int, Image], port: int) -> None:
    """Child process: serve the images until terminated."""

    async def main() -> None:
        async with SimServer(units, port=port):
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def wait_for_port(port: int, proc: mp.process.BaseProcess, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise SystemExit("the benchmark server process died")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("the benchmark server did not start")


async def measure(reader: DeviceReader, seconds: float) -> tuple[int, int, float, dict]:
    """Full reads for about `seconds`: (reads, decoded values, elapsed, last values)."""
    reads = values = 0
    last: dict = {}
    t0 = time.perf_counter()
    while True:
        result = await reader.read()
        reads += 1
        values += len(result.values)
        last = result.values
        if result.errors:
            first = next(iter(result.errors.items()))
            raise RuntimeError(f"{reader.profile.id}: {first[0]}: {first[1]}")
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return reads, values, elapsed, last


async def bench(profiles: list[Profile], port: int, seconds: float) -> list[Row]:
    line = ModbusLine(LineSpec(kind="tcp", host="127.0.0.1", port=port, timeout=2.0, retries=0))
    rows = []
    try:
        for unit, prof in enumerate(profiles, start=1):
            row = Row(prof.id, points=len(prof.points), merged=len(plan(prof)), single=len(plan_single(prof)))
            merged = DeviceReader(line, prof, unit)
            single = DeviceReader(line, prof, unit)
            # a break at every point: the per-point baseline, through the same reader code
            single.learn((p.table, prof.wire(p)) for p in prof.points)
            assert len(single.plan_for(prof.points)) == row.single
            try:
                n, v, dt, got_merged = await measure(merged, seconds)
                row.merged_reads_s, row.merged_values_s = n / dt, v / dt
                _, v, dt, got_single = await measure(single, seconds)
                row.single_values_s = v / dt
                if merged.breaks:
                    row.check = f"device refused merges ({len(merged.breaks)} breaks learnt)"
                elif got_merged != got_single:
                    row.check = "values differ"
                else:
                    row.check = "ok"
            except Exception as err:  # noqa: BLE001 - one bad profile must not hide the others
                row.check = f"error: {err}"[:60]
            rows.append(row)
    finally:
        await line.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=None, help="reading time per profile and mode")
    ap.add_argument("--profile", action="append", help="only these profile ids")
    args = ap.parse_args()
    console = Console()
    started = time.perf_counter()

    profiles: list[Profile] = []
    broken: list[Row] = []
    for pid in args.profile or profile_ids():
        try:
            profiles.append(get_profile(pid))
        except Exception as err:  # noqa: BLE001 - profiles are work in progress elsewhere
            broken.append(Row(pid, check=f"does not load: {str(err).splitlines()[0]}"[:60]))
    if len(profiles) > 247:
        raise SystemExit("more profiles than unit ids")
    seconds = args.seconds or max(0.2, min(1.5, TOTAL_BUDGET / max(1, 2 * len(profiles))))

    units = {u: image_for(p, synthetic_values(p)) for u, p in enumerate(profiles, start=1)}
    port = reserve_port()  # held by this process; the server process binds it
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=serve, args=(units, port), daemon=True)
    proc.start()
    try:
        wait_for_port(port, proc)
        rows = asyncio.run(bench(profiles, port, seconds))
    finally:
        proc.terminate()
        proc.join(5)

    table = Table(title=f"Full reads against a pymodbus TCP server in another process ({seconds:.2f} s per mode)")
    table.add_column("profile")
    table.add_column("points", justify="right")
    table.add_column("requests merged", justify="right")
    table.add_column("requests per point", justify="right")
    table.add_column("saved", justify="right")
    table.add_column("reads/s merged", justify="right")
    table.add_column("values/s merged", justify="right")
    table.add_column("values/s per point", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("check")
    for r in [*rows, *broken]:
        if not r.points:
            table.add_row(r.profile, "", "", "", "", "", "", "", "", r.check)
            continue
        saved = 1 - r.merged / r.single if r.single else 0
        speedup = r.merged_values_s / r.single_values_s if r.single_values_s else 0
        table.add_row(r.profile, str(r.points), str(r.merged), str(r.single), f"{saved:.0%}",
                      f"{r.merged_reads_s:,.0f}", f"{r.merged_values_s:,.0f}", f"{r.single_values_s:,.0f}",
                      f"{speedup:.1f}x", r.check)
    if rows:
        tm = sum(r.merged for r in rows)
        ts = sum(r.single for r in rows)
        table.add_section()
        table.add_row("all", str(sum(r.points for r in rows)), str(tm), str(ts), f"{1 - tm / ts:.0%}" if ts else "",
                      "", "", "", "", "")
    console.print(table)
    console.print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
