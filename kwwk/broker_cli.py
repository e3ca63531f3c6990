"""`kwwk broker` subcommands (see the module docstrings of the commands)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Broker security generated from the cell registry.", no_args_is_help=True, epilog="Example: kwwk broker acl --cells firmware_configs/cells --out var/broker")
