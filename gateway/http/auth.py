"""Who may call what: team-key authentication, the admin key, and model access.

A team's models come from SQL (synced from `[teams.*]` in config at start); a key may narrow them further.
Keys are resolved through `KeyStore`'s cache, so authentication costs no SQL query on the hot path.
"""

from __future__ import annotations

import datetime as dt
import hmac

from gateway.errors import AdminOnly, AuthenticationFailed, ModelNotFound, PermissionDenied
from gateway.records import KeyIdentity
from gateway.services import Services
from gateway.store.keys import check_usable

KEY_PREFIX = "sk-sb-"


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


async def authenticate(svc: Services, authorization: str | None, *, now: dt.datetime) -> KeyIdentity:
    token = bearer_token(authorization)
    if not token.startswith(KEY_PREFIX):
        raise AuthenticationFailed("invalid API key: Switchboard keys start with `sk-sb-`")
    identity = await svc.keys.resolve(token)
    if identity is None:
        raise AuthenticationFailed("invalid API key: no such key (create one with `switchboard keys create`)")
    check_usable(identity, now=now)
    return identity


def authenticate_admin(svc: Services, authorization: str | None) -> None:
    token = bearer_token(authorization)
    if svc.admin_key is None:
        raise AdminOnly(
            f"the admin API is disabled: set the environment variable {svc.config.server.admin_key_env} "
            "(config: server.admin_key_env) and restart"
        )
    if not hmac.compare_digest(token.encode(), svc.admin_key.encode()):
        raise AdminOnly("this endpoint needs the admin key; team keys cannot use /admin")


async def allowed_models(svc: Services, identity: KeyIdentity) -> list[str]:
    """Public model names this key may use, in config order."""
    team_models = await svc.keys.team_models(identity.team)
    out = []
    for name in svc.config.models:
        if team_models is not None and name not in team_models and "*" not in team_models:
            continue
        if identity.models is not None and name not in identity.models:
            continue
        out.append(name)
    return out


async def check_model(svc: Services, identity: KeyIdentity, model: str) -> None:
    allowed = await allowed_models(svc, identity)
    if model in allowed:
        return
    listing = ", ".join(allowed) or "none"
    if model not in svc.config.models:
        raise ModelNotFound(f"model `{model}` does not exist; available: {listing}", param="model")
    team_models = await svc.keys.team_models(identity.team)
    if team_models is not None and "*" not in team_models and model not in team_models:
        raise PermissionDenied(
            f"model `{model}` is not allowed for team `{identity.team}`; allowed: {listing} "
            f"(config: teams.{identity.team}.models)",
            param="model",
        )
    raise PermissionDenied(
        f"model `{model}` is not allowed for key {identity.display_prefix}...; allowed: {listing} "
        "(the key's model list is set by `switchboard keys create --models`)",
        param="model",
    )
