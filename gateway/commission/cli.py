"""`kwwk commission` subcommands (see the module docstrings of the commands)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Commissioning on site: scan a bus, probe a device, verify a gateway, write a report.", no_args_is_help=True, epilog="Example: kwwk commission scan --host 192.168.1.50")
