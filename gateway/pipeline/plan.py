"""Turning one request (chat or embeddings) into a route decision: privacy floor, preferences, estimates,
`routing.choose`. A model's `mode` says which of the two it serves; the other is refused naming the setting.

Privacy fails closed: when no deployment at or above the floor can serve, the request gets an error naming the
floor and each rejection; it is never sent to a lower tier. Detector hits are recorded by kind, never text.
Headers may require labels (`x-switchboard-site`, `x-switchboard-labels`), narrowing the team's policy.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends.base import ChatRequest, EmbeddingRequest, deadline_in_range
from gateway.edge.pool import split_node_backend
from gateway.errors import (
    DeadlineUnmeetable,
    InvalidRequest,
    NoEligibleDeployment,
    NoHealthyDeployment,
    NoLiveEdgeNode,
    SensitiveDataRefused,
    UnsupportedParameter,
)
from gateway.live.state import RoutingState, with_model_slo
from gateway.pipeline.access import ModelAccess
from gateway.pipeline.prefix import cached_messages, held_prefix, prefix_keys
from gateway.pipeline.request import (
    LABELS_HEADER,
    NO_HINTS,
    PRIVACY_HEADER,
    SITE_HEADER,
    Call,
    GatewayRequest,
    Hints,
    Placement,
)
from routing.decision import RejectCode, Rejection, RouteDecision
from routing.detectors import DetectorKind
from routing.preferences import narrow, parse_preferences
from routing.privacy import (
    PrivacyTier,
    PrivacyVerdict,
    SensitiveDataBlocked,
    detect_request,
    privacy_floor,
)
from routing.scoring import choose
from routing.snapshot import RoutePolicy, RoutePreferences, RouteRequest, RoutingSnapshot

_TRANSIENT = {RejectCode.UNHEALTHY, RejectCode.CIRCUIT_OPEN}
_DEADLINE = {RejectCode.LATENCY, RejectCode.TTFT}  # predicted past a deadline: load passes, so a 503
_LABEL_TEXT = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Routed:
    decision: RouteDecision
    verdict: PrivacyVerdict
    policy: RoutePolicy
    prompt_tokens: int  # the estimate routing used; admission reserves it too
    output_tokens: int  # max_tokens, or routing.default_output_tokens
    edge_missing: tuple[str, ...] = ()  # edge backends with no live node that may serve (no candidates only)
    # (backend, tokens) expected in its prefix cache (it served the previous turn): an attempt there counts
    # only the rest as pending prefill. prefix_key: the conversation's (where it is served: PrefixHolders).
    prefix_cached: tuple[str, int] = ("", 0)
    prefix_key: int | None = None
    system_key: int | None = None  # its system prompt's (gateway.pipeline.prefix.prefix_keys), or None
    messages: int = 0  # a chat's messages; an owned deployment that serves it then holds them and the reply


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


def estimate_input_tokens(call: EmbeddingRequest) -> int:
    """About 4 characters per token for texts; token-id arrays count exactly."""
    return sum(len(i) // 4 + 1 if isinstance(i, str) else len(i) for i in call.inputs)


def check_mode(routing: RoutingState, call: Call) -> None:
    """A chat request to an embedding model, or an embeddings request to a chat model, is refused by name."""
    model = routing.config.models.get(call.model)
    if model is None:
        return
    name = call.model
    if isinstance(call, EmbeddingRequest):
        if model.mode != "embedding":
            raise InvalidRequest(
                f"model `{name}` is not an embedding model; send it chat requests, or embed with a model "
                f'configured for it (config: models.{name}.mode = "embedding")',
                param="model",
            )
        if call.dimensions is not None and not model.supports_dimensions:
            raise UnsupportedParameter(
                f"model `{name}` does not take `dimensions`; remove it (config: "
                f"models.{name}.supports_dimensions)",
                param="dimensions",
            )
    elif model.mode == "embedding":
        raise InvalidRequest(
            f'model `{name}` is an embedding model (config: models.{name}.mode = "embedding"); '
            "send it to POST /v1/embeddings",
            param="model",
        )


def plan(
    routing: RoutingState,
    team: str,
    call: Call,
    hints: Hints = NO_HINTS,
    preferences: Mapping[str, Any] | None = None,
    *,
    now_s: float,
    placement: Placement | None = None,
) -> Routed:
    """The decision, possibly with no candidates. Raises only for the request itself (bad header or
    preferences, sensitive data under `on_sensitive = block`, a model of the other mode)."""
    check_mode(routing, call)
    team_floor, on_sensitive = routing.team_floor(team)
    asked = requested_floor(hints.privacy)
    try:
        verdict = privacy_floor(team_floor, asked, detect_call(call), on_sensitive)
    except SensitiveDataBlocked as exc:
        raise SensitiveDataRefused(str(exc) + f" (config: teams.{team}.on_sensitive)") from None
    if isinstance(call, EmbeddingRequest):
        verdict = opaque_inputs_floor(verdict, call)
    try:
        prefs = parse_preferences(hints.preferences_field(preferences))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=str(exc).split(":", 1)[0]) from None
    policy = with_labels(narrow(routing.policy(team), prefs), hints.required_labels(), team)
    if placement is not None:
        policy = dataclasses.replace(
            policy, ignore=policy.ignore | placement.ignore, order=placement.order or policy.order
        )
    model_cfg = routing.config.models.get(call.model)
    if model_cfg is not None:
        policy = with_model_slo(policy, model_cfg)
    rc = routing.config.routing
    key, system_key, cached_tokens, holder, messages = None, None, 0, None, 0
    if isinstance(call, EmbeddingRequest):
        prompt_tokens, output_tokens, tools, json = estimate_input_tokens(call), 0, False, False
    else:
        prompt_tokens = estimate_prompt_tokens(call.messages)
        output_tokens = call.max_tokens or rc.default_output_tokens
        tools, json = call.tools is not None, call.response_format is not None
        messages = len(call.messages)
        key, system_key, system_count = prefix_keys(
            call.messages, min_chars=rc.prefix_min_chars, max_chars=rc.prefix_max_chars
        )
        if key is not None and (shared := cached_messages(call.messages)):
            held = routing.prefix_held(key, call.model)
            if held is not None:  # as many leading messages as were served there (later turns: the cloud's)
                holder, count = held
                cached_tokens = estimate_prompt_tokens(call.messages[: min(shared, count or shared)])
        if holder is None and system_key is not None:  # no replica holds this conversation: its system prompt
            holder = routing.prefix_holder(system_key, call.model)
            cached_tokens = estimate_prompt_tokens(call.messages[:system_count]) if holder else 0
    request = RouteRequest(
        public_model=call.model,
        prompt_tokens=prompt_tokens,
        expected_output_tokens=output_tokens,
        privacy_floor=verdict.floor,
        needs_tools=tools,
        needs_json=json,
        preferences=prefs,
        privacy_reason=verdict.reason,
        prefix_key=key,
        prefix_tokens=cached_tokens,
        prefix_holder=holder if cached_tokens else None,
    )
    snapshot = routing.snapshot(now_s)
    check_preference_names(prefs, snapshot, routing, call.model)
    decision = choose(request, snapshot, policy, now_s=now_s)
    missing = () if decision.candidates else edge_missing(routing, snapshot, call.model, policy)
    cached = held_prefix(decision, request.prefix_holder, cached_tokens)
    return Routed(
        decision, verdict, policy, prompt_tokens, output_tokens, missing, cached, key, system_key, messages
    )


def with_deadline(call: ChatRequest, policy: RoutePolicy) -> ChatRequest:
    """A chat call carrying when its first token is wanted: the policy's p95 TTFT SLO, else its end-to-end
    one (the first token is due by then too), within what an engine takes. A self-hosted engine queues
    earliest deadline first (backends.base.DEADLINE_HEADER); nothing is sent without an SLO."""
    slo_ms = policy.first_token_deadline_ms
    if slo_ms is None:
        return call
    deadline_ms = deadline_in_range(slo_ms)
    if call.deadline_ms == deadline_ms:
        return call
    return dataclasses.replace(call, deadline_ms=deadline_ms)


class Planner:
    """Model access, then the route: the first steps of the pipeline, with no side effects."""

    def __init__(self, routing: RoutingState, access: ModelAccess) -> None:
        self.routing, self.access = routing, access

    async def route(self, request: GatewayRequest, *, now_s: float) -> Routed:
        await self.access.check_model(request.identity, request.model)
        return plan(
            self.routing,
            request.identity.team,
            request.call,
            request.hints,
            request.preferences,
            now_s=now_s,
            placement=request.placement,
        )


def detect_call(call: Call) -> tuple[DetectorKind, ...]:
    """Sensitive data anywhere a backend will see it: every field of every message, and the request-level
    values sent along (stop strings, tools with their descriptions and schemas, tool_choice, the response
    format's schema, user, pass-through headers); for embeddings, every text input and `user`. Fields a
    translator does not forward never reach a backend."""
    if isinstance(call, EmbeddingRequest):
        return detect_request((), [e for e in (*call.texts, call.user) if e])
    extras = (call.stop, call.tools, call.tool_choice, call.response_format, call.user, call.prompt)
    return detect_request(call.messages, [e for e in (*extras, call.passthrough_headers) if e])


def opaque_inputs_floor(verdict: PrivacyVerdict, call: EmbeddingRequest) -> PrivacyVerdict:
    """Token-id inputs cannot be scanned (their tokenizer is the caller's), so they fail closed: served no
    less privately than `internal`."""
    if not call.inputs or isinstance(call.inputs[0], str) or verdict.floor.rank <= PrivacyTier.INTERNAL.rank:
        return verdict
    reason = f"{verdict.reason}; token-id input cannot be scanned, raised to {PrivacyTier.INTERNAL}"
    return dataclasses.replace(verdict, floor=PrivacyTier.INTERNAL, reason=reason)


def check_preference_names(
    prefs: RoutePreferences, snapshot: RoutingSnapshot, routing: RoutingState, model: str
) -> None:
    """A name in `order`, `only` or `ignore` that no deployment of the model carries is a typo, refused
    rather than silently ignored. Edge backends count with every node (`edge/node-1`) they may have."""
    if not (prefs.order or prefs.only or prefs.ignore):
        return  # nothing named (most requests)
    asked = [("order", n) for n in prefs.order]
    asked += [("only", n) for n in sorted(prefs.only or ())] + [("ignore", n) for n in sorted(prefs.ignore)]
    if not asked:
        return
    known: set[str] = set()
    for entry in snapshot.by_model.get(model, ()):
        known |= entry.names
    edge = {t.backend for t in routing.edge_templates if t.public_model == model}
    for key, name in asked:
        if name in known or name in edge or name.split("/", 1)[0] in edge:
            continue
        listing = ", ".join(sorted(known | edge)) or "none"
        raise InvalidRequest(
            f"switchboard.{key}: model `{model}` has no deployment or backend named `{name}`; "
            f"known: {listing}",
            param=f"switchboard.{key}",
        )


def with_labels(policy: RoutePolicy, wanted: Mapping[str, str], team: str) -> RoutePolicy:
    """The team's policy, further requiring the labels a request asked for; never widening it."""
    if not wanted:
        return policy
    required = dict(policy.required_labels)
    for key, value in wanted.items():
        allowed = required.get(key)
        if allowed is not None and value not in allowed:
            raise InvalidRequest(
                f"the request asks for label {key}={value}, but team `{team}` allows only "
                f"{key} in {', '.join(sorted(allowed))} (config: teams.{team}.required_labels)",
                param=SITE_HEADER if key == "site" else LABELS_HEADER,
            )
        required[key] = frozenset((value,))
    return dataclasses.replace(policy, required_labels=required)


def edge_missing(
    routing: RoutingState, snapshot: RoutingSnapshot, model: str, policy: RoutePolicy
) -> tuple[str, ...]:
    """The model's edge backends (kind = "edge") without a live node carrying the required labels."""
    backends = {t.backend for t in routing.edge_templates if t.public_model == model}
    if not backends:
        return ()
    for entry in snapshot.by_model.get(model, ()):
        pair = split_node_backend(entry.spec.backend)
        labels = entry.spec.labels
        if pair is not None and all(labels.get(k) in v for k, v in policy.required_labels.items()):
            backends.discard(pair[0])
    return tuple(sorted(backends))


def _deadline_hint(setting: str, what: str) -> str:
    """Where a deadline is set: the team's, the model's or the request's (the tightest applies)."""
    return (
        f"config: teams.{{team}}.{setting} or models.{{model}}.{setting} is {what}, or the request's "
        f"switchboard.{setting}; its queue is too deep to meet it now"
    )


_HINTS = {
    RejectCode.PRIVACY: "config: teams.{team}.privacy_floor, backends.{backend}.privacy_tier or {header}",
    RejectCode.TOOLS: "config: backends.{backend}.supports_tools",
    RejectCode.JSON: "config: backends.{backend}.supports_response_format",
    RejectCode.CONTEXT: "config: models.{model} context_tokens; or send a shorter prompt or max_tokens",
    RejectCode.CIRCUIT_OPEN: "it failed repeatedly; retried after routing.breaker_open_s",
    RejectCode.LABEL: "config: teams.{team}.required_labels, or the request's "
    + f"{SITE_HEADER} / {LABELS_HEADER} header",
    RejectCode.UNHEALTHY: "its health probe fails; see backends.{backend}.health_interval_s",
    RejectCode.LATENCY: _deadline_hint("max_latency_ms", "the deadline"),
    RejectCode.TTFT: _deadline_hint("max_ttft_ms", "the first token's deadline"),
}


def _explain(rejection: Rejection, team: str, model: str) -> str:
    hints = {
        _HINTS[code].format(team=team, backend=rejection.backend, model=model, header=PRIVACY_HEADER)
        for code in rejection.codes
        if code in _HINTS
    }
    text = ", ".join(rejection.reasons)
    return f"`{rejection.backend}`: {text}" + (f" ({'; '.join(sorted(hints))})" if hints else "")


def _no_node(backend: str, model: str, policy: RoutePolicy) -> str:
    labels = ", ".join(f"{k}={'|'.join(sorted(v))}" for k, v in sorted(policy.required_labels.items()))
    which = f" labelled {labels}" if labels else ""
    return (
        f"`{backend}`: no live edge node{which} serves `{model}` (start one with `switchboard edge serve "
        "--gateway URL --token TOKEN`; see GET /admin/edge/nodes)"
    )


def fail_closed_error(
    routed: Routed, team: str
) -> NoEligibleDeployment | NoHealthyDeployment | NoLiveEdgeNode | DeadlineUnmeetable | None:
    """The error a decision without candidates gets: it names the floor and every rejection. An edge
    backend without a live node is transient (503): a node may connect at any moment."""
    decision, verdict = routed.decision, routed.verdict
    if decision.candidates:
        return None
    model = decision.public_model
    explained = [_explain(r, team, model) for r in decision.rejected]
    explained += [_no_node(b, model, routed.policy) for b in routed.edge_missing]
    message = (
        f"no deployment of model `{model}` may serve this request under privacy floor "
        f"`{verdict.floor}` ({verdict.reason}): {'; '.join(explained)}"
    )
    if routed.edge_missing and verdict.floor is PrivacyTier.EDGE:
        return NoLiveEdgeNode(message)
    if routed.edge_missing or any(_TRANSIENT.intersection(r.codes) for r in decision.rejected):
        return NoHealthyDeployment(message)
    if any(_DEADLINE.intersection(r.codes) for r in decision.rejected):
        return DeadlineUnmeetable(message)  # load passes: 503, not a 400 the client cannot fix
    return NoEligibleDeployment(message, param="model")
