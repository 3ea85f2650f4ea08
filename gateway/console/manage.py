"""The console's other pages: Teams and keys (create, revoke; a new key is shown once), Backends and
routing (live deployments, recent decisions, the explain form), Edge nodes (tokens issued and revoked),
Batches and the Audit log. Every write goes through `checked_form` (CSRF) and leaves an audit row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.responses import RedirectResponse, Response

from backends.errors import SwitchboardError
from gateway.console import data
from gateway.console.access import Refused, User, checked_form, current_user, require_admin
from gateway.console.views import html, with_headers
from gateway.edge import tokens
from gateway.edge.api import node_view, token_view
from gateway.errors import InvalidRequest
from gateway.http.admin import KeyIn, TeamIn, _check_team_models, _key_view, key_detail
from gateway.http.explain import ExplainQuery, explain_route
from gateway.store import audit, keys
from gateway.translate.openai_chat import MAX_OUTPUT_TOKENS

_BUDGET_FIELDS = ("budget_usd", "budget_period", "soft_budget_usd")


def _opt(form: dict[str, str], name: str) -> str | None:
    value = form.get(name, "").strip()
    return value or None


def _key_body(form: dict[str, str]) -> dict[str, Any]:
    """The console's key form as the body POST /admin/keys takes (validated by the same model)."""
    body: dict[str, Any] = {"team": form.get("team", ""), "name": form.get("name", "")}
    if models := _opt(form, "models"):
        body["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if days := _opt(form, "expires_in_days"):
        body["expires_in_days"] = days
    limits = {k: v for k in ("requests", "tokens") if (v := _opt(form, k))}
    if limits:
        body["limits"] = limits
    if usd := _opt(form, "budget_usd"):
        body["budget"] = {"usd": usd, "period": _opt(form, "budget_period") or "month"}
        if soft := _opt(form, "soft_budget_usd"):
            body["budget"]["soft_usd"] = soft
    return body


def _invalid(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "form"
    return f"{where}: {err.get('msg')}"


async def _teams_page(
    user: User, *, created: dict[str, Any] | None = None, error: str | None = None
) -> Response:
    db = user.deps.admin.db
    listed = await asyncio.to_thread(keys.list_keys, db, user.team)
    teams = await asyncio.to_thread(keys.list_teams, db) if user.is_admin else []
    return html(
        "teams.html",
        status_code=400 if error else (201 if created else 200),
        user=user,
        page="teams",
        keys=[_key_view(k) for k in listed],
        teams=teams,
        models=list(user.deps.admin.config.models),
        created=created,
        error=error,
    )


def manage_router() -> APIRouter:
    router = APIRouter(prefix="/console", include_in_schema=False)

    @router.get("/teams")
    async def teams_page(user: User = Depends(current_user)) -> Response:
        return await _teams_page(user)

    @router.get("/api/keys")
    async def keys_json(user: User = Depends(current_user)) -> Response:
        listed = await asyncio.to_thread(keys.list_keys, user.deps.admin.db, user.team)
        body = orjson.dumps({"data": [_key_view(k) for k in listed]}, default=str)
        return with_headers(Response(body, media_type="application/json"))

    @router.post("/teams")
    async def create_team(request: Request, user: User = Depends(require_admin)) -> Response:
        form = await checked_form(request, user)
        models = [m.strip() for m in form.get("models", "").split(",") if m.strip()] or None
        try:
            body = TeamIn(name=form.get("name", "").strip(), models=models)
            _check_team_models(body.models, user.deps.admin.config.models)
        except ValidationError as exc:
            return await _teams_page(user, error=_invalid(exc))
        except SwitchboardError as exc:
            return await _teams_page(user, error=exc.message)
        audited = user.audited("team.create", lambda t: t.name, lambda t: {"models": body.models})
        try:
            await asyncio.to_thread(
                keys.create_team, user.deps.admin.db, body.name, body.models, audited=audited
            )
        except SwitchboardError as exc:
            return await _teams_page(user, error=exc.message)
        return RedirectResponse("/console/teams", status_code=303)

    @router.post("/keys")
    async def create_key(request: Request, user: User = Depends(require_admin)) -> Response:
        form = await checked_form(request, user)
        try:
            body = KeyIn.model_validate(_key_body(form))
            limits = body.limits
            created = await asyncio.to_thread(
                keys.create_key,
                user.deps.admin.db,
                body.team,
                name=body.name,
                models=body.models,
                expires_at=body.expiry(),
                limit_requests=None if limits is None else limits.requests,
                limit_tokens=None if limits is None else limits.tokens,
                budget=None if body.budget is None else body.budget.to_budget(),
                audited=user.audited("key.create", lambda c: c.key_id, key_detail),
            )
        except ValidationError as exc:
            return await _teams_page(user, error=_invalid(exc))
        except SwitchboardError as exc:
            return await _teams_page(user, error=exc.message)
        return await _teams_page(user, created={"key_id": created.key_id, "plaintext": created.plaintext})

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(request: Request, key_id: str, user: User = Depends(require_admin)) -> Response:
        await checked_form(request, user)
        audited = user.audited("key.revoke", lambda revoked_id: revoked_id)
        if not await asyncio.to_thread(keys.revoke_key, user.deps.admin.db, key_id, audited=audited):
            raise Refused(404, f"No key with id {key_id[:40]!r}; it may have been removed.")
        user.deps.admin.keys.invalidate()
        return RedirectResponse("/console/teams", status_code=303)

    @router.get("/backends")
    async def backends_page(part: str | None = None, user: User = Depends(require_admin)) -> Response:
        deps = user.deps.admin
        limit = deps.config.console.recent_decisions
        decisions = await asyncio.to_thread(data.recent_decisions, deps.db, limit, None)
        context: dict[str, Any] = {
            "user": user,
            "page": "backends",
            "deployments": data.deployments(deps.routing, time.monotonic()),
            "decisions": decisions,
            "teams": list(deps.config.teams),
            "models": list(deps.config.models),
        }
        return html("backends.html", part=part == "live", **context)

    @router.get("/api/decisions")
    async def decisions_json(user: User = Depends(current_user)) -> Response:
        deps = user.deps.admin
        limit = deps.config.console.recent_decisions
        rows = await asyncio.to_thread(data.recent_decisions, deps.db, limit, user.team)
        return with_headers(
            Response(orjson.dumps({"data": rows}, default=str), media_type="application/json")
        )

    @router.get("/backends/explain")
    async def explain_page(
        team: str = "",
        model: str = "",
        max_tokens: str = "",
        privacy: str = "",
        text: str = "",
        user: User = Depends(require_admin),
    ) -> Response:
        result, error = None, None
        limit = int(max_tokens) if max_tokens.strip().isdigit() else None
        query = ExplainQuery(team, model, limit, privacy or None, text=text)
        try:
            if max_tokens.strip() and (limit is None or not 1 <= limit <= MAX_OUTPUT_TOKENS):
                raise InvalidRequest(f"max tokens must be a whole number from 1 to {MAX_OUTPUT_TOKENS}")
            result = await explain_route(user.deps.admin, query)
        except SwitchboardError as exc:
            error = exc.message
        return html(
            "explain.html",
            status_code=400 if error else 200,
            user=user,
            page="backends",
            query=query,
            teams=list(user.deps.admin.config.teams),
            models=list(user.deps.admin.config.models),
            result=result,
            error=error,
        )

    @router.get("/edge")
    async def edge_page(user: User = Depends(require_admin)) -> Response:
        return await _edge_page(user)

    @router.post("/edge/tokens")
    async def create_edge_token(request: Request, user: User = Depends(require_admin)) -> Response:
        form = await checked_form(request, user)
        now = dt.datetime.now(dt.UTC)
        try:
            labels = tokens.parse_labels(
                [p.strip() for p in form.get("labels", "").split(",") if p.strip()], param="labels"
            )
            expires_in = _opt(form, "expires_in")
            expires = (
                None
                if expires_in is None
                else now + dt.timedelta(seconds=tokens.parse_duration_s(expires_in))
            )
            audited = user.audited(
                "edge_token.create",
                lambda c: c.info.token_id,
                lambda c: {"name": c.info.name, "labels": labels},
            )
            created = await asyncio.to_thread(
                tokens.create_token, user.deps.edge.db, name=form.get("name", "").strip() or "console",
                labels=labels, expires_at=expires, now=now, audited=audited,
            )  # fmt: skip
        except SwitchboardError as exc:
            return await _edge_page(user, error=exc.message)
        return await _edge_page(user, created={"id": created.info.token_id, "plaintext": created.plaintext})

    @router.post("/edge/tokens/{token_id}/revoke")
    async def revoke_edge_token(
        request: Request, token_id: str, user: User = Depends(require_admin)
    ) -> Response:
        await checked_form(request, user)
        audited = user.audited("edge_token.revoke", lambda i: i.token_id)
        info = await asyncio.to_thread(tokens.revoke_token, user.deps.edge.db, token_id, audited=audited)
        if info is None:
            raise Refused(404, f"No edge token with id {token_id[:40]!r}.")
        hub = user.deps.edge.edge
        if hub is not None:
            await hub.disconnect_token(token_id, f"edge token {token_id} was revoked")
        return RedirectResponse("/console/edge", status_code=303)

    @router.get("/batches")
    async def batches_page(user: User = Depends(require_admin)) -> Response:
        rows = await asyncio.to_thread(data.recent_batches, user.deps.admin.db, 100, None)
        return html("batches.html", user=user, page="batches", batches=rows)

    @router.get("/audit")
    async def audit_page(before: int | None = None, user: User = Depends(require_admin)) -> Response:
        entries = await asyncio.to_thread(audit.list_entries, user.deps.admin.db, limit=100, before_id=before)
        older = entries[-1].entry_id if len(entries) == 100 else None
        return html("audit.html", user=user, page="audit", entries=entries, older=older)

    return router


async def _edge_page(
    user: User, *, created: dict[str, Any] | None = None, error: str | None = None
) -> Response:
    deps = user.deps.edge
    now = dt.datetime.now(dt.UTC)
    listed = await asyncio.to_thread(tokens.list_tokens, deps.db)
    nodes: list[dict[str, Any]] = []
    if deps.edge is not None:
        wall = deps.edge.wall()
        try:
            records = await deps.edge.registry.nodes(wall)
            nodes = [node_view(r, wall, deps.config.edge.ttl_s) for r in records]
        except (RedisError, OSError, TimeoutError) as exc:
            error = error or f"The node registry is unreachable: {type(exc).__name__} (see /readyz)."
    return html(
        "edge.html",
        status_code=400 if error else (201 if created else 200),
        user=user,
        page="edge",
        tokens=[token_view(t, now) for t in listed],
        nodes=nodes,
        enabled=deps.edge is not None,
        created=created,
        error=error,
    )
