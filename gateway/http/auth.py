"""How a caller's key travels at the HTTP edge (`Authorization: Bearer`); the checks are `ModelAccess`'s."""

from __future__ import annotations

import datetime as dt

from gateway.errors import AuthenticationFailed
from gateway.pipeline.access import ModelAccess
from gateway.records import KeyIdentity


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "missing API key: send `Authorization: Bearer sk-sb-...` "
            "(create one with `switchboard keys create`)"
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("malformed Authorization header: use `Authorization: Bearer sk-sb-...`")
    return token


async def authenticate(access: ModelAccess, authorization: str | None, *, now: dt.datetime) -> KeyIdentity:
    return await access.authenticate(bearer_token(authorization), now=now)


def authenticate_admin(access: ModelAccess, authorization: str | None) -> None:
    access.authenticate_admin(bearer_token(authorization))
