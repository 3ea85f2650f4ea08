"""Property: whatever the config, policy, headers and text, no request reaches a backend below its privacy
floor, sensitive text never reaches an external backend under `raise_floor`, and fallback keeps both true."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from backends.base import BackendKind, ChatRequest
from backends.errors import BackendUnavailable
from gateway.config import parse_config
from gateway.errors import AllBackendsFailed, NoEligibleDeployment, NoHealthyDeployment, SensitiveDataRefused
from gateway.live.state import RoutingState, build_specs
from gateway.pipeline import dispatch
from gateway.pipeline import plan as route
from gateway.pipeline.request import Timing
from gateway.translate.openai_chat import ChatCompletionBody, chat_request, parse_chat_body
from routing.decision import FREE, Deployment
from routing.privacy import PrivacyTier, SensitivePolicy
from tests.support.scripted import ScriptedBackend

TIERS = list(PrivacyTier)
SECRETS = ["reach me at jane.doe@example.com", "card 4111 1111 1111 1111", "IBAN DE89 3704 0044 0532 0130 00"]

# Examples the property saw, and how many of them got past planning to dispatch: a generator whose
# scenarios almost all fail closed before dispatch would check nothing (see the final test below).
REACHED = {"examples": 0, "dispatched": 0}
MIN_DISPATCHED_FRAC = 0.5  # measured with this generator: 79-88% of 150 examples dispatch (7 seeds)


def decide(
    routing: RoutingState,
    body: ChatCompletionBody,
    messages: tuple[dict[str, object], ...],
    hints: route.Hints,
) -> route.Routed:
    """What the pipeline does before dispatch: plan, then fail closed."""
    call = dataclasses.replace(chat_request(body, "r", 5.0), messages=messages)
    routed = route.plan(routing, "t", call, hints, body.switchboard, now_s=0.0)
    refused = route.fail_closed_error(routed, "t")
    if refused is not None:
        raise refused
    return routed


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, 5))
    return {
        "tiers": [draw(st.sampled_from(TIERS)) for _ in range(n)],
        "fails": [draw(st.booleans()) for _ in range(n)],
        "team_floor": draw(st.sampled_from(TIERS)),
        "on_sensitive": draw(st.sampled_from([SensitivePolicy.RAISE_FLOOR, SensitivePolicy.ALLOW])),
        "header": draw(st.none() | st.sampled_from([t.value for t in TIERS])),
        "secret": draw(st.none() | st.sampled_from(SECRETS)),
        "objective": draw(st.sampled_from(["cost", "latency", "balanced"])),
    }


def build(s: dict[str, object]) -> tuple[RoutingState, dict[str, ScriptedBackend]]:
    tiers = s["tiers"]
    assert isinstance(tiers, list)
    names = [f"b{i}" for i in range(len(tiers))]
    backends = {
        name: ScriptedBackend(name, BackendUnavailable("down") if fail else "ok")
        for name, fail in zip(names, s["fails"], strict=True)  # type: ignore[call-overload]
    }
    config = parse_config(
        {
            "backends": {
                name: {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "privacy_tier": tier.value}
                for name, tier in zip(names, tiers, strict=True)
            },
            "models": {"m": {"deployments": [
                {"backend": n, "input_usd_per_mtok": i, "output_usd_per_mtok": i} for i, n in enumerate(names)
            ]}},
            "teams": {"t": {"privacy_floor": s["team_floor"], "on_sensitive": s["on_sensitive"],
                            "objective": s["objective"], "max_attempts": 5}},
        }
    )  # fmt: skip
    deps = {"m": tuple(Deployment("m", n, BackendKind.OPENAI, "m", FREE) for n in names)}
    return RoutingState(config, build_specs(config, backends, deps)), backends


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_no_request_reaches_a_backend_below_its_floor(s: dict[str, object]) -> None:
    routing, backends = build(s)
    text = f"hello {s['secret']}" if s["secret"] else "hello"
    body = parse_chat_body(
        f'{{"model": "m", "messages": [{{"role": "user", "content": "{text}"}}]}}'.encode()
    )
    messages = tuple(m.model_dump(exclude_none=True) for m in body.messages)
    hints = route.Hints(privacy=s["header"])  # type: ignore[arg-type]
    REACHED["examples"] += 1
    try:
        routed = decide(routing, body, messages, hints)
    except (NoEligibleDeployment, NoHealthyDeployment) as exc:
        event(f"failed closed before dispatch ({type(exc).__name__})")
        return  # fail closed: nothing was sent anywhere
    event("reached dispatch")
    REACHED["dispatched"] += 1
    floor = routed.verdict.floor
    team_floor = s["team_floor"]
    assert isinstance(team_floor, PrivacyTier)
    assert floor.rank <= team_floor.rank  # never less private than the team's floor
    if s["header"] is not None:
        assert floor.rank <= PrivacyTier(s["header"]).rank
    if s["secret"] is not None and s["on_sensitive"] is SensitivePolicy.RAISE_FLOOR:
        assert floor.rank <= PrivacyTier.INTERNAL.rank
    tier_of = dict(zip([f"b{i}" for i in range(5)], s["tiers"], strict=False))  # type: ignore[call-overload]
    for dep in routed.decision.candidates:
        assert floor.allows(tier_of[dep.backend])
    plan = dispatch.Plan(backends=backends, timeouts_s={}, routing=routing, max_attempts=5, backoff_s=0.0)
    request = ChatRequest(model="m", messages=messages, request_id="r", timeout_s=5)
    try:
        served = asyncio.run(dispatch.complete(routed.decision, request, Timing(0.0, "r"), plan))
        assert floor.allows(tier_of[served.deployment.backend])
    except AllBackendsFailed:
        pass
    for name, backend in backends.items():
        if backend.calls:  # every backend that saw the request, fallbacks included, was private enough
            assert floor.allows(tier_of[name]), (name, tier_of[name], floor)


def test_block_policy_refuses_sensitive_text_before_routing() -> None:
    routing, backends = build(
        {"tiers": [PrivacyTier.EXTERNAL], "fails": [False], "team_floor": PrivacyTier.EXTERNAL,
         "on_sensitive": SensitivePolicy.BLOCK, "header": None, "secret": None, "objective": "cost"}
    )  # fmt: skip
    body = parse_chat_body(
        b'{"model": "m", "messages": [{"role": "user", "content": "mail a.b@example.com"}]}'
    )
    messages = tuple(m.model_dump(exclude_none=True) for m in body.messages)
    with pytest.raises(SensitiveDataRefused) as info:
        decide(routing, body, messages, route.NO_HINTS)
    assert "email" in info.value.message and "a.b@example.com" not in info.value.message
    assert backends["b0"].calls == []


def test_the_property_mostly_reaches_dispatch() -> None:
    """Runs after the property (file order); run alone, it runs the property first."""
    if REACHED["examples"] == 0:
        test_no_request_reaches_a_backend_below_its_floor()
    examples, dispatched = REACHED["examples"], REACHED["dispatched"]
    assert examples > 0
    assert dispatched / examples >= MIN_DISPATCHED_FRAC, (
        f"only {dispatched} of {examples} examples reached dispatch; the generator mostly fails closed early"
    )
