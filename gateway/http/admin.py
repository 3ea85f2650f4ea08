"""`/admin/...`: teams, keys, route explanations and reports, guarded by the admin key (never a team key).

Admin operations are synchronous SQL; they run in a worker thread so the event loop keeps serving traffic.
A revoke also drops the key from this process's cache at once; other replicas follow within the cache TTL.
The route explanation is gateway/http/explain.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway.errors import InvalidRequest, NotFound
from gateway.http import usage as usage_api
from gateway.http.auth import authenticate_admin
from gateway.http.deps import AdminDeps, router_deps
from gateway.http.explain import ExplainQuery, explain_route
from gateway.http.openapi import (
    TAG_ADMIN,
    CreatedKey,
    IsoDateTime,
    Listing,
    Revoked,
    RouteExplanation,
    Team,
    UsageReport,
    errors,
    ok,
)
from gateway.records import KeyBudget
from gateway.store import audit, keys
from gateway.store.spend import micro_to_usd_text, usd_to_micro
from gateway.translate.openai_chat import MAX_OUTPUT_TOKENS
from routing.privacy import PrivacyTier

_HIDDEN = {"key_hash"}


def _admin(request: Request) -> AdminDeps:
    deps = router_deps(request).admin
    authenticate_admin(deps.access, request.headers.get("authorization"))
    return deps


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def admin_audited(
    request: Request,
    action: str,
    target: Callable[[Any], str],
    detail: Callable[[Any], Mapping[str, Any] | None] | None = None,
) -> audit.Audited[Any]:
    """The audit row of a write made with the admin key through `/admin`, written in the write's
    transaction (the store function calls it before it commits)."""
    actor = audit.Actor(audit.ADMIN_ACTOR, audit.AuditSource.API, client_address(request))
    return audit.writer(actor, action, target, detail)


def key_detail(key: keys.KeyInfo | keys.CreatedKey) -> dict[str, object]:
    """What the audit log keeps of a key write: its settings, never its plaintext."""
    view = _key_view(key)
    return {k: view[k] for k in ("team", "name", "models", "limits", "budget") if k in view} | {
        "expires_at": None if key.expires_at is None else key.expires_at.isoformat()
    }


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


MAX_BUDGET_USD = Decimal(1_000_000_000)  # a budget beyond this is a typo, not a budget


class KeyLimitsIn(BaseModel):
    """The key's own rate limits, per `limits.window_s` (default: per minute)."""

    model_config = ConfigDict(extra="forbid")
    requests: int | None = Field(default=None, ge=1, le=keys.MAX_KEY_LIMIT)
    tokens: int | None = Field(default=None, ge=1, le=keys.MAX_KEY_LIMIT)


class KeyBudgetIn(BaseModel):
    """Spend limit per UTC day or calendar month; amounts are USD as strings ("12.50") or numbers."""

    model_config = ConfigDict(extra="forbid")
    period: Literal["day", "month"] = "month"
    usd: Decimal = Field(gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)
    soft_usd: Decimal | None = Field(default=None, gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)

    def to_budget(self) -> KeyBudget:
        limit = _micro(self.usd, "budget.usd")
        soft = None if self.soft_usd is None else _micro(self.soft_usd, "budget.soft_usd")
        if soft is not None and soft > limit:
            raise InvalidRequest(
                f"budget.soft_usd ({self.soft_usd}) must not exceed budget.usd ({self.usd})",
                param="budget.soft_usd",
            )
        return KeyBudget(self.period, limit, soft)


def _check_team_models(models: list[str] | None, configured: Mapping[str, object]) -> None:
    """A team may be given configured public models or "*", nothing else (an unknown name, or one with
    control characters, was stored as given)."""
    for i, name in enumerate(models or ()):
        if name != "*" and name not in configured:
            listing = ", ".join(configured) or "none"
            raise InvalidRequest(
                f'models.{i}: no model named {name!r} is configured; use "*" or one of: {listing} '
                "(config: models)",
                param=f"models.{i}",
            )


def _micro(usd: Decimal, param: str) -> int:
    try:
        return usd_to_micro(usd)
    except ValueError as exc:
        raise InvalidRequest(f"invalid value for `{param}`: {exc}", param=param) from None


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    team: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=128)
    models: list[str] | None = None
    expires_at: IsoDateTime | None = None
    expires_in_days: float | None = Field(default=None, gt=0, le=36_600, allow_inf_nan=False)
    limits: KeyLimitsIn | None = None
    budget: KeyBudgetIn | None = None

    def expiry(self) -> dt.datetime | None:
        if self.expires_at is not None:
            return self.expires_at if self.expires_at.tzinfo else self.expires_at.replace(tzinfo=dt.UTC)
        if self.expires_in_days is not None:
            return dt.datetime.now(dt.UTC) + dt.timedelta(days=self.expires_in_days)
        return None


