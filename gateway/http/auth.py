"""How a caller's key travels at the HTTP edge (`Authorization: Bearer`, or an API's own header such as
Anthropic's `x-api-key`); the checks are `ModelAccess`'s."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

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


def presented_key(headers: Mapping[str, str], api_key_header: str | None = None) -> str:
    """The key in `Authorization: Bearer`, else in the API's own key header (`x-api-key`) if it has one."""
    authorization = headers.get("authorization")
    if authorization is None and api_key_header is not None:
        key = (headers.get(api_key_header) or "").strip()
        if key:
            return key
        raise AuthenticationFailed(
            f"missing API key: send `{api_key_header}: sk-sb-...` or `Authorization: Bearer sk-sb-...` "
            "(create one with `switchboard keys create`)"
        )
    return bearer_token(authorization)


async def authenticate(access: ModelAccess, authorization: str | None, *, now: dt.datetime) -> KeyIdentity:
    return await access.authenticate(bearer_token(authorization), now=now)


def authenticate_admin(access: ModelAccess, authorization: str | None) -> None:
    access.authenticate_admin(bearer_token(authorization))
