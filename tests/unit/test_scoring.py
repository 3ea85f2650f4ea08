"""Scored routing (`routing.scoring.choose`) over made-up snapshots: objectives, hard filters, preferences,
owned capacity at marginal cost 0, and properties that hold for any snapshot, policy and request. No I/O."""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal
from typing import TypeVar, cast

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from backends.base import BackendKind
from routing.decision import FREE, Deployment, Price, RejectCode
from routing.decision import choose as core_choose
from routing.preferences import narrow, parse_preferences
from routing.privacy import PrivacyTier
from routing.scoring import choose
from routing.snapshot import (
    DeploymentSpec,
    DeploymentStats,
    HourlyPrice,
    MaxPrice,
    Objective,
    RoutePolicy,
    RoutePreferences,
    RouteRequest,
    RoutingSnapshot,
    SortBy,
)

T = PrivacyTier
CHEAP = Price(Decimal("0.15"), Decimal("0.60"))
DEAR = Price(Decimal("3"), Decimal("15"))


def spec(
    dep_id: str, tier: T = T.EXTERNAL, price: Price | HourlyPrice = CHEAP, **kw: object
) -> DeploymentSpec:
    kind = BackendKind.LOCAL if isinstance(price, HourlyPrice) else BackendKind.CLOUD
    fields: dict[str, object] = dict(
        public_model="m", deployment_id=dep_id, backend=f"be-{dep_id}", backend_kind=kind,
        upstream_model=f"up-{dep_id}", privacy_tier=tier, price=price,
    )  # fmt: skip
    fields.update(kw)
    return DeploymentSpec(**fields)  # type: ignore[arg-type]


def stats(ttft_ms: float = 200.0, decode_tokens_per_s: float = 100.0, **kw: object) -> DeploymentStats:
    return DeploymentStats(ttft_ms=ttft_ms, decode_tokens_per_s=decode_tokens_per_s, **kw)  # type: ignore[arg-type]


def snap(*pairs: tuple[DeploymentSpec, DeploymentStats]) -> RoutingSnapshot:
    return RoutingSnapshot({s.deployment_id: (s, st_) for s, st_ in pairs})


def req(floor: T = T.EXTERNAL, **kw: object) -> RouteRequest:
    fields: dict[str, object] = dict(public_model="m", prompt_tokens=1000, expected_output_tokens=100)
    fields.update(kw)
    return RouteRequest(privacy_floor=floor, **fields)  # type: ignore[arg-type]


def ids(decision: object) -> list[str]:
    return [c.deployment_id for c in decision.ranked]  # type: ignore[attr-defined]


def rejected(decision: object) -> dict[str, tuple[str, ...]]:
    return {r.deployment_id: r.reasons for r in decision.rejected}  # type: ignore[attr-defined]


# Three deployments that each win one objective: fast and dear, slow and cheap, and one in between.
FAST = (spec("fast", price=DEAR), stats(ttft_ms=100, decode_tokens_per_s=200))  # 600 ms, 0.0045 USD
SLOW = (
    spec("slow", price=Price(Decimal("0.05"), Decimal("0.1"))),
    stats(ttft_ms=900, decode_tokens_per_s=20),
)
MIDDLE = (spec("middle", price=CHEAP), stats(ttft_ms=200, decode_tokens_per_s=100))  # 1200 ms, 0.00021 USD
TRIO = snap(FAST, SLOW, MIDDLE)


@pytest.mark.parametrize(
    ("objective", "winner"),
    [(Objective.COST, "slow"), (Objective.LATENCY, "fast"), (Objective.BALANCED, "middle")],
)
def test_objective_picks_its_winner(objective: Objective, winner: str) -> None:
    decision = choose(req(), TRIO, RoutePolicy(objective=objective), now_s=0)
    assert ids(decision)[0] == winner
    assert decision.candidates[0].upstream_model == f"up-{winner}"
    assert [c.score for c in decision.ranked] == sorted(c.score for c in decision.ranked)


