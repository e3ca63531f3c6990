"""`kwwk balance` subcommands (see the module docstrings of the commands)."""

from __future__ import annotations

import typer

app = typer.Typer(help="The cell balance engine: interval energies and volumes, KWWK metrics, recompute.", no_args_is_help=True, epilog="Example: kwwk balance recompute --cell musterdorf --from 2026-11-01 --to 2026-11-02")
