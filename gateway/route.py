"""Turning one chat request into a route decision: privacy floor, preferences, estimates, `routing.choose`.

Privacy fails closed: when no deployment at or above the floor can serve, the request gets an error naming the
floor and each rejection; it is never sent to a lower tier. Detector hits are recorded by kind, never text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest, NoEligibleDeployment, NoHealthyDeployment, SensitiveDataRefused
from gateway.routing_state import RoutingState
from gateway.wire import ChatCompletionBody
from routing.decision import RejectCode, Rejection, RouteDecision
from routing.preferences import narrow, parse_preferences
from routing.privacy import (
    PrivacyTier,
    PrivacyVerdict,
    SensitiveDataBlocked,
    detect_messages,
    privacy_floor,
)
from routing.scoring import choose
from routing.snapshot import RoutePolicy, RouteRequest

PRIVACY_HEADER = "x-switchboard-privacy"
PREFERENCES_HEADER = "x-switchboard-preferences"  # JSON, same shape as the `switchboard` body field
_TRANSIENT = {RejectCode.UNHEALTHY, RejectCode.CIRCUIT_OPEN}


@dataclass(frozen=True, slots=True)
class Hints:
    """What a request's headers may ask of routing (only ever narrowing what its team allows)."""

    privacy: str | None = None
    preferences: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Hints:
        return cls(headers.get(PRIVACY_HEADER), headers.get(PREFERENCES_HEADER))

    def preferences_field(self, body_field: dict[str, Any] | None) -> object:
        """The body field wins; the header is read only when the body has none."""
        if body_field is not None or self.preferences is None:
            return body_field
        try:
            return orjson.loads(self.preferences)
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                f"header {PREFERENCES_HEADER} must be a JSON object like the `switchboard` body field",
                param=PREFERENCES_HEADER,
            ) from None


NO_HINTS = Hints()


@dataclass(frozen=True, slots=True)
class Routed:
    decision: RouteDecision
    verdict: PrivacyVerdict
    policy: RoutePolicy
    prompt_tokens: int  # the estimate routing used; admission reserves it too
    output_tokens: int  # max_tokens, or routing.default_output_tokens


def requested_floor(header: str | None) -> PrivacyTier | None:
    if header is None:
        return None
    try:
        return PrivacyTier(header.strip().lower())
    except ValueError:
        tiers = ", ".join(t.value for t in PrivacyTier)
        raise InvalidRequest(
            f"header {PRIVACY_HEADER} must be one of {tiers}", param=PRIVACY_HEADER
        ) from None


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """About 4 characters per token plus a few per message for the chat template."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, Mapping))
    return chars // 4 + 4 * len(messages)


def plan(
    routing: RoutingState,
    team: str,
    body: ChatCompletionBody,
    messages: Sequence[Mapping[str, Any]],
    hints: Hints = NO_HINTS,
    *,
    now_s: float,
) -> Routed:
    """The decision, possibly with no candidates. Raises only for the request itself (bad header or
    preferences, sensitive data under `on_sensitive = block`)."""
    team_floor, on_sensitive = routing.team_floor(team)
    asked = requested_floor(hints.privacy)
    try:
        verdict = privacy_floor(team_floor, asked, detect_messages(messages), on_sensitive)
    except SensitiveDataBlocked as exc:
        raise SensitiveDataRefused(str(exc) + f" (config: teams.{team}.on_sensitive)") from None
    try:
        prefs = parse_preferences(hints.preferences_field(body.switchboard))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=str(exc).split(":", 1)[0]) from None
    policy = narrow(routing.policy(team), prefs)
    prompt_tokens = estimate_prompt_tokens(messages)
    output_tokens = body.max_output_tokens() or routing.config.routing.default_output_tokens
    request = RouteRequest(
        public_model=body.model,
        prompt_tokens=prompt_tokens,
        expected_output_tokens=output_tokens,
        privacy_floor=verdict.floor,
        needs_tools=body.tools is not None,
        needs_json=body.response_format is not None,
        preferences=prefs,
        privacy_reason=verdict.reason,
    )
    decision = choose(request, routing.snapshot(now_s), policy, now_s=now_s)
    return Routed(decision, verdict, policy, prompt_tokens, output_tokens)


_HINTS = {
    RejectCode.PRIVACY: "config: teams.{team}.privacy_floor, backends.{backend}.privacy_tier or {header}",
    RejectCode.TOOLS: "config: backends.{backend}.supports_tools",
    RejectCode.JSON: "config: backends.{backend}.supports_response_format",
    RejectCode.CONTEXT: "config: models.{model} context_tokens; or send a shorter prompt or max_tokens",
    RejectCode.CIRCUIT_OPEN: "it failed repeatedly; retried after routing.breaker_open_s",
}


def _explain(rejection: Rejection, team: str, model: str) -> str:
    hints = {
        _HINTS[code].format(team=team, backend=rejection.backend, model=model, header=PRIVACY_HEADER)
        for code in rejection.codes
        if code in _HINTS
    }
    text = ", ".join(rejection.reasons)
    return f"`{rejection.backend}`: {text}" + (f" ({'; '.join(sorted(hints))})" if hints else "")


def fail_closed_error(routed: Routed, team: str) -> NoEligibleDeployment | NoHealthyDeployment | None:
    """The error a decision without candidates gets: it names the floor and every rejection."""
    decision, verdict = routed.decision, routed.verdict
    if decision.candidates:
        return None
    parts = "; ".join(_explain(r, team, decision.public_model) for r in decision.rejected)
    message = (
        f"no deployment of model `{decision.public_model}` may serve this request under privacy floor "
        f"`{verdict.floor}` ({verdict.reason}): {parts}"
    )
    if any(_TRANSIENT.intersection(r.codes) for r in decision.rejected):
        return NoHealthyDeployment(message)
    return NoEligibleDeployment(message, param="model")


def privacy_class(verdict: PrivacyVerdict) -> str:
    """What the ledger keeps: the floor and the kinds detected, e.g. `internal:email,phone`."""
    kinds = ",".join(verdict.detections)
    return f"{verdict.floor}:{kinds}" if kinds else str(verdict.floor)


def candidates_json(decision: RouteDecision) -> str:
    """The ranked candidates with their score terms, for the ledger and the explain endpoint."""
    return orjson.dumps(ranked_view(decision)).decode()


def ranked_view(decision: RouteDecision) -> list[dict[str, object]]:
    return [
        {
            "deployment": c.deployment_id,
            "backend": c.deployment.backend,
            "latency_ms": round(c.latency_ms, 1),
            "cost_usd": str(c.cost_usd.normalize()),
            "score": round(c.score, 4),
        }
        for c in decision.ranked
    ]
