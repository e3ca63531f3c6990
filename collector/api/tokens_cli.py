"""`kwwk api token` subcommands: create (prints the token once), list, revoke. The API re-reads the file
when it changes, so neither needs a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge.errors import cli_errors

DEFAULT_TOKENS_FILE = Path("var/api-tokens")
_EXAMPLE = "Example: kwwk api token create --name leitstelle"

app = typer.Typer(help="Operator API tokens (stored hashed; a token is shown once, when created).",
                  no_args_is_help=True, epilog=_EXAMPLE)
TokensFile = Annotated[Path, typer.Option("--tokens-file", envvar="KWWK_API_TOKENS_FILE",
                                          help="the API's tokens file (name, SHA-256, created)")]
Name = Annotated[str, typer.Option("--name", help="who or what uses the token, e.g. leitstelle or grafana")]


@app.command("create", epilog=_EXAMPLE)
def create(name: Name, tokens_file: TokensFile = DEFAULT_TOKENS_FILE) -> None:
    """Create a token and print it. Only its hash is stored: copy it now, it cannot be shown again."""
    from collector.api.tokens import TokenError, create_token

    with cli_errors(TokenError, OSError):
        token = create_token(tokens_file, name)
    typer.echo(token)
    typer.echo(f"token {name!r} added to {tokens_file}; send it as 'Authorization: Bearer <token>'. "
               "It is not stored and cannot be shown again.", err=True)


@app.command("list", epilog="Example: kwwk api token list")
def list_tokens(tokens_file: TokensFile = DEFAULT_TOKENS_FILE) -> None:
    """The names of the tokens and when they were created (never the tokens)."""
    from collector.api.tokens import TokenError, read_tokens

    with cli_errors(TokenError, OSError):
        entries = read_tokens(tokens_file)
    if not entries:
        typer.echo(f"no tokens in {tokens_file}")
    for e in entries:
        typer.echo(f"{e.name}\t{e.created}")


@app.command("revoke", epilog="Example: kwwk api token revoke --name leitstelle")
def revoke(name: Name, tokens_file: TokensFile = DEFAULT_TOKENS_FILE) -> None:
    """Remove a token: requests with it are refused from the next second on."""
    from collector.api.tokens import TokenError, revoke_token

    with cli_errors(TokenError, OSError):
        revoke_token(tokens_file, name)
    typer.echo(f"token {name!r} revoked")
