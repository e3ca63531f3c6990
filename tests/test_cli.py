"""Every `kwwk` command and subcommand explains itself with an example."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from kwwk.cli import app

runner = CliRunner()


def _paths() -> list[list[str]]:
    cli = get_command(app)
    paths: list[list[str]] = [[]]
    for name, cmd in cli.commands.items():  # type: ignore[attr-defined]
        paths.append([name])
        for sub in getattr(cmd, "commands", {}):
            paths.append([name, sub])
    return paths


@pytest.mark.parametrize("path", _paths(), ids=lambda p: " ".join(p) or "kwwk")
def test_help_shows_an_example(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example: kwwk" in result.output
