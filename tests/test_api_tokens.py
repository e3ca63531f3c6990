"""Operator tokens: created by `kwwk api token create` and shown once, stored only as a SHA-256, checked on
every operator request, revoked without a restart; public endpoints and the page need none."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from collector.api.app import ApiSettings, create_app
from collector.api.tokens import TokenError, TokenStore, create_token, issue_token, read_tokens, revoke_token
from collector.api.tokens_cli import app as token_cli
from collector.registry import Registry
from collector.storage import InfluxSettings
from tests.conftest import CELLS
from tests.helpers import wait_for


def test_create_prints_the_token_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    tokens = tmp_path / "var" / "api-tokens"
    result = CliRunner().invoke(token_cli, ["create", "--name", "leitstelle", "--tokens-file", str(tokens)])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[0]
    assert token.startswith("kwwk_") and len(token) >= 40
    text = tokens.read_text()
    assert token not in text
    assert f"leitstelle\tsha256:{hashlib.sha256(token.encode()).hexdigest()}\t" in text
    assert stat.S_IMODE(os.stat(tokens).st_mode) == 0o600

    listed = CliRunner().invoke(token_cli, ["list", "--tokens-file", str(tokens)])
    assert listed.exit_code == 0 and "leitstelle" in listed.stdout and "sha256" not in listed.stdout

    again = CliRunner().invoke(token_cli, ["create", "--name", "leitstelle", "--tokens-file", str(tokens)])
    assert again.exit_code == 2 and "a token named 'leitstelle' exists" in again.output
    bad = CliRunner().invoke(token_cli, ["create", "--name", "no spaces", "--tokens-file", str(tokens)])
    assert bad.exit_code == 2 and "token name 'no spaces'" in bad.output

    revoked = CliRunner().invoke(token_cli, ["revoke", "--name", "leitstelle", "--tokens-file", str(tokens)])
    assert revoked.exit_code == 0 and read_tokens(tokens) == []
    missing = CliRunner().invoke(token_cli, ["revoke", "--name", "leitstelle", "--tokens-file", str(tokens)])
    assert missing.exit_code == 2 and "no token named 'leitstelle'" in missing.output


def test_the_store_follows_the_file_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "api-tokens"
    store = TokenStore(path, recheck_s=0)
    assert not store.configured and store.verify("kwwk_anything") is None
    a = create_token(path, "a")
    b = create_token(path, "b")
    assert (store.verify(a), store.verify(b)) == ("a", "b")
    assert store.verify(a + "x") is None and store.verify("") is None and store.verify(a[5:]) is None
    revoke_token(path, "a")
    assert store.verify(a) is None and store.verify(b) == "b"
    path.write_text("b\tnot-a-hash\n")  # a broken file admits nobody, and says why
    assert store.verify(b) is None and "expected 'name<TAB>sha256" in (store.error or "")
    with pytest.raises(TokenError, match="api-tokens:1"):
        read_tokens(path)


def test_issue_token_replaces_one_of_the_same_name_and_can_keep_a_copy(tmp_path: Path) -> None:
    path, copy = tmp_path / "api-tokens", tmp_path / "operator-token"
    first = issue_token(path, "demo")
    second = issue_token(path, "demo", save_to=copy)
    store = TokenStore(path)
    assert store.verify(first) is None and store.verify(second) == "demo"
    assert copy.read_text().strip() == second and stat.S_IMODE(os.stat(copy).st_mode) == 0o600


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # no database behind it: these routes answer from the registry, or refuse before any query
    tokens = tmp_path / "api-tokens"
    app = create_app(Registry.from_dir(CELLS), ApiSettings(InfluxSettings(url="http://127.0.0.1:9"), tokens_file=tokens,
                                                          watch_status=False))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    client.tokens = tokens  # type: ignore[attr-defined]
    yield client
    await client.aclose()


async def test_operator_endpoints_need_a_valid_token(client: httpx.AsyncClient) -> None:
    tokens: Path = client.tokens  # type: ignore[attr-defined]
    r = await client.get("/api/cells")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "no API tokens are configured: create one with `kwwk api token create" in r.json()["detail"]
    token = create_token(tokens, "leitstelle")

    async def answer_is(check: Callable[[httpx.Response], bool], headers: dict[str, str] | None = None) -> bool:
        return check(await client.get("/api/cells", headers=headers))

    # the API re-reads the file when it changed, at most once a second: the new token counts within that
    await wait_for(lambda: answer_is(lambda r: "send 'Authorization" in r.text), 1.1,
                   "the API to notice that tokens exist", interval=0.05)
    r = await client.get("/api/cells")
    assert r.status_code == 401 and "send 'Authorization: Bearer <token>'" in r.json()["detail"]
    for bad in ("Bearer kwwk_wrong", f"Basic {token}", token, "Bearer "):
        r = await client.get("/api/cells", headers={"Authorization": bad})
        assert r.status_code == 401, bad
    ok = await client.get("/api/cells", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and {c["id"] for c in ok.json()} == {"lindenau", "musterdorf"}
    revoke_token(tokens, "leitstelle")
    await wait_for(lambda: answer_is(lambda r: r.status_code == 401, {"Authorization": f"Bearer {token}"}), 1.1,
                   "the revocation to take effect (within a second)", interval=0.05)
    r = await client.get("/api/cells", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API token"


async def test_every_operator_route_is_protected_and_the_spec_says_so(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["OperatorToken"] == {
        "type": "http", "scheme": "bearer", "description": "An operator token from `kwwk api token create --name <you>`"}
    for path, ops in spec["paths"].items():
        for op in ops.values():
            public = op["tags"][0] in ("public", "ops")
            assert bool(op.get("security")) is not public, path
            if not public:
                url = path.replace("{cell}", "musterdorf")
                r = await client.get(url, params={"from": "2026-11-01", "to": "2026-11-02", "device": "grid"})
                assert r.status_code == 401, url


def test_api_run_takes_the_tokens_file_the_broker_account_and_the_proxy() -> None:
    from kwwk.cli import app

    result = CliRunner().invoke(app, ["api", "run", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    for option in ("--tokens-file", "--mqtt-username", "--mqtt-password-file", "--mqtt-tls", "--public-rate",
                   "--forwarded-allow-ips"):
        assert option in result.output, option
