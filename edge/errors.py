"""One base for the errors a person can fix (a config file, a setting, a message), and one way a command reports them.

    with cli_errors():                 # "error: <message>" in red on stderr, exit code 2
        cfg = load_cell(path)

Every command of `kwwk` reports such errors the same way; a traceback is left for bugs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

__all__ = ["KwwkError", "SettingsError", "cli_errors", "fail"]


class KwwkError(Exception):
    """An error whose message tells the user what to fix; commands print it without a traceback."""


class SettingsError(KwwkError, ValueError):
    """A setting from the command line, the environment or an env file cannot be used; the message names where."""


def fail(message: object, code: int = 2) -> NoReturn:
    """Print "error: <message>" in red on stderr and leave the command with `code`."""
    import typer

    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def cli_errors(*also: type[Exception], code: int = 2) -> Iterator[None]:
    """Report a KwwkError (and the exception types in `also`, e.g. LookupError for an unknown id) as fail() does."""
    try:
        yield
    except (KwwkError, *also) as err:
        fail(err, code)
