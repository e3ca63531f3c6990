"""Operator authentication: `Authorization: Bearer <token>`, checked against the hashed tokens file.

    router = APIRouter(dependencies=[Depends(operator_auth(store))])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from collector.api.tokens import TokenStore

__all__ = ["operator_auth"]

_bearer = HTTPBearer(auto_error=False, scheme_name="OperatorToken",
                     description="An operator token from `kwwk api token create --name <you>`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def operator_auth(store: TokenStore) -> Callable[..., Awaitable[str]]:
    """A dependency that admits requests carrying a valid token, and names the token's owner."""

    async def require_operator(request: Request,
                               creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
        if creds is None or creds.scheme.lower() != "bearer":
            hint = ("no API tokens are configured: create one with `kwwk api token create --name <you>`"
                    if not store.configured else "send 'Authorization: Bearer <token>'")
            raise HTTPException(401, f"this endpoint needs an operator token: {hint}", headers=_CHALLENGE)
        name = store.verify(creds.credentials)
        if name is None:
            raise HTTPException(401, "invalid or revoked API token", headers=_CHALLENGE)
        request.state.operator = name
        return name

    return require_operator
