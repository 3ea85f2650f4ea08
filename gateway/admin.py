"""`/admin/...`: teams and keys, guarded by the admin key from the environment (never by a team key).

Admin operations are synchronous SQL; they run in a worker thread so the event loop keeps serving traffic.
A revoke also drops the key from this process's cache at once; other replicas follow within the cache TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway import keys
from gateway.access import authenticate_admin
from gateway.errors import NotFound
from gateway.services import Services

_HIDDEN = {"key_hash"}


def _svc(request: Request) -> Services:
    svc: Services = request.app.state.services
    authenticate_admin(svc, request.headers.get("authorization"))
    return svc


def _json(value: Any, status_code: int = 200) -> Response:
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {k: v for k, v in dataclasses.asdict(obj).items() if k not in _HIDDEN}
        if isinstance(obj, frozenset | set):
            return sorted(obj)
        raise TypeError(type(obj).__name__)

    return Response(
        orjson.dumps(value, default=plain), status_code=status_code, media_type="application/json"
    )


class TeamIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[str] | None = None


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    team: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=128)
    models: list[str] | None = None
    expires_at: dt.datetime | None = None
    expires_in_days: float | None = Field(default=None, gt=0)

    def expiry(self) -> dt.datetime | None:
        if self.expires_at is not None:
            return self.expires_at if self.expires_at.tzinfo else self.expires_at.replace(tzinfo=dt.UTC)
        if self.expires_in_days is not None:
            return dt.datetime.now(dt.UTC) + dt.timedelta(days=self.expires_in_days)
        return None


def admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.get("/teams")
    async def list_teams(svc: Services = Depends(_svc)) -> Response:
        return _json({"data": await asyncio.to_thread(keys.list_teams, svc.db)})

    @router.post("/teams")
    async def create_team(body: TeamIn, svc: Services = Depends(_svc)) -> Response:
        team = await asyncio.to_thread(keys.create_team, svc.db, body.name, body.models)
        return _json(team, status_code=201)

    @router.get("/keys")
    async def list_keys(team: str | None = None, svc: Services = Depends(_svc)) -> Response:
        return _json({"data": await asyncio.to_thread(keys.list_keys, svc.db, team)})

    @router.post("/keys")
    async def create_key(body: KeyIn, svc: Services = Depends(_svc)) -> Response:
        created = await asyncio.to_thread(
            keys.create_key, svc.db, body.team, name=body.name, models=body.models, expires_at=body.expiry()
        )
        return _json(created, status_code=201)

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, svc: Services = Depends(_svc)) -> Response:
        if not await asyncio.to_thread(keys.revoke_key, svc.db, key_id):
            raise NotFound(f"no key with id or prefix `{key_id}`; list keys with GET /admin/keys")
        svc.keys.invalidate()
        return _json({"revoked": key_id})

    return router
