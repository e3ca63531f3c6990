"""Simulated history for the demo: the last hours of each cell, written as the collector would have stored
them, so the residents' page, the balances and the dashboards have numbers from the first minute.

The live simulator then continues from the very same site state, so no counter jumps at the seam.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from collector.balance.wiring import InfluxEngine
from collector.lineprotocol import Row, encode
from collector.storage import InfluxSettings, V1Writer
from edge.cell import CellConfig
from edge.sim import Site

__all__ = ["backfill"]

STEP_S = 60  # one reading per device and minute: enough for 15-minute balances


def _rows(cfg: CellConfig, site: Site, t: int) -> list[Row]:
    """Every published numeric point of every simulated device at t, in the collector's schema."""
    out: list[Row] = []
    for gw, dev in cfg.devices():
        state = site.state.get(dev.id)
        if state is None:
            continue
        fields = {p.name: float(state[p.name]) for p in cfg.published_points(dev) if p.numeric and p.name in state}
        if fields:
            out.append((cfg.profiles[dev.id].device_class,
                        (("cell", cfg.cell.id), ("gateway", gw.id), ("device", dev.id)), t * 1000, fields))
    return out


async def backfill(cells: Iterable[CellConfig], influx: InfluxSettings, hours: float,
                   progress: Callable[[str], None] | None = None) -> dict[str, Site]:
    """Run each cell's site over the last `hours`, store its readings and balances; return the sites, advanced
    to now, for the live simulator to carry on from."""
    end = int(time.time()) // STEP_S * STEP_S
    start = end - int(hours * 3600) // STEP_S * STEP_S
    writer = V1Writer(influx)
    sites: dict[str, Site] = {}
    try:
        for cfg in cells:
            if progress:
                progress(f"simulating the last {hours:g} h of {cfg.cell.name}")
            site = Site(cfg, start)
            rows: list[Row] = []
            for t in range(start, end + 1, STEP_S):
                site.advance(t)
                rows += _rows(cfg, site, t)
                if len(rows) >= 5000:
                    writer.write(encode(rows))
                    rows = []
            writer.write(encode(rows))
            sites[cfg.cell.id] = site
    finally:
        writer.close()
    async with InfluxEngine({c.cell.id: c for c in cells}, influx) as engine:
        for cell in sites:
            if progress:
                progress(f"balancing the history of {cell}")
            await engine.recompute(cell, start * 1000, end * 1000)
    return sites