def test_score_terms_are_the_predictions() -> None:
    decision = choose(req(), TRIO, RoutePolicy(objective=Objective.LATENCY), now_s=0)
    fast = decision.ranked[0]
    assert fast.latency_ms == pytest.approx(100 + 100 * 1000 / 200)
    assert fast.cost_usd == Decimal(1000) * 3 / 10**6 + Decimal(100) * 15 / 10**6
    assert fast.score == pytest.approx(600 / 5900)  # latency / slowest eligible (900 + 5000 ms)
    assert decision.reason == "fastest eligible: fast (0.0045 USD, 600 ms); 3 eligible, 0 rejected"


def test_queue_wait_uses_measured_p50_else_own_service_time() -> None:
    queued = snap(
        (spec("p50"), stats(ttft_ms=100, decode_tokens_per_s=100, queue_depth=2, p50_latency_ms=500)),
        (spec("own"), stats(ttft_ms=100, decode_tokens_per_s=100, queue_depth=2)),
    )
    latency = {c.deployment_id: c.latency_ms for c in choose(req(), queued, RoutePolicy(), now_s=0).ranked}
    assert latency["p50"] == pytest.approx(2 * 500 + 100 + 1000)
    assert latency["own"] == pytest.approx(3 * (100 + 1000))


def test_cheapest_eligible_reason_names_idle_local_box() -> None:
    local = (spec("local", T.INTERNAL, HourlyPrice(Decimal(4))), stats(ttft_ms=50, decode_tokens_per_s=125))
    decision = choose(req(T.INTERNAL), snap(local, FAST), RoutePolicy(objective=Objective.COST), now_s=0)
    assert decision.reason == "cheapest eligible: local (0.0000 USD, 850 ms); 1 eligible, 1 rejected"
    assert decision.privacy_verdict == "floor internal: 1 of 2 deployments private enough; below floor: fast"


# --- hard filters ---------------------------------------------------------------------------------------

