"""`kwwk balance` subcommands (see the module docstrings of the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge.errors import cli_errors, fail

app = typer.Typer(help="The cell balance engine: interval energies and volumes, KWWK metrics, recompute.", no_args_is_help=True, epilog="Example: kwwk balance recompute --cell musterdorf --from 2026-11-01 --to 2026-11-02")

_EXAMPLE = ("Example: kwwk balance recompute --cell musterdorf --from 2026-11-01 --to 2026-11-02 "
            "--influx-url http://127.0.0.1:8086")


@app.command("recompute", epilog=_EXAMPLE)
def recompute(
    cell: Annotated[list[str], typer.Option("--cell", help="cell id (repeat for several)")],
    start: Annotated[str, typer.Option("--from", help="start: a date (local midnight of the cell), an ISO time, "
                                                     "or epoch ms")],
    end: Annotated[str, typer.Option("--to", help="end (exclusive), same forms as --from")],
    cells: Annotated[Path, typer.Option("--cells", help="folder of cell config files",
                                        envvar="KWWK_CELLS")] = Path("firmware_configs/cells"),
    influx_url: Annotated[str, typer.Option("--influx-url", envvar="KWWK_INFLUX_URL")] = "http://127.0.0.1:8086",
    influx_api: Annotated[str, typer.Option("--influx-api", envvar="KWWK_INFLUX_API", help="v1 (/write) or v2")] = "v1",
    influx_db: Annotated[str, typer.Option("--influx-db", envvar="KWWK_INFLUX_DB",
                                           help="v1 database / v2 bucket")] = "kwwk",
    influx_token: Annotated[str | None, typer.Option("--influx-token", envvar="KWWK_INFLUX_TOKEN")] = None,
    influx_org: Annotated[str, typer.Option("--influx-org", envvar="KWWK_INFLUX_ORG")] = "kwwk",
) -> None:
    """Recompute the balance of cells over a time range from the stored readings (15-minute intervals,
    widened to whole intervals) and roll up the hours, days and months it touches. Safe to repeat."""
    import asyncio
    from zoneinfo import ZoneInfo

    from collector.balance.engine import UnknownCell
    from collector.balance.spec import BalanceConfigError
    from collector.balance.timegrid import TimeRangeError, parse_time
    from collector.balance.wiring import InfluxEngine
    from collector.query import QueryError
    from collector.storage import InfluxSettings, StorageError
    from edge.cell import load_cells

    with cli_errors():
        configs = load_cells(cells)
    unknown = [c for c in cell if c not in configs]
    if unknown:
        fail(f"unknown cell {unknown[0]!r}; known cells: {', '.join(sorted(configs))}")
    ranges: dict[str, tuple[int, int]] = {}
    with cli_errors(TimeRangeError):
        for c in cell:
            tz = ZoneInfo(configs[c].cell.timezone)
            a, b = parse_time(start, tz), parse_time(end, tz)
            if b <= a:
                fail(f"--to ({end}) must be after --from ({start})")
            ranges[c] = (a, b)
    settings = InfluxSettings(url=influx_url, api="v2" if influx_api == "v2" else "v1", database=influx_db,
                              bucket=influx_db, token=influx_token, org=influx_org)

    async def run() -> None:
        async with InfluxEngine(configs, settings) as engine:
            for c, (a, b) in ranges.items():
                report = await engine.recompute(c, a, b)
                typer.echo(report.summary())

    with cli_errors(QueryError, StorageError, BalanceConfigError, UnknownCell, TimeRangeError):
        asyncio.run(run())
