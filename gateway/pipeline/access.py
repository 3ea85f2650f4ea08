"""Who may call what: team keys, the admin key, and model access; the pipeline's first step.

A team's models come from SQL (synced from `[teams.*]` in config at start); a key may narrow them further.
Keys are resolved through `KeyStore`'s cache, so authentication costs no SQL query on the hot path. How a
key travels (an `Authorization` header, Anthropic's `x-api-key`) is the HTTP edge's business, not this one's.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Sequence

from gateway.errors import AdminOnly, AuthenticationFailed, ModelNotFound, PermissionDenied
from gateway.records import KeyIdentity
from gateway.store.keys import KeyStore, check_usable

KEY_PREFIX = "sk-sb-"


class ModelAccess:
    """Key and model checks over the key store and the configured public model names (in config order)."""

    def __init__(
        self, keys: KeyStore, models: Sequence[str], *, admin_key: str | None, admin_key_env: str
    ) -> None:
        self.keys, self.models = keys, tuple(models)
        self._model_set = frozenset(self.models)
        self._admin_key, self._admin_key_env = admin_key, admin_key_env

    async def authenticate(self, token: str, *, now: dt.datetime) -> KeyIdentity:
        if not token.startswith(KEY_PREFIX):
            raise AuthenticationFailed("invalid API key: Switchboard keys start with `sk-sb-`")
        identity = await self.keys.resolve(token)
        if identity is None:
            raise AuthenticationFailed(
                "invalid API key: no such key (create one with `switchboard keys create`)"
            )
        check_usable(identity, now=now)
        return identity

    def authenticate_admin(self, token: str) -> None:
        if self._admin_key is None:
            raise AdminOnly(
                f"the admin API is disabled: set the environment variable {self._admin_key_env} "
                "(config: server.admin_key_env) and restart"
            )
        if not hmac.compare_digest(token.encode(), self._admin_key.encode()):
            raise AdminOnly("this endpoint needs the admin key; team keys cannot use /admin")

    async def allowed_models(self, identity: KeyIdentity) -> list[str]:
        """Public model names this key may use, in config order."""
        team_models = await self.keys.team_models(identity.team)
        return [name for name in self.models if _may_use(name, team_models, identity)]

    async def check_model(self, identity: KeyIdentity, model: str) -> None:
        if model in self._model_set and _may_use(model, await self.keys.team_models(identity.team), identity):
            return  # `model in allowed_models(identity)`, without building the list (the usual case)
        allowed = await self.allowed_models(identity)
        if model in allowed:
            return
        listing = ", ".join(allowed) or "none"
        if model not in self.models:
            raise ModelNotFound(f"model `{model}` does not exist; available: {listing}", param="model")
        team_models = await self.keys.team_models(identity.team)
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


def _may_use(model: str, team_models: frozenset[str] | None, identity: KeyIdentity) -> bool:
    """Whether the team's models (None: all) and the key's own list (None: the team's) both allow `model`."""
    if team_models is not None and model not in team_models and "*" not in team_models:
        return False
    return identity.models is None or model in identity.models
