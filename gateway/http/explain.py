"""`GET /admin/route/explain`: where a request like the one described would go, and why.

A dry run through `pipeline.plan.plan`: it dispatches nothing, reports the error a real request would get
instead of raising it, and never echoes the sample text it was given.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

from backends.errors import SwitchboardError
from gateway.errors import InvalidRequest, ModelNotFound, PermissionDenied, SensitiveDataRefused
from gateway.http.deps import AdminDeps
from gateway.pipeline import decision_view
from gateway.pipeline import plan as route
from gateway.translate.openai_chat import ChatCompletionBody, chat_request
from routing.decision import RouteDecision
from routing.preferences import narrow, parse_preferences
from routing.privacy import PrivacyTier, PrivacyVerdict, detect_request, privacy_floor
from routing.snapshot import RoutePolicy, RoutePreferences


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


async def _access_error(deps: AdminDeps, team: str, model: str) -> PermissionDenied | None:
    """What `access.check_model` would refuse for every key of `team` (a key may narrow further)."""
    team_models = await deps.keys.team_models(team)  # NotFound: neither config nor SQL knows the team
    if team_models is None or "*" in team_models or model in team_models:
        return None
    allowed = ", ".join(m for m in deps.config.models if m in team_models) or "none"
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
    deps: AdminDeps, team: str, messages: Sequence[Mapping[str, Any]], header: str | None
) -> PrivacyVerdict:
    """The verdict of a request the team's `on_sensitive = "block"` refuses: its floor, and what was found."""
    team_floor, _ = deps.routing.team_floor(team)
    base = privacy_floor(team_floor, route.requested_floor(header), ())
    kinds = detect_request(messages)
    reason = f"{base.reason}; detected {', '.join(kinds)}; blocked (config: teams.{team}.on_sensitive)"
    return PrivacyVerdict(base.floor, kinds, reason)


def _usd(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _policy_view(policy: RoutePolicy) -> dict[str, object]:
    return {
        "objective": policy.objective,
        "max_latency_ms": policy.max_latency_ms,
        "max_ttft_ms": policy.max_ttft_ms,
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
        "slo": decision_view.slo_view(policy),
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
        "candidates": [{**c, "tried": i < tried} for i, c in enumerate(decision_view.ranked_view(decision))],
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


async def explain_route(deps: AdminDeps, q: ExplainQuery) -> dict[str, object]:
    """Where a request like `q` would go and why. The error it would get is reported, not raised; a bad
    query (unknown team or model, malformed preferences) is an error of this call."""
    error: SwitchboardError | None = await _access_error(deps, q.team, q.model)
    if q.model not in deps.config.models:
        listing = ", ".join(deps.config.models) or "none"
        raise ModelNotFound(f"model `{q.model}` does not exist; available: {listing}", param="model")
    body = _sample_body(q)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    now_s = time.monotonic()
    decision: RouteDecision | None
    try:
        hints = route.Hints(privacy=q.privacy, site=q.site, labels=q.labels)
        call = chat_request(body, "explain", deps.config.server.request_timeout_s)
        routed = route.plan(deps.routing, q.team, call, hints, body.switchboard, now_s=now_s)
        decision, verdict, policy = routed.decision, routed.verdict, routed.policy
        error = error or route.fail_closed_error(routed, q.team)
    except SensitiveDataRefused as exc:
        decision, verdict = None, _blocked_verdict(deps, q.team, messages, q.privacy)
        policy = narrow(deps.routing.policy(q.team), _preferences(body))
        error = error or exc
    return {
        "model": q.model,
        "team": q.team,
        "privacy": {"floor": verdict.floor, "detections": list(verdict.detections), "reason": verdict.reason},
        "policy": _policy_view(policy),
        "tokens": {
            "prompt": route.estimate_prompt_tokens(messages),
            "expected_output": body.max_output_tokens() or deps.config.routing.default_output_tokens,
        },
        **_decision_view(decision),
        "error": _error_view(error),
    }
