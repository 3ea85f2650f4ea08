"""`/admin/...`: teams, keys, route explanations and reports, guarded by the admin key (never a team key).

Admin operations are synchronous SQL; they run in a worker thread so the event loop keeps serving traffic.
A revoke also drops the key from this process's cache at once; other replicas follow within the cache TTL.
`GET /admin/route/explain` is a dry run through `pipeline.plan.plan`: it dispatches nothing, reports the
error a real request would get instead of raising it, and never echoes the sample text it was given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from backends.errors import SwitchboardError
from gateway.errors import (
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    SensitiveDataRefused,
)
from gateway.http import usage as usage_api
from gateway.http.auth import authenticate_admin
from gateway.pipeline import plan as route
from gateway.records import KeyBudget
from gateway.services import Services
from gateway.store import keys
from gateway.store.spend import micro_to_usd_text, usd_to_micro
from gateway.translate.openai_chat import MAX_OUTPUT_TOKENS, ChatCompletionBody, chat_request
from routing.decision import RouteDecision
from routing.preferences import narrow, parse_preferences
from routing.privacy import PrivacyTier, PrivacyVerdict, detect_request, privacy_floor
from routing.snapshot import RoutePolicy, RoutePreferences

_HIDDEN = {"key_hash"}


def _svc(request: Request) -> Services:
    svc: Services = request.app.state.services
    authenticate_admin(svc.access, request.headers.get("authorization"))
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
    expires_at: dt.datetime | None = None
    expires_in_days: float | None = Field(default=None, gt=0, le=36_600, allow_inf_nan=False)
    limits: KeyLimitsIn | None = None
    budget: KeyBudgetIn | None = None

    def expiry(self) -> dt.datetime | None:
        if self.expires_at is not None:
            return self.expires_at if self.expires_at.tzinfo else self.expires_at.replace(tzinfo=dt.UTC)
        if self.expires_in_days is not None:
            return dt.datetime.now(dt.UTC) + dt.timedelta(days=self.expires_in_days)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class ExplainQuery:
    """A request as a client would send it, minus the prompt: `text` only feeds the detectors."""

    team: str
    model: str
    max_tokens: int | None = None
    privacy: str | None = None  # a tier, as the x-switchboard-privacy header would carry it
    tools: bool = False
    json: bool = False
    text: str = ""
    preferences: str | None = None  # JSON of the body's `switchboard` field
    site: str | None = None  # as the x-switchboard-site header would carry it
    labels: str | None = None  # as x-switchboard-labels: "site=plant-7,line=2"


_PROBE_TOOL = {"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}
_TIERS = ", ".join(PrivacyTier)


def _sample_body(q: ExplainQuery) -> ChatCompletionBody:
    prefs: object = None
    if q.preferences is not None:
        try:
            prefs = orjson.loads(q.preferences)
        except orjson.JSONDecodeError:
            prefs = None
        if not isinstance(prefs, dict):
            raise InvalidRequest(
                "query parameter `preferences` must be a JSON object, as the body's `switchboard` field, "
                'e.g. {"sort": "price", "only": ["gpu0"]}',
                param="preferences",
            )
    if q.privacy is not None and q.privacy.strip().lower() not in {t.value for t in PrivacyTier}:
        raise InvalidRequest(f"query parameter `privacy` must be one of {_TIERS}", param="privacy")
    return ChatCompletionBody.model_validate(
        {
            "model": q.model,
            "messages": [{"role": "user", "content": q.text}],
            "max_tokens": q.max_tokens,
            "tools": [_PROBE_TOOL] if q.tools else None,
            "response_format": {"type": "json_object"} if q.json else None,
            "switchboard": prefs,
        }
    )


async def _access_error(svc: Services, team: str, model: str) -> PermissionDenied | None:
    """What `access.check_model` would refuse for every key of `team` (a key may narrow further)."""
    team_models = await svc.keys.team_models(team)  # NotFound: neither config nor SQL knows the team
    if team_models is None or "*" in team_models or model in team_models:
        return None
    allowed = ", ".join(m for m in svc.config.models if m in team_models) or "none"
    return PermissionDenied(
        f"model `{model}` is not allowed for team `{team}`; allowed: {allowed} (config: teams.{team}.models)",
        param="model",
    )


def _preferences(body: ChatCompletionBody) -> RoutePreferences:
    try:
        return parse_preferences(body.switchboard)
    except ValueError as exc:  # as `route.plan` reports it
        raise InvalidRequest(str(exc), param=str(exc).split(":", 1)[0]) from None


def _blocked_verdict(
    svc: Services, team: str, messages: Sequence[Mapping[str, Any]], header: str | None
) -> PrivacyVerdict:
    """The verdict of a request the team's `on_sensitive = "block"` refuses: its floor, and what was found."""
    team_floor, _ = svc.routing.team_floor(team)
    base = privacy_floor(team_floor, route.requested_floor(header), ())
    kinds = detect_request(messages)
    reason = f"{base.reason}; detected {', '.join(kinds)}; blocked (config: teams.{team}.on_sensitive)"
    return PrivacyVerdict(base.floor, kinds, reason)


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