def _key_view(key: keys.KeyInfo | keys.CreatedKey) -> dict[str, object]:
    """A key as the admin API shows it: limits and budget in the shape POST /admin/keys takes them."""
    view = {k: v for k, v in dataclasses.asdict(key).items() if k not in _HIDDEN}
    del view["limit_requests"], view["limit_tokens"]
    view["limits"] = {"requests": key.limit_requests, "tokens": key.limit_tokens}
    budget = key.budget
    view["budget"] = None
    if budget is not None:
        soft = budget.soft_limit_micro_usd
        view["budget"] = {
            "period": budget.period,
            "usd": micro_to_usd_text(budget.limit_micro_usd),
            "soft_usd": None if soft is None else micro_to_usd_text(soft),
        }
    return view


def admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin", tags=[TAG_ADMIN], responses=errors(401, 403))
    report = {**ok(UsageReport, "the report", media="text/csv"), **errors(400, 429, 503)}

    @router.get("/teams", responses=ok(Listing, "every team"))
    async def list_teams(deps: AdminDeps = Depends(_admin)) -> Response:
        return _json({"data": await asyncio.to_thread(keys.list_teams, deps.db)})

    @router.post("/teams", status_code=201, responses={**ok(Team, "created", status=201), **errors(400)})
    async def create_team(request: Request, body: TeamIn, deps: AdminDeps = Depends(_admin)) -> Response:
        _check_team_models(body.models, deps.config.models)
        audited = admin_audited(request, "team.create", lambda t: t.name, lambda t: {"models": body.models})
        team = await asyncio.to_thread(keys.create_team, deps.db, body.name, body.models, audited=audited)
        return _json(team, status_code=201)

    @router.get("/keys", responses=ok(Listing, "every key, or the team's"))
    async def list_keys(team: str | None = None, deps: AdminDeps = Depends(_admin)) -> Response:
        listed = await asyncio.to_thread(keys.list_keys, deps.db, team)
        return _json({"data": [_key_view(k) for k in listed]})

    @router.post(
        "/keys", status_code=201, responses={**ok(CreatedKey, "created", status=201), **errors(400, 404)}
    )
    async def create_key(request: Request, body: KeyIn, deps: AdminDeps = Depends(_admin)) -> Response:
        limits = body.limits or KeyLimitsIn()
        created = await asyncio.to_thread(
            keys.create_key,
            deps.db,
            body.team,
            name=body.name,
            models=body.models,
            expires_at=body.expiry(),
            limit_requests=limits.requests,
            limit_tokens=limits.tokens,
            budget=None if body.budget is None else body.budget.to_budget(),
            audited=admin_audited(request, "key.create", lambda c: c.key_id, key_detail),
        )
        return _json(_key_view(created), status_code=201)

    @router.post("/keys/{key_id}/revoke", responses={**ok(Revoked, "revoked"), **errors(400, 404)})
    async def revoke_key(request: Request, key_id: str, deps: AdminDeps = Depends(_admin)) -> Response:
        audited = admin_audited(request, "key.revoke", lambda revoked_id: revoked_id)
        if not await asyncio.to_thread(keys.revoke_key, deps.db, key_id, audited=audited):
            raise NotFound(f"no key with id or prefix `{key_id}`; list keys with GET /admin/keys")
        deps.keys.invalidate()
        return _json({"revoked": key_id})

    @router.get("/route/explain", responses={**ok(RouteExplanation, "the decision"), **errors(400, 404, 503)})
    async def explain(
        team: str,
        model: str,
        max_tokens: int | None = Query(default=None, ge=1, le=MAX_OUTPUT_TOKENS),
        privacy: str | None = Query(default=None, json_schema_extra={"enum": list(PrivacyTier)}),
        tools: bool = False,
        json_mode: bool = Query(default=False, alias="json"),
        text: str = "",
        preferences: str | None = None,
        site: str | None = None,
        labels: str | None = None,
        deps: AdminDeps = Depends(_admin),
    ) -> Response:
        query = ExplainQuery(
            team, model, max_tokens, privacy, tools, json_mode, text, preferences, site, labels
        )
        return _json(await explain_route(deps, query))

    @router.get("/reports/usage", responses=report)
    async def usage_report(
        request: Request, params: usage_api.ReportParams = Depends(), deps: AdminDeps = Depends(_admin)
    ) -> Response:
        return await usage_api.usage_response(
            deps.reports, request, params.query(deps.config.reports.max_span_days), params.output_format()
        )

    @router.get("/reports/savings", responses=report)
    async def savings_report(
        request: Request, params: usage_api.ReportParams = Depends(), deps: AdminDeps = Depends(_admin)
    ) -> Response:
        return await usage_api.savings_response(
            deps.reports, request, params.query(deps.config.reports.max_span_days), params.output_format()
        )

    return router
