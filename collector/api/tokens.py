"""Operator API tokens, stored hashed in a small text file: one token per line, `name<TAB>sha256:<hex><TAB>created`.

A token is 32 random bytes (`kwwk_` + URL-safe base64), so a plain SHA-256 of it cannot be reversed or
guessed; a slow password hash (scrypt) would add nothing but CPU per request. The token itself is
shown once, when created, and never stored. The API re-reads the file when it changes, so a revoked
token stops working without a restart. A missing or empty file means no token is valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["PREFIX", "TokenEntry", "TokenError", "TokenStore", "create_token", "hash_token", "issue_token",
           "read_tokens", "revoke_token"]

PREFIX = "kwwk_"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class TokenError(ValueError):
    """The tokens file or a request to change it is unusable; the message says why."""


@dataclass(frozen=True)
class TokenEntry:
    name: str
    hash: str  # "sha256:<hex>"
    created: str


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def read_tokens(path: Path) -> list[TokenEntry]:
    """The entries of a tokens file ([] when it does not exist); blank lines and # comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries: list[TokenEntry] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not NAME.match(parts[0]) or not _HASH.match(parts[1]):
            msg = f"{path}:{n}: expected 'name<TAB>sha256:<64 hex digits><TAB>created'"
            raise TokenError(msg)
        entries.append(TokenEntry(parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    return entries


def _write(path: Path, entries: list[TokenEntry]) -> None:
    """Replace the file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "# KWWK API tokens: name, SHA-256 of the token, created (written by `kwwk api token`)\n" + "".join(
        f"{e.name}\t{e.hash}\t{e.created}\n" for e in entries)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_token(path: Path, name: str) -> str:
    """Add a token named `name` to the file and return it (the only time it is seen)."""
    if not NAME.match(name):
        msg = f"token name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit"
        raise TokenError(msg)
    entries = read_tokens(path)
    if any(e.name == name for e in entries):
        msg = f"a token named {name!r} exists in {path}; revoke it first (kwwk api token revoke --name {name})"
        raise TokenError(msg)
    token = PREFIX + secrets.token_urlsafe(32)
    created = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    _write(path, [*entries, TokenEntry(name, hash_token(token), created)])
    return token


def revoke_token(path: Path, name: str) -> None:
    entries = read_tokens(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        known = ", ".join(e.name for e in entries) or "none"
        msg = f"no token named {name!r} in {path}; tokens: {known}"
        raise TokenError(msg)
    _write(path, kept)


def issue_token(path: Path, name: str, save_to: Path | None = None) -> str:
    """A fresh token named `name` (replacing one of that name), optionally also written to `save_to` (0600).

    For the demo and tests: `kwwk demo` keeps its operator token in var/operator-token."""
    with contextlib.suppress(TokenError):
        revoke_token(path, name)
    token = create_token(path, name)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(save_to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when it existed with other permissions
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    return token


class TokenStore:
    """The valid tokens, re-read when the file changes (checked at most once a second)."""

    def __init__(self, path: Path | None, recheck_s: float = 1.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked: float | None = None
        self._hashes: dict[str, str] = {}  # hash → name
        self.error: str | None = None

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.path is None or (self._checked is not None and now - self._checked < self.recheck_s):
            return
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            except OSError as err:  # unreadable: nobody gets in until it is fixed
                self._hashes, self._stamp, self.error = {}, None, str(err)
                return
            if stamp == self._stamp:
                return
            try:
                entries = read_tokens(self.path)
                self.error = None
            except (TokenError, OSError, UnicodeDecodeError) as err:
                entries = []  # fail closed
                self.error = str(err)
            self._hashes = {e.hash: e.name for e in entries}
            self._stamp = stamp

    @property
    def configured(self) -> bool:
        self._refresh()
        return bool(self._hashes)

    def verify(self, token: str) -> str | None:
        """The name of the token, or None. Compares against every stored hash in constant time."""
        self._refresh()
        if not token.startswith(PREFIX) or len(token) > 200:
            return None
        presented = hash_token(token)
        found = None
        for stored, name in self._hashes.items():
            if hmac.compare_digest(stored, presented):
                found = name
        return found