def _usd(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _policy_view(policy: RoutePolicy) -> dict[str, object]:
    return {
        "objective": policy.objective,
        "max_latency_ms": policy.max_latency_ms,
        "max_usd_per_request": _usd(policy.max_usd_per_request),
        "max_input_usd_per_mtok": _usd(policy.max_input_usd_per_mtok),
        "max_output_usd_per_mtok": _usd(policy.max_output_usd_per_mtok),
        "min_quality_tier": policy.min_quality_tier,
        "required_labels": {k: sorted(v) for k, v in policy.required_labels.items()},
        "preferred_labels": dict(policy.preferred_labels),
        "require_parameters": policy.require_parameters,
        "allow_fallbacks": policy.allow_fallbacks,
        "max_attempts": policy.max_attempts,
        "only": None if policy.only is None else sorted(policy.only),
        "ignore": sorted(policy.ignore),
        "order": list(policy.order),
    }


def _error_view(error: SwitchboardError | None) -> dict[str, object] | None:
    if error is None:
        return None
    return {
        "status": error.status_code,
        "type": error.openai_type,
        "code": error.code,
        "message": error.message,
    }


def _decision_view(decision: RouteDecision | None) -> dict[str, object]:
    if decision is None:  # refused before routing
        return {"candidates": [], "rejected": [], "reason": None, "privacy_verdict": None}
    tried = len(decision.candidates)
    return {
        "candidates": [{**c, "tried": i < tried} for i, c in enumerate(route.ranked_view(decision))],
        "rejected": [
            {
                "deployment": r.deployment_id,
                "backend": r.backend,
                "codes": list(r.codes),
                "reasons": list(r.reasons),
            }
            for r in decision.rejected
        ],
        "reason": decision.reason,
        "privacy_verdict": decision.privacy_verdict,
    }


async def explain_route(svc: Services, q: ExplainQuery) -> dict[str, object]:
    """Where a request like `q` would go and why. The error it would get is reported, not raised; a bad
    query (unknown team or model, malformed preferences) is an error of this call."""
    error: SwitchboardError | None = await _access_error(svc, q.team, q.model)
    if q.model not in svc.config.models:
        listing = ", ".join(svc.config.models) or "none"
        raise ModelNotFound(f"model `{q.model}` does not exist; available: {listing}", param="model")
    body = _sample_body(q)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    now_s = time.monotonic()
    decision: RouteDecision | None
    try:
        hints = route.Hints(privacy=q.privacy, site=q.site, labels=q.labels)
        call = chat_request(body, "explain", svc.config.server.request_timeout_s)
        routed = route.plan(svc.routing, q.team, call, hints, body.switchboard, now_s=now_s)
        decision, verdict, policy = routed.decision, routed.verdict, routed.policy
        error = error or route.fail_closed_error(routed, q.team)
    except SensitiveDataRefused as exc:
        decision, verdict = None, _blocked_verdict(svc, q.team, messages, q.privacy)
        policy = narrow(svc.routing.policy(q.team), _preferences(body))
        error = error or exc
    return {
        "model": q.model,
        "team": q.team,
        "privacy": {"floor": verdict.floor, "detections": list(verdict.detections), "reason": verdict.reason},
        "policy": _policy_view(policy),
        "tokens": {
            "prompt": route.estimate_prompt_tokens(messages),
            "expected_output": body.max_output_tokens() or svc.config.routing.default_output_tokens,
        },
        **_decision_view(decision),
        "error": _error_view(error),
    }


def admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.get("/teams")
    async def list_teams(svc: Services = Depends(_svc)) -> Response:
        return _json({"data": await asyncio.to_thread(keys.list_teams, svc.db)})

    @router.post("/teams")
    async def create_team(body: TeamIn, svc: Services = Depends(_svc)) -> Response:
        _check_team_models(body.models, svc.config.models)
        team = await asyncio.to_thread(keys.create_team, svc.db, body.name, body.models)
        return _json(team, status_code=201)

    @router.get("/keys")
    async def list_keys(team: str | None = None, svc: Services = Depends(_svc)) -> Response:
        listed = await asyncio.to_thread(keys.list_keys, svc.db, team)
        return _json({"data": [_key_view(k) for k in listed]})

    @router.post("/keys")
    async def create_key(body: KeyIn, svc: Services = Depends(_svc)) -> Response:
        limits = body.limits or KeyLimitsIn()
        created = await asyncio.to_thread(
            keys.create_key,
            svc.db,
            body.team,
            name=body.name,
            models=body.models,
            expires_at=body.expiry(),
            limit_requests=limits.requests,
            limit_tokens=limits.tokens,
            budget=None if body.budget is None else body.budget.to_budget(),
        )
        return _json(_key_view(created), status_code=201)

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, svc: Services = Depends(_svc)) -> Response:
        if not await asyncio.to_thread(keys.revoke_key, svc.db, key_id):
            raise NotFound(f"no key with id or prefix `{key_id}`; list keys with GET /admin/keys")
        svc.keys.invalidate()
        return _json({"revoked": key_id})

    @router.get("/route/explain")
    async def explain(
        team: str,
        model: str,
        max_tokens: int | None = Query(default=None, ge=1, le=MAX_OUTPUT_TOKENS),
        privacy: str | None = None,
        tools: bool = False,
        json_mode: bool = Query(default=False, alias="json"),
        text: str = "",
        preferences: str | None = None,
        site: str | None = None,
        labels: str | None = None,
        svc: Services = Depends(_svc),
    ) -> Response:
        query = ExplainQuery(
            team, model, max_tokens, privacy, tools, json_mode, text, preferences, site, labels
        )
        return _json(await explain_route(svc, query))

    @router.get("/reports/usage")
    async def usage_report(
        request: Request, params: usage_api.ReportParams = Depends(), svc: Services = Depends(_svc)
    ) -> Response:
        return await usage_api.usage_response(
            svc, request, params.query(svc.config.reports.max_span_days), params.output_format()
        )

    @router.get("/reports/savings")
    async def savings_report(
        request: Request, params: usage_api.ReportParams = Depends(), svc: Services = Depends(_svc)
    ) -> Response:
        return await usage_api.savings_response(
            svc, request, params.query(svc.config.reports.max_span_days), params.output_format()
        )

    return router
