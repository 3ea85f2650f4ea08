"""Edge nodes in routing, without I/O: config validation, expansion into per-node deployments, label headers,
the fail-closed `edge` floor, the name lookups dispatch uses, token and label parsing, and the health prober.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pytest

from backends.base import BackendHealth, BackendInfo, BackendKind, ChatRequest
from backends.edge.tunnel import EdgeBackend
from gateway.config import Config, ConfigError, parse_config
from gateway.edge import tokens
from gateway.edge.link import GoneNode, NodeBackends, NodeTimeouts
from gateway.edge.pool import LiveNode, edge_templates, expand, split_node_backend, with_node_load
from gateway.errors import InvalidRequest, NoEligibleDeployment, NoHealthyDeployment, NoLiveEdgeNode
from gateway.live.health import FAILURES_TO_DOWN, HealthProber
from gateway.live.state import RoutingState, build_specs
from gateway.pipeline import plan as route
from gateway.services.backends import build_deployments
from routing.decision import Price, RejectCode
from routing.privacy import PrivacyTier
from routing.snapshot import DeploymentStats, HourlyPrice

TTL_S = 10.0


def config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "backends": {
            "edge": {"kind": "edge", "labels": {"region": "eu", "site": "default"}, "prior_tokens_per_s": 7},
            "gpu": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
            "box": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "privacy_tier": "edge"},
        },
        "models": {
            "smollm2": {"backend": "edge"},
            "mixed": {
                "deployments": [
                    {"backend": "edge", "upstream_model": "smollm2"},
                    {
                        "backend": "gpu",
                        "upstream_model": "big",
                        "input_usd_per_mtok": 1,
                        "output_usd_per_mtok": 2,
                    },
                ]
            },
            "priced": {
                "backend": "edge",
                "upstream_model": "smollm2",
                "input_usd_per_mtok": "0.1",
                "output_usd_per_mtok": "0.2",
            },
        },
        "teams": {
            "t": {},
            "vault": {"privacy_floor": "edge"},
            "eu": {"required_labels": {"region": ["eu"], "site": ["p1", "p2"]}},
        },
    }
    data.update(extra)
    return parse_config(data)


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": {}, **data})
    return info.value.problems


def node(node_id: str, *, seen_s: float = 100.0, models: Iterable[str] = ("smollm2",), **kw: Any) -> LiveNode:
    fields: dict[str, Any] = dict(
        node_id=node_id,
        models=frozenset(models),
        labels={"site": "p1"},
        usd_per_hour=Decimal("0.5"),
        tokens_per_s=25.0,
        in_flight=0,
        queue_depth=0,
        kv_used_frac=0.0,
        last_seen_s=seen_s,
    )
    fields.update(kw)
    return LiveNode(**fields)


class Nodes:
    def __init__(self, *nodes: LiveNode) -> None:
        self.nodes = list(nodes)

    def live_nodes(self) -> list[LiveNode]:
        return self.nodes


@dataclasses.dataclass
class Stub:
    """Only what building deployments reads of a backend: its info."""

    info: BackendInfo


def stubs(cfg: Config) -> dict[str, Any]:
    return {
        n: Stub(BackendInfo(n, BackendKind.OPENAI)) for n, b in cfg.backends.items() if b.kind == "openai"
    }


def state_of(cfg: Config) -> RoutingState:
    backends = stubs(cfg)
    return RoutingState(cfg, build_specs(cfg, backends, build_deployments(cfg, backends)))


def routing_with(*nodes: LiveNode, **extra: Any) -> RoutingState:
    cfg = config(**extra)
    state = state_of(cfg)
    state.set_edge_source(Nodes(*nodes))
    return state


def plan(state: RoutingState, team: str, model: str, hints: route.Hints = route.NO_HINTS) -> route.Routed:
    call = ChatRequest(model=model, messages=({"role": "user", "content": "hi"},), request_id="r")
    return route.plan(state, team, call, hints, now_s=101.0)


# ---- config ------------------------------------------------------------------------------------------------


def test_edge_config_errors_name_the_setting() -> None:
    edge = {"kind": "edge"}
    got = problems({"backends": {"e": {**edge, "privacy_tier": "internal"}}})
    assert got == ['backends.e.privacy_tier: a kind = "edge" backend is always tier "edge", not "internal" '
                   "(remove the setting)"]  # fmt: skip
    got = problems({"backends": {"e": edge}, "edge": {"enabled": False}})
    assert got == ['backends.e: kind = "edge" needs the edge hub, but edge.enabled = false '
                   "(remove that setting, or this backend)"]  # fmt: skip
    got = problems({"edge": {"ttl_s": 2, "heartbeat_s": 2}})
    assert got[0].startswith("edge.ttl_s (2) must be longer than edge.heartbeat_s (2)")
    assert problems({"edge": {"ttl": 5}}) == [
        "edge.ttl: unknown setting (remove it, or check its spelling against config.example.toml)"
    ]
    got = problems({"backends": {"a/b": {"kind": "openai", "base_url": "http://x/v1"}}})
    assert got[0].startswith('backends.a/b: a backend name may not contain "/"')
    got = problems({"backends": {"e": {**edge, "base_url": "http://x/v1"}}})
    assert got == ["backends.e.edge.base_url: unknown setting "
                   "(remove it, or check its spelling against config.example.toml)"]  # fmt: skip
    assert 'backends.b: set kind = "cloud", "openai" or "edge"' in problems(
        {"backends": {"b": {"kind": "grpc"}}}
    )


def test_edge_is_on_with_an_edge_backend_and_static_edge_servers_are_probed() -> None:
    cfg = config()
    assert cfg.edge_enabled and cfg.backends["edge"].tier is PrivacyTier.EDGE
    assert not parse_config({}).edge_enabled
    assert cfg.backends["box"].probe_interval_s == 10.0  # type: ignore[union-attr]
    assert cfg.backends["gpu"].probe_interval_s is None  # type: ignore[union-attr]
    tuned = parse_config(
        {
            "models": {},
            "backends": {"g": {"kind": "openai", "base_url": "http://x/v1", "health_interval_s": 0}},
        }
    )
    assert tuned.backends["g"].probe_interval_s is None  # type: ignore[union-attr]


# ---- expansion ---------------------------------------------------------------------------------------------


def test_each_live_node_serving_the_model_becomes_a_deployment() -> None:
    templates = edge_templates(config())
    assert {(t.public_model, t.backend, t.upstream_model) for t in templates} == {
        ("smollm2", "edge", "smollm2"),
        ("mixed", "edge", "smollm2"),
        ("priced", "edge", "smollm2"),
    }
    nodes = [node("a"), node("b", models=("other",)), node("c", seen_s=100.0 - TTL_S - 0.1)]
    found = expand(templates, nodes, now_s=100.0, ttl_s=TTL_S)
    assert {spec.deployment_id for _, _, spec in found} == {"smollm2@edge/a", "mixed@edge/a", "priced@edge/a"}
    spec = next(s for t, _, s in found if t.public_model == "smollm2")
    assert (spec.backend, spec.backend_kind, spec.privacy_tier) == (
        "edge/a",
        BackendKind.EDGE,
        PrivacyTier.EDGE,
    )
    assert dict(spec.labels) == {"region": "eu", "site": "p1"}  # the node's labels over the backend's
    assert spec.price == HourlyPrice(Decimal("0.5")) and not spec.supports_tools and not spec.supports_json
    priced = next(s for t, _, s in found if t.public_model == "priced")
    assert priced.price == Price(Decimal("0.1"), Decimal("0.2"))
    backends = config().model_dump(exclude_unset=True)["backends"]
    overridden = edge_templates(config(backends={**backends, "edge": {"kind": "edge", "usd_per_hour": 2}}))
    (_, _, spec2), *_ = expand(overridden, [node("a")], now_s=100.0, ttl_s=TTL_S)
    assert spec2.price == HourlyPrice(Decimal(2))


def test_node_load_and_speed_feed_the_stats() -> None:
    base = DeploymentStats(ttft_ms=300, decode_tokens_per_s=7, in_flight=1)
    stats = with_node_load(base, node("a", in_flight=3, queue_depth=2, kv_used_frac=0.5))
    assert (stats.decode_tokens_per_s, stats.in_flight, stats.queue_depth, stats.kv_cache_used_frac) == (
        25.0,
        3,
        2,
        0.5,
    )
    assert with_node_load(base, node("a", tokens_per_s=0.0)).decode_tokens_per_s == 7


def test_snapshot_has_node_deployments_with_their_load_and_a_queue_slows_them() -> None:
    state = routing_with(node("idle"), node("busy", queue_depth=4, in_flight=2))
    snap = state.snapshot(101.0)
    assert {e.spec.backend for e in snap.by_model["smollm2"]} == {"edge/idle", "edge/busy"}
    assert snap.deployments["smollm2@edge/busy"][1].queue_depth == 4
    decision = plan(state, "t", "smollm2").decision
    assert [c.backend for c in decision.candidates] == ["edge/idle", "edge/busy"]
    assert decision.ranked[0].latency_ms < decision.ranked[1].latency_ms
    assert (
        state.stats.snapshot(101.0)["smollm2@edge/idle"].decode_tokens_per_s == 25.0
    )  # node's rate as prior


def test_stale_nodes_leave_routing_and_are_forgotten_later() -> None:
    source = Nodes(node("a", seen_s=100.0))
    cfg = config()
    state = state_of(cfg)
    state.set_edge_source(source)
    assert "smollm2@edge/a" in state.snapshot(101.0).deployments
    assert "smollm2@edge/a" not in state.snapshot(100.0 + TTL_S + 0.5).deployments
    state.snapshot(100.0 + cfg.server.request_timeout_s + 200.0)  # long gone: its stats are dropped
    assert "smollm2@edge/a" not in state.stats.snapshot(1000.0)


# ---- headers and errors ------------------------------------------------------------------------------------


def test_site_and_label_headers_require_labels() -> None:
    state = routing_with(node("p1"), node("p2", labels={"site": "p2", "line": "3"}))
    routed = plan(state, "t", "smollm2", route.Hints(site="p2"))
    assert [c.backend for c in routed.decision.candidates] == ["edge/p2"]
    assert routed.decision.rejected[0].codes == (RejectCode.LABEL,)
    routed = plan(state, "t", "smollm2", route.Hints(labels="line=3, site=p2"))
    assert [c.backend for c in routed.decision.candidates] == ["edge/p2"]
    assert route.Hints(labels="a=1,b=x:y/z").required_labels() == {"a": "1", "b": "x:y/z"}
    for hints, param in [
        (route.Hints(labels="site"), "x-switchboard-labels"),
        (route.Hints(site="two words"), "x-switchboard-site"),
        (route.Hints(site="p1", labels="site=p2"), "x-switchboard-site"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            plan(state, "t", "smollm2", hints)
        assert info.value.param == param
    with pytest.raises(InvalidRequest) as conflict:  # a request narrows its team's labels, never widens them
        plan(state, "eu", "smollm2", route.Hints(site="p9"))
    assert "config: teams.eu.required_labels" in conflict.value.message


def test_no_live_node_under_the_edge_floor_is_503_naming_the_fix() -> None:
    state = routing_with()
    routed = plan(state, "vault", "mixed")
    assert routed.edge_missing == ("edge",)
    err = route.fail_closed_error(routed, "vault")
    assert isinstance(err, NoLiveEdgeNode) and err.status_code == 503 and err.code == "no_live_edge_node"
    assert "`edge`: no live edge node serves `mixed`" in err.message
    assert "switchboard edge serve" in err.message and "GET /admin/edge/nodes" in err.message
    assert "`gpu`: tier internal < floor edge" in err.message  # never another tier
    # Under a lower floor an absent node is transient too: another deployment may have been refused for it.
    routed = plan(routing_with(), "t", "smollm2")
    assert isinstance(route.fail_closed_error(routed, "t"), NoHealthyDeployment)
    routed = plan(routing_with(node("a")), "t", "smollm2", route.Hints(site="p7"))
    err = route.fail_closed_error(routed, "t")
    assert isinstance(err, NoHealthyDeployment) and "no live edge node labelled site=p7" in err.message
    routed = plan(routing_with(node("a")), "vault", "mixed")
    assert [c.backend for c in routed.decision.candidates] == ["edge/a"]  # with a node: served at the edge


def test_a_static_edge_server_failing_its_probe_is_transient() -> None:
    state = routing_with()
    state.mark_down("box")
    state.refresh()
    cfg_model = {"static": {"backend": "box", "upstream_model": "llama"}}
    cfg = config(models={**config().model_dump()["models"], **cfg_model})
    state = state_of(cfg)
    state.mark_down("box")
    routed = plan(state, "vault", "static")
    err = route.fail_closed_error(routed, "vault")
    assert isinstance(err, NoHealthyDeployment) and "backends.box.health_interval_s" in err.message
    state.mark_up("box")
    state.refresh()
    assert route.fail_closed_error(plan(state, "vault", "static"), "vault") is None
    assert isinstance(route.fail_closed_error(plan(state, "vault", "mixed"), "vault"), NoLiveEdgeNode)
    assert not isinstance(
        route.fail_closed_error(plan(state, "vault", "static"), "vault"), NoEligibleDeployment
    )


# ---- dispatch lookups --------------------------------------------------------------------------------------


class FakeLink:
    node_id = "a"
    connected = True

    def exchange(self, request: Any) -> Any:
        raise AssertionError("not used")

    def cancel(self, request_id: str) -> None:
        return None

    backends: dict[str, EdgeBackend] = {}


def test_node_backends_and_timeouts_resolve_node_names() -> None:
    link = FakeLink()
    link.backends = {}
    names = NodeBackends({}, frozenset({"edge"}), lambda node_id: link if node_id == "a" else None)  # type: ignore[arg-type,return-value]
    found = names["edge/a"]
    assert isinstance(found, EdgeBackend) and found.info.name == "edge/a" and names["edge/a"] is found
    assert isinstance(names["edge/gone"], GoneNode)
    with pytest.raises(KeyError):
        names["other/a"]
    timeouts = NodeTimeouts({"edge": 7.0, "gpu": 3.0})
    assert (timeouts["edge/a"], timeouts.get("gpu"), timeouts.get("nope/a", 1.0)) == (7.0, 3.0, 1.0)
    assert split_node_backend("edge/a/b") == ("edge", "a/b") and split_node_backend("gpu") is None


async def test_a_gone_node_fails_retryably() -> None:
    gone = GoneNode("edge/x")
    from backends.base import ChatRequest

    request = ChatRequest(model="m", messages=({"role": "user", "content": "x"},), request_id="r")
    with pytest.raises(Exception) as info:
        await gone.complete(request)
    assert getattr(info.value, "retryable", False)
    with pytest.raises(Exception) as streamed:
        async for _ in gone.stream(request):
            pass
    assert getattr(streamed.value, "retryable", False)


# ---- tokens, labels, health --------------------------------------------------------------------------------


def test_token_shapes_durations_labels_and_problems() -> None:
    assert tokens.looks_like_token("sbe_" + "A" * 43) and not tokens.looks_like_token("sk-sb-" + "A" * 43)
    assert not tokens.looks_like_token("sbe_short")
    assert [tokens.parse_duration_s(t) for t in ("90s", "30m", "12h", "7d", "2w", "1.5h")] == [
        90,
        1800,
        43200,
        604800,
        1209600,
        5400,
    ]
    for bad in ("7", "0d", "-1d", "7y", "soon", "99999999999d"):  # the last was a 500 (overflow)
        with pytest.raises(InvalidRequest, match="expires_in"):
            tokens.parse_duration_s(bad)
    assert tokens.parse_labels(["site=plant-7", " line = 2 "]) == {"site": "plant-7", "line": "2"}
    for bad in (["site"], ["=x"], ["site=two words"]):
        with pytest.raises(InvalidRequest, match="label"):
            tokens.parse_labels(bad)
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    info = tokens.TokenInfo("et_1", "n", {}, now, now + dt.timedelta(days=1), None)
    assert info.problem(now) is None
    expired = info.problem(now + dt.timedelta(days=2))
    assert expired is not None and "expired at 2030-01-02T00:00:00+00:00" in expired
    revoked = dataclasses.replace(info, revoked_at=now).problem(now)
    assert revoked is not None and "was revoked" in revoked and "switchboard edge token create" in revoked
    assert len(revoked.encode()) <= 123 and len(expired.encode()) <= 123  # they travel as close reasons


def test_health_prober_takes_a_failing_server_out_after_two_probes_and_back_after_one() -> None:
    state = routing_with()
    prober = HealthProber({}, {"box": 1.0}, state)
    bad, good = BackendHealth(ok=False, detail="refused"), BackendHealth(ok=True)
    prober.observe("box", bad)
    assert not state.is_down("box")  # one miss is not enough
    for _ in range(FAILURES_TO_DOWN - 1):
        prober.observe("box", bad)
    assert state.is_down("box")
    prober.observe("box", good)
    assert not state.is_down("box")
