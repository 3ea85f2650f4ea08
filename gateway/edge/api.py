"""HTTP side of edge nodes: the `/v1/edge/connect` WebSocket and `/admin/edge/...` (admin key only).

`POST /admin/edge/tokens` creates an enrollment token (its plaintext appears in that answer only),
`GET /admin/edge/tokens` lists them, `DELETE /admin/edge/tokens/{id}` revokes one and disconnects this
replica's nodes using it at once (other replicas within `edge.token_check_s`), `GET /admin/edge/nodes` lists
the registry: every node with its state, labels, load and last-seen time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from starlette.responses import Response
from starlette.websockets import WebSocket

from backends.edge import wire
from gateway.edge import tokens
from gateway.edge.link import SOCKET_ERRORS
from gateway.edge.registry import NodeRecord
from gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from gateway.http.admin import admin_audited
from gateway.http.auth import authenticate_admin
from gateway.http.deps import EdgeNodeDeps, router_deps
from gateway.http.openapi import TAG_ADMIN, EdgeToken, IsoDateTime, Listing, NodeListing, errors, ok
from gateway.services import Services

log = logging.getLogger(__name__)
T = TypeVar("T")


def _edge_admin(request: Request) -> EdgeNodeDeps:
    deps = router_deps(request).edge
    authenticate_admin(deps.access, request.headers.get("authorization"))
    return deps


def _json(value: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status_code, media_type="application/json")


async def _sql(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except DBAPIError as exc:
        raise ServiceUnavailable(
            "the database is unreachable; edge tokens cannot be read (see /readyz)"
        ) from exc


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    labels: dict[str, str] = Field(default_factory=dict)  # override what its nodes report, e.g. site
    expires_in: str | None = None  # "30m", "12h", "7d", "2w"
    expires_at: IsoDateTime | None = None

    def expiry(self, now: dt.datetime) -> dt.datetime | None:
        if self.expires_in is not None and self.expires_at is not None:
            raise InvalidRequest("set expires_in or expires_at, not both", param="expires_in")
        if self.expires_in is not None:
            return now + dt.timedelta(seconds=tokens.parse_duration_s(self.expires_in))
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            return self.expires_at.replace(tzinfo=dt.UTC)
        return self.expires_at


def token_view(info: tokens.TokenInfo, now: dt.datetime, nodes: int | None = None) -> dict[str, object]:
    state = "active"
    if info.revoked_at is not None:
        state = "revoked"
    elif info.expires_at is not None and info.expires_at <= now:
        state = "expired"
    view: dict[str, object] = {
        "id": info.token_id,
        "name": info.name,
        "labels": dict(info.labels),
        "state": state,
        "created_at": info.created_at.isoformat(),
        "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
        "revoked_at": None if info.revoked_at is None else info.revoked_at.isoformat(),
    }
    if nodes is not None:
        view["nodes_connected"] = nodes  # on the replica that answered
    return view


def _iso(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat(timespec="milliseconds")


def node_view(record: NodeRecord, now: float, ttl_s: float) -> dict[str, object]:
    return {
        "node_id": record.node_id,
        "state": record.state(now, ttl_s),
        "labels": dict(record.labels),
        "models": list(record.models),
        "in_flight": record.in_flight,
        "queue_depth": record.queue_depth,
        "kv_used_frac": round(record.kv_used_frac, 4),
        "tokens_per_s": round(record.tokens_per_s, 2),
        "usd_per_hour": record.usd_per_hour,
        "capacity": {"max_batch": record.max_batch, "kv_cache_mb": record.kv_cache_mb},
        "last_seen": _iso(record.last_seen),
        "last_seen_s_ago": round(max(0.0, now - record.last_seen), 3),
        "connected_at": _iso(record.connected_at),
        "replica": record.replica,
        "token_id": record.token_id,
        "version": record.version,
    }


async def connect(websocket: WebSocket) -> None:
    """`GET /v1/edge/connect`: one node's connection, for as long as it lasts."""
    svc: Services = websocket.app.state.services
    if svc.edge is None:
        await websocket.accept()
        reason = 'edge nodes are off on this gateway (config: edge.enabled, or a kind = "edge" backend)'
        await websocket.close(wire.CloseCode.POLICY, reason)
        return
    try:
        await svc.edge.serve(websocket)
    except Exception:  # noqa: BLE001 - the top of one node connection: log, close, keep the gateway up
        log.exception("edge: node connection failed")
        try:
            await websocket.close(1011)
        except SOCKET_ERRORS:
            return


def edge_router() -> APIRouter:
    router = APIRouter(tags=[TAG_ADMIN], responses=errors(401, 403, 503))
    router.add_api_websocket_route(wire.CONNECT_PATH, connect)

    created = {**ok(EdgeToken, "created; `token` is shown in this answer only", status=201), **errors(400)}

    @router.post("/admin/edge/tokens", status_code=201, responses=created)
    async def create_token(
        request: Request, body: TokenIn, deps: EdgeNodeDeps = Depends(_edge_admin)
    ) -> Response:
        now = dt.datetime.now(dt.UTC)
        created = await _sql(
            tokens.create_token,
            deps.db,
            name=body.name,
            labels=body.labels,
            expires_at=body.expiry(now),
            now=now,
            audited=admin_audited(
                request,
                "edge_token.create",
                lambda c: c.info.token_id,
                lambda c: {"name": body.name, "labels": body.labels},
            ),
        )
        return _json({**token_view(created.info, now), "token": created.plaintext}, status_code=201)

    @router.get("/admin/edge/tokens", responses=ok(Listing, "every enrollment token"))
    async def list_tokens(deps: EdgeNodeDeps = Depends(_edge_admin)) -> Response:
        now = dt.datetime.now(dt.UTC)
        listed = await _sql(tokens.list_tokens, deps.db)
        links = list(deps.edge.links.values()) if deps.edge is not None else []
        data = [token_view(t, now, sum(1 for link in links if link.token_id == t.token_id)) for t in listed]
        return _json({"data": data})

    @router.delete("/admin/edge/tokens/{token_id}", responses={**ok(EdgeToken, "revoked"), **errors(404)})
    async def revoke_token(
        request: Request, token_id: str, deps: EdgeNodeDeps = Depends(_edge_admin)
    ) -> Response:
        audited = admin_audited(request, "edge_token.revoke", lambda i: i.token_id)
        info = await _sql(tokens.revoke_token, deps.db, token_id, audited=audited)
        if info is None:
            raise NotFound(f"no edge token with id `{token_id}`; list them with GET /admin/edge/tokens")
        disconnected = 0
        if deps.edge is not None:
            problem = info.problem(dt.datetime.now(dt.UTC)) or f"edge token {token_id} was revoked"
            disconnected = await deps.edge.disconnect_token(token_id, problem)
        return _json({**token_view(info, dt.datetime.now(dt.UTC)), "disconnected": disconnected})

    @router.get("/admin/edge/nodes", responses=ok(NodeListing, "the node registry"))
    async def list_nodes(deps: EdgeNodeDeps = Depends(_edge_admin)) -> Response:
        if deps.edge is None:
            return _json({"data": [], "enabled": False})
        now = deps.edge.wall()
        try:
            records = await deps.edge.registry.nodes(now)
        except (RedisError, OSError, TimeoutError) as exc:
            raise ServiceUnavailable(
                "the edge node registry (Redis) is unreachable; routing is unaffected (see /readyz)"
            ) from exc
        ttl_s = deps.config.edge.ttl_s
        return _json({"data": [node_view(r, now, ttl_s) for r in records], "enabled": True})

    return router
