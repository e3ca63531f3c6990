"""`kwwk dashboards`: build the Grafana dashboards from the cell registry, and push them to a Grafana.

Imports stay inside the commands: a gateway install has neither grafana-foundation-sdk nor httpx.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from dashboards.folders import JSON_DIR
from edge.errors import cli_errors, fail

app = typer.Typer(help="Grafana dashboards as code, built from the cell registry.", no_args_is_help=True,
                  epilog="Example: kwwk dashboards build && kwwk dashboards push --url http://grafana:3000")

CellsOpt = Annotated[Path, typer.Option("--cells", help="folder of cell config files", envvar="KWWK_CELLS")]
DirOpt = Annotated[Path, typer.Option("--dir", help="where the dashboard JSON lives (one folder per Grafana folder)")]


@app.command("build", epilog="Example: kwwk dashboards build --cells firmware_configs/cells   "
                             "(CI: kwwk dashboards build --check)")
def build(
    cells: CellsOpt = Path("firmware_configs/cells"),
    out: DirOpt = JSON_DIR,
    datasource: Annotated[str, typer.Option(help="uid of the InfluxDB (InfluxQL) datasource the panels query; "
                                                 "kwwk-influxdb-v1 for InfluxDB 1.x")] = "kwwk-influxdb",
    check: Annotated[bool, typer.Option("--check", help="write nothing; exit 1 when the files are out of date")] = False,
) -> None:
    """Build every dashboard (per cell: balance and devices; fleet health; alliance) and write the JSON."""
    from dashboards.build import build_all, write_all
    from edge.cell import load_cells

    with cli_errors():
        registry = load_cells(cells)
    report = write_all(build_all(registry, datasource), out, check=check)
    verb = "would write" if check else "wrote"
    for path in report.written:
        typer.echo(f"{verb} {out / path}")
    for path in report.removed:
        typer.echo(f"{'would remove' if check else 'removed'} {out / path}")
    typer.echo(f"{len(report.written)} written, {len(report.unchanged)} unchanged, {len(report.removed)} removed"
               + (" (check: nothing changed on disk)" if check else ""))
    if check and report.changed:
        fail("dashboards/json is out of date: run `kwwk dashboards build`", code=1)


@app.command("push", epilog="Example: kwwk dashboards push --url https://grafana.example   (token in KWWK_GRAFANA_TOKEN)")
def push(
    url: Annotated[str, typer.Option(envvar="KWWK_GRAFANA_URL", help="Grafana base URL")] = "http://127.0.0.1:3000",
    token_file: Annotated[Path | None, typer.Option(help="file holding a service-account token (Editor role); "
                                                         "or set KWWK_GRAFANA_TOKEN")] = None,
    directory: DirOpt = JSON_DIR,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="compare only; change nothing on the server")] = False,
) -> None:
    """Upload the built dashboards to a running Grafana (HTTP API, token auth) and report what changed."""
    import httpx

    from dashboards.folders import load_dir
    from dashboards.grafana import GrafanaError
    from dashboards.grafana import push as do_push

    token = os.environ.get("KWWK_GRAFANA_TOKEN")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            fail(f"cannot read the token file {token_file}: {err.strerror}")
    if not token:
        fail("no token: set KWWK_GRAFANA_TOKEN or pass --token-file (never the token itself on the command line)")
    dashboards = load_dir(directory)
    if not dashboards:
        fail(f"no dashboards under {directory}: run `kwwk dashboards build` first")
    try:
        with cli_errors(GrafanaError):
            report = do_push(dashboards, url, token, dry_run=dry_run)
    except httpx.HTTPError as err:  # unreachable, TLS, timeouts
        fail(f"cannot reach Grafana at {url}: {err}")
    for line in report.lines():
        typer.echo(line)
    if dry_run:
        typer.echo("dry run: nothing was changed on the server")