NONE, QUALITY_2, FAST_ONLY = RoutePolicy(), RoutePolicy(min_quality_tier=2), RoutePolicy(max_latency_ms=1000)
HARD_FILTERS = [
    ("privacy", spec("x", T.EXTERNAL), stats(), req(T.INTERNAL), NONE, "tier external < floor internal"),
    ("context", spec("x", context_tokens=1050), stats(), req(), NONE, "context 1050 < 1100 tokens needed"),
    ("tools", spec("x", supports_tools=False), stats(), req(needs_tools=True), NONE, "no tool support"),
    ("json", spec("x", supports_json=False), stats(), req(needs_json=True), NONE, "no JSON mode"),
    ("quality", spec("x", quality_tier=1), stats(), req(), QUALITY_2, "quality 1 < min 2"),
    ("unhealthy", spec("x"), stats(healthy=False), req(), NONE, "unhealthy"),
    ("circuit", spec("x"), stats(circuit_open_until_s=10.0), req(), NONE, "circuit open"),
    (
        "label", spec("x", labels={"region": "us"}), stats(), req(),
        RoutePolicy(required_labels={"region": frozenset({"eu"})}), "label region=us not in eu",
    ),
    (
        "label missing", spec("x"), stats(), req(),
        RoutePolicy(required_labels={"site": frozenset({"a", "b"})}), "label site=(none) not in a, b",
    ),
    ("team only", spec("x"), stats(), req(), RoutePolicy(only=frozenset({"y"})), "not in team `only`"),
    (
        "request only", spec("x"), stats(), req(preferences=RoutePreferences(only=frozenset({"y"}))),
        NONE, "not in request `only`",
    ),
    (
        "ignore", spec("x"), stats(), req(preferences=RoutePreferences(ignore=frozenset({"be-x"}))),
        NONE, "in `ignore`",
    ),
    (
        "input price", spec("x", price=DEAR), stats(), req(), RoutePolicy(max_input_usd_per_mtok=Decimal(1)),
        "input 3 USD/Mtok > max",
    ),
    (
        "output price", spec("x", price=DEAR), stats(), req(),
        RoutePolicy(max_output_usd_per_mtok=Decimal(10)), "output 15 USD/Mtok > max",
    ),
    ("latency", spec("x"), stats(), req(), FAST_ONLY, "predicted 1200 ms > max 1000 ms"),
    (
        "cost", spec("x", price=DEAR), stats(), req(), RoutePolicy(max_usd_per_request=Decimal("0.001")),
        "predicted 0.004500 USD > max 0.001000 USD",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("dep", "dep_stats", "route_request", "policy", "why"), [case[1:] for case in HARD_FILTERS],
    ids=[case[0] for case in HARD_FILTERS],
)  # fmt: skip
def test_hard_filter_rejects_with_reason(
    dep: DeploymentSpec,
    dep_stats: DeploymentStats,
    route_request: RouteRequest,
    policy: RoutePolicy,
    why: str,
) -> None:
    decision = choose(route_request, snap((dep, dep_stats)), policy, now_s=0)
    assert decision.candidates == () and decision.ranked == ()
    assert rejected(decision) == {"x": (why,)}
    assert why in decision.reason  # fail closed: the reason names every rejection


def test_fail_closed_names_the_floor_and_every_rejection() -> None:
    deps = snap(
        (spec("cloud", T.EXTERNAL), stats()),
        (spec("small", T.EDGE, context_tokens=512), stats(healthy=False)),
    )
    decision = choose(req(T.INTERNAL), deps, RoutePolicy(), now_s=0)
    assert decision.candidates == ()
    assert decision.reason == (
        "no eligible deployment for `m` (privacy floor internal): cloud: tier external < floor internal; "
        "small: context 512 < 1100 tokens needed, unhealthy"
    )
    codes = {r.deployment_id: r.codes for r in decision.rejected}
    assert codes == {"cloud": (RejectCode.PRIVACY,), "small": (RejectCode.CONTEXT, RejectCode.UNHEALTHY)}


def test_unknown_model_fails_closed() -> None:
    decision = choose(req(public_model="nope"), TRIO, RoutePolicy(), now_s=0)
    assert decision.candidates == () and decision.reason == "no deployment serves `nope`"


def test_circuit_closes_when_its_time_has_passed() -> None:
    deps = snap((spec("x"), stats(circuit_open_until_s=10.0)))
    assert choose(req(), deps, RoutePolicy(), now_s=9.9).candidates == ()
    assert ids(choose(req(), deps, RoutePolicy(), now_s=10.0)) == ["x"]


def test_json_is_soft_when_team_does_not_require_parameters() -> None:
    deps = snap((spec("x", supports_json=False), stats()))
    relaxed = RoutePolicy(require_parameters=False)
    assert ids(choose(req(needs_json=True), deps, relaxed, now_s=0)) == ["x"]
    strict = RoutePreferences(require_parameters=True)  # a request may tighten it again
    assert choose(req(needs_json=True, preferences=strict), deps, relaxed, now_s=0).candidates == ()


def test_tools_are_always_hard() -> None:
    deps = snap((spec("x", supports_tools=False), stats()))
    assert (
        choose(req(needs_tools=True), deps, RoutePolicy(require_parameters=False), now_s=0).candidates == ()
    )


def test_attempts_and_fallbacks_bound_the_try_list() -> None:
    assert len(choose(req(), TRIO, RoutePolicy(max_attempts=2), now_s=0).candidates) == 2
    assert len(choose(req(), TRIO, RoutePolicy(allow_fallbacks=False), now_s=0).candidates) == 1
    no_fallbacks = req(preferences=RoutePreferences(allow_fallbacks=False))
    decision = choose(no_fallbacks, TRIO, RoutePolicy(), now_s=0)
    assert len(decision.candidates) == 1 and len(decision.ranked) == 3


def test_preferred_labels_break_near_ties() -> None:
    twins = snap(
        (spec("us", labels={"region": "us"}), stats()),
        (spec("eu", labels={"region": "eu"}), stats(ttft_ms=210)),
    )
    assert ids(choose(req(), twins, RoutePolicy(), now_s=0))[0] == "us"
    assert ids(choose(req(), twins, RoutePolicy(preferred_labels={"region": "eu"}), now_s=0))[0] == "eu"


# --- preferences -------------------------------------------------------------------------------------------


def test_parse_preferences_reads_the_openrouter_shape() -> None:
    prefs = parse_preferences(
        {
            "order": ["slow", "be-fast"], "only": ["slow", "fast"], "ignore": ["middle"], "sort": "price",
            "require_parameters": True, "allow_fallbacks": False, "max_latency_ms": 2000, "max_ttft_ms": 900,
            "max_price": {"prompt": 1, "completion": 2.5, "request": 0.01},
        }
    )  # fmt: skip
    assert prefs == RoutePreferences(
        order=("slow", "be-fast"), only=frozenset({"slow", "fast"}), ignore=frozenset({"middle"}),
        sort=SortBy.PRICE, require_parameters=True, allow_fallbacks=False, max_latency_ms=2000.0,
        max_ttft_ms=900.0, max_price=MaxPrice(Decimal(1), Decimal("2.5"), Decimal("0.01")),
    )  # fmt: skip
    assert parse_preferences(None) == parse_preferences({}) == RoutePreferences()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "switchboard: expected an object, got list"),
        ({"prefer": 1}, "switchboard: unknown field `prefer`"),
        ({"order": "a"}, "switchboard.order: expected a list of deployment or backend names"),
        ({"only": ["a", 3]}, "switchboard.only: expected a list"),
        ({"ignore": [""]}, "switchboard.ignore: expected a list"),
        ({"sort": "throughput"}, "switchboard.sort: expected one of price, latency, got 'throughput'"),
        ({"allow_fallbacks": "no"}, "switchboard.allow_fallbacks: expected true or false"),
        ({"require_parameters": 1}, "switchboard.require_parameters: expected true or false"),
        ({"max_price": 3}, "switchboard.max_price: expected an object"),
        ({"max_price": {"image": 1}}, "switchboard.max_price: unknown field `image`"),
        ({"max_price": {"prompt": -1}}, "switchboard.max_price.prompt: expected a number >= 0"),
        ({"max_price": {"request": True}}, "switchboard.max_price.request: expected a number >= 0"),
        ({"max_price": {"completion": math.nan}}, "switchboard.max_price.completion: expected a number"),
        ({"max_latency_ms": 0}, "switchboard.max_latency_ms: expected a number > 0"),
        ({"max_ttft_ms": -5}, "switchboard.max_ttft_ms: expected a number > 0"),
    ],
)
def test_parse_preferences_names_the_bad_field(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        parse_preferences(raw)


def test_narrow_never_widens_the_team_policy() -> None:
    team = RoutePolicy(
        objective=Objective.BALANCED, max_latency_ms=1000, max_ttft_ms=800,
        max_usd_per_request=Decimal("0.01"), max_input_usd_per_mtok=Decimal(1), require_parameters=True,
        allow_fallbacks=False, ignore=frozenset({"a"}), only=frozenset({"a", "b"}),
    )  # fmt: skip
    loose = RoutePreferences(
        max_latency_ms=5000, max_ttft_ms=3000, max_price=MaxPrice(Decimal(9), Decimal(9), Decimal(9)),
        require_parameters=False,
        allow_fallbacks=True, ignore=frozenset({"c"}), only=frozenset({"a", "b", "z"}), sort=SortBy.LATENCY,
    )  # fmt: skip
    got = narrow(team, loose)
    assert (got.max_latency_ms, got.max_usd_per_request, got.max_input_usd_per_mtok) == (
        1000,
        Decimal("0.01"),
        1,
    )
    assert got.max_ttft_ms == 800
    assert got.max_output_usd_per_mtok == Decimal(9)  # the team had no cap: the request's applies
    assert got.require_parameters and not got.allow_fallbacks
    assert got.ignore == {"a", "c"} and got.only == team.only  # a request's `only` is checked on top
    assert got.objective is Objective.LATENCY  # ranking only
    tight = RoutePreferences(
        max_latency_ms=500, max_ttft_ms=300, max_price=MaxPrice(request_usd=Decimal("0.001"))
    )
    assert narrow(team, tight).max_ttft_ms == 300
    assert narrow(RoutePolicy(), RoutePreferences(max_ttft_ms=700)).max_ttft_ms == 700
    assert (narrow(team, tight).max_latency_ms, narrow(team, tight).max_usd_per_request) == (
        500,
        Decimal("0.001"),
    )


def test_empty_only_admits_nothing() -> None:
    request = req(preferences=parse_preferences({"only": []}))
    assert choose(request, TRIO, RoutePolicy(), now_s=0).candidates == ()


def test_request_only_cannot_reach_past_team_only() -> None:
    request = req(preferences=RoutePreferences(only=frozenset({"fast", "slow"})))
    decision = choose(request, TRIO, RoutePolicy(only=frozenset({"slow", "middle"})), now_s=0)
    assert ids(decision) == ["slow"]


def test_sort_and_order_rerank_without_widening() -> None:
    by_price = req(preferences=RoutePreferences(sort=SortBy.PRICE))
    assert ids(choose(by_price, TRIO, RoutePolicy(objective=Objective.LATENCY), now_s=0))[0] == "slow"
    ordered = req(preferences=RoutePreferences(order=("be-middle", "fast")))
    decision = choose(ordered, TRIO, RoutePolicy(objective=Objective.COST), now_s=0)
    assert ids(decision) == ["middle", "fast", "slow"]
    assert decision.reason.startswith("first in requested order: middle")
    outside = req(T.INTERNAL, preferences=RoutePreferences(order=("fast",)))
    assert choose(outside, TRIO, RoutePolicy(), now_s=0).candidates == ()  # order never admits


# --- owned capacity --------------------------------------------------------------------------------------

HOURLY = HourlyPrice(Decimal("3.6"))  # 0.001 USD per second, paid whatever the box serves


@pytest.mark.parametrize(
    "load",
    [dict(), dict(kv_cache_used_frac=0.9, in_flight=4), dict(in_flight=8, queue_depth=3)],
)
def test_owned_capacity_costs_nothing_at_the_margin_under_any_load(load: dict[str, float]) -> None:
    local = (spec("local", T.INTERNAL, HOURLY), stats(**load))
    decision = choose(req(T.INTERNAL), snap(local), RoutePolicy(), now_s=0)
    assert decision.ranked[0].cost_pusd == 0
    assert decision.candidates[0].price == FREE  # the ledger's cloud money: none
    assert decision.candidates[0].usd_per_hour == Decimal("3.6")  # the fixed cost, for chargeback


def test_owned_box_wins_on_cost_and_loses_on_latency_without_an_slo() -> None:
    local = (spec("local", T.INTERNAL, HOURLY), stats(decode_tokens_per_s=20, queue_depth=6))
    cloud = (spec("cloud", T.EXTERNAL_ZDR, CHEAP), stats())
    for objective, winner in ((Objective.COST, "local"), (Objective.LATENCY, "cloud")):
        assert ids(choose(req(), snap(local, cloud), RoutePolicy(objective=objective), now_s=0))[0] == winner


# --- compatibility with [core] -----------------------------------------------------------------------------


def test_core_choose_is_unchanged() -> None:
    deps = {"m": [Deployment("m", "b", BackendKind.OPENAI, "up", FREE)]}
    decision = core_choose("m", deps)
    assert decision.candidates == tuple(deps["m"]) and decision.reason == "single deployment"
    assert decision.ranked == () and decision.rejected == () and decision.privacy_verdict == ""


def test_privacy_reason_is_echoed_in_the_verdict() -> None:
    decision = choose(req(T.INTERNAL, privacy_reason="team floor internal"), TRIO, RoutePolicy(), now_s=0)
    assert decision.privacy_verdict.startswith("team floor internal -> floor internal: 0 of 3")


def test_snapshot_rejects_mismatched_ids() -> None:
    with pytest.raises(ValueError, match="snapshot key `a`"):
        RoutingSnapshot({"a": (spec("b"), stats())})


# --- properties --------------------------------------------------------------------------------------------

X = TypeVar("X")
Y = TypeVar("Y")
NAMES = ("d0", "d1", "d2", "d3", "d4", "d5")
money = st.decimals(min_value=0, max_value=20, places=2)


def rarely(strategy: st.SearchStrategy[X], otherwise: Y) -> st.SearchStrategy[X | Y]:
    """`strategy` one time in six, else `otherwise`: random rules must leave something eligible often."""
    either = st.integers(0, 5).flatmap(lambda i: strategy if i == 0 else st.just(otherwise))
    return cast("st.SearchStrategy[X | Y]", either)


@st.composite
def deployments(draw: st.DrawFn) -> tuple[DeploymentSpec, DeploymentStats]:
    dep_id = draw(st.sampled_from(NAMES))
    hourly = draw(st.booleans())
    price = HourlyPrice(draw(money)) if hourly else Price(draw(money), draw(money))
    dep = spec(
        dep_id, draw(st.sampled_from(T)), price, public_model=draw(rarely(st.just("other"), "m")),
        backend=draw(st.sampled_from(("ba", "bb", f"be-{dep_id}"))), quality_tier=draw(st.integers(0, 2)),
        context_tokens=draw(rarely(st.integers(500, 4000), None)),
        supports_tools=draw(rarely(st.just(False), True)), supports_json=draw(rarely(st.just(False), True)),
        labels=draw(st.dictionaries(st.sampled_from(("region", "site")), st.sampled_from(("eu", "us")))),
    )  # fmt: skip
    live = stats(
        ttft_ms=draw(st.floats(0, 2000)), decode_tokens_per_s=draw(st.floats(5, 500)),
        p50_latency_ms=draw(st.sampled_from((0.0, 800.0))), in_flight=draw(st.integers(0, 8)),
        queue_depth=draw(st.integers(0, 3)), kv_cache_used_frac=draw(st.floats(0, 1)),
        healthy=draw(rarely(st.just(False), True)), circuit_open_until_s=draw(rarely(st.floats(0, 20), None)),
    )  # fmt: skip
    return dep, live


names_set = rarely(st.frozensets(st.sampled_from((*NAMES, "ba", "bb")), max_size=5), None)
caps = rarely(st.decimals(min_value=2, max_value=40, places=2), None)
request_caps = rarely(st.decimals(0, 1, places=4), None)
latency_caps = rarely(st.floats(100, 60_000), None)
region_rules = st.dictionaries(st.just("region"), st.frozensets(st.sampled_from(("eu", "us"))))


@st.composite
def policies(draw: st.DrawFn) -> RoutePolicy:
    return RoutePolicy(
        objective=draw(st.sampled_from(Objective)), max_latency_ms=draw(latency_caps),
        max_usd_per_request=draw(request_caps), max_input_usd_per_mtok=draw(caps),
        max_output_usd_per_mtok=draw(caps), min_quality_tier=draw(rarely(st.integers(1, 2), 0)),
        required_labels=draw(rarely(region_rules, {})),
        preferred_labels=draw(st.dictionaries(st.just("site"), st.sampled_from(("eu", "us")))),
        require_parameters=draw(st.booleans()), allow_fallbacks=draw(st.booleans()),
        max_attempts=draw(st.integers(1, 4)), only=draw(names_set),
        ignore=draw(rarely(st.frozensets(st.sampled_from(NAMES), max_size=2), frozenset())),
    )  # fmt: skip


@st.composite
def preferences(draw: st.DrawFn) -> RoutePreferences:
    return RoutePreferences(
        order=tuple(draw(st.lists(st.sampled_from((*NAMES, "ba")), max_size=3))), only=draw(names_set),
        ignore=draw(rarely(st.frozensets(st.sampled_from(NAMES), max_size=2), frozenset())),
        sort=draw(st.none() | st.sampled_from(SortBy)), require_parameters=draw(st.none() | st.booleans()),
        allow_fallbacks=draw(st.none() | st.booleans()), max_latency_ms=draw(latency_caps),
        max_price=MaxPrice(draw(caps), draw(caps), draw(request_caps)),
    )  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> RouteRequest:
    return req(
        draw(st.sampled_from(T)), prompt_tokens=draw(st.integers(0, 3000)),
        expected_output_tokens=draw(st.integers(0, 1000)), needs_tools=draw(st.booleans()),
        needs_json=draw(st.booleans()), preferences=draw(rarely(preferences(), RoutePreferences())),
    )  # fmt: skip


def violates_a_rule(dep: DeploymentSpec, live: DeploymentStats, request: RouteRequest, team: RoutePolicy,
                    now_s: float, latency_ms: float) -> bool:  # fmt: skip
    """An oracle written from the rules' text, not from the implementation (money compared with slack)."""
    prefs, names = request.preferences, {dep.deployment_id, dep.backend}
    policy = narrow(team, prefs)
    if isinstance(dep.price, HourlyPrice):
        in_usd, out_usd = Decimal(0), Decimal(0)
    else:
        in_usd, out_usd = dep.price.input_usd_per_mtok / 10**6, dep.price.output_usd_per_mtok / 10**6
    cost = request.prompt_tokens * in_usd + request.expected_output_tokens * out_usd
    slack, cap_in, cap_out = Decimal("1e-9"), policy.max_input_usd_per_mtok, policy.max_output_usd_per_mtok
    return (
        not request.privacy_floor.allows(dep.privacy_tier)
        or (dep.context_tokens is not None
            and dep.context_tokens < request.prompt_tokens + request.expected_output_tokens)
        or (request.needs_tools and not dep.supports_tools)
        or (request.needs_json and not dep.supports_json and policy.require_parameters)
        or dep.quality_tier < policy.min_quality_tier
        or not live.healthy
        or (live.circuit_open_until_s is not None and now_s < live.circuit_open_until_s)
        or any(dep.labels.get(k) not in allowed for k, allowed in policy.required_labels.items())
        or (policy.only is not None and not names & policy.only)
        or (prefs.only is not None and not names & prefs.only)
        or bool(names & policy.ignore)
        or (cap_in is not None and in_usd * 10**6 > cap_in + slack)
        or (cap_out is not None and out_usd * 10**6 > cap_out + slack)
        or (policy.max_latency_ms is not None and latency_ms > policy.max_latency_ms * (1 + 1e-9))
        or (policy.max_usd_per_request is not None and cost > policy.max_usd_per_request + slack)
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(deployments(), min_size=1, max_size=8), policies(), requests(), st.floats(0, 20))
def test_choice_properties(
    pairs: list[tuple[DeploymentSpec, DeploymentStats]],
    team: RoutePolicy,
    request: RouteRequest,
    now_s: float,
) -> None:
    snapshot = snap(*pairs)
    decision = choose(request, snapshot, team, now_s=now_s)
    of_model = {d for d, (s, _) in snapshot.deployments.items() if s.public_model == request.public_model}
    eligible, refused = set(ids(decision)), set(rejected(decision))
    assert eligible | refused == of_model and not eligible & refused and len(decision.ranked) == len(eligible)
    for c in decision.ranked:
        assert request.privacy_floor.allows(snapshot.deployments[c.deployment_id][0].privacy_tier)
    keys = [(c.order_position, c.score) for c in decision.ranked]
    assert keys == sorted(keys)
    assert decision.candidates == tuple(c.deployment for c in decision.ranked[: len(decision.candidates)])
    attempts = team.max_attempts if narrow(team, request.preferences).allow_fallbacks else 1
    assert len(decision.candidates) == min(len(eligible), attempts)
    assert all(r.reasons and len(r.codes) == len(r.reasons) for r in decision.rejected)
    for c in decision.ranked:
        dep, live = snapshot.deployments[c.deployment_id]
        assert not violates_a_rule(dep, live, request, team, now_s, c.latency_ms), c.deployment_id
    # Preferences only narrow: without them, everything eligible stays eligible.
    plain = choose(replace(request, preferences=RoutePreferences()), snapshot, team, now_s=now_s)
    assert eligible <= set(ids(plain))


def test_precomputed_privacy_rejection_matches_the_full_rule_text() -> None:
    from routing.scoring import _Context, _spec_reasons
    from routing.snapshot import RoutePolicy as Policy

    snap = RoutingSnapshot({"ext": (spec("ext", tier=T.EXTERNAL), stats())})
    entry = snap.by_model["m"][0]
    for floor in T:
        codes: list[object] = []
        texts: list[str] = []
        _spec_reasons(entry, _Context(Policy(), req(floor)), codes, texts)  # type: ignore[arg-type]
        fast = entry.below_floor[floor.rank]
        if codes:
            assert fast is not None and (fast.codes, fast.reasons) == (tuple(codes), tuple(texts))
        else:
            assert fast is None


slo_terms = st.none() | st.floats(50, 20_000)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(deployments(), min_size=1, max_size=8), policies(), requests(), st.floats(0, 20), slo_terms,
    slo_terms, st.none() | st.integers(0, 2**64 - 1), st.integers(0, 3),
)  # fmt: skip
def test_slo_placement_and_affinity_only_reorder(
    pairs: list[tuple[DeploymentSpec, DeploymentStats]],
    team: RoutePolicy,
    request: RouteRequest,
    now_s: float,
    slo_ttft_ms: float | None,
    slo_e2e_ms: float | None,
    prefix_key: int | None,
    max_waiting: int,
) -> None:
    snapshot = snap(*pairs)
    plain = choose(request, snapshot, team, now_s=now_s)
    policy = replace(
        team, slo_p95_ttft_ms=slo_ttft_ms, slo_p95_e2e_ms=slo_e2e_ms, affinity_max_waiting=max_waiting
    )
    decision = choose(replace(request, prefix_key=prefix_key), snapshot, policy, now_s=now_s)
    assert sorted(ids(decision)) == sorted(ids(plain)) and rejected(decision) == rejected(plain)
    assert decision.candidates == tuple(c.deployment for c in decision.ranked[: len(decision.candidates)])
    for c in decision.ranked:
        assert request.privacy_floor.allows(snapshot.deployments[c.deployment_id][0].privacy_tier)
        met = (slo_ttft_ms is None or c.ttft_ms <= slo_ttft_ms) and (
            slo_e2e_ms is None or c.latency_ms <= slo_e2e_ms
        )
        assert c.slo_met == met
        assert c.affinity == 0 or isinstance(snapshot.deployments[c.deployment_id][0].price, HourlyPrice)
    positions = [c.order_position for c in decision.ranked]
    assert positions == sorted(positions)
    if slo_ttft_ms is not None or slo_e2e_ms is not None:
        for position in set(positions):
            group = [c for c in decision.ranked if c.order_position == position]
            flags = [not c.slo_met for c in group]
            assert flags == sorted(flags)  # meeting the SLO first
            met_costs = [c.cost_pusd for c in group if c.slo_met]
            assert met_costs == sorted(met_costs)  # the cheapest first
        if decision.ranked and not decision.ranked[0].slo_met:
            event("no deployment meets the SLO")
        elif any(not c.slo_met for c in decision.ranked):
            event("some deployment misses the SLO")
    if any(c.affinity for c in decision.ranked):
        event("prefix affinity applied")
