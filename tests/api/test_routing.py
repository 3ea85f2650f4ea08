"""Routing through a live gateway, driven by the official `openai` SDK: objectives, live latency, the privacy
floor, circuit breakers, fallbacks, per-request preferences and stream fallback.

Two fake providers stand in for an on-site GPU pool (`site`, internal tier) and the cloud (`cloud`, external
and external_zdr tiers). Every public model has its own upstream names, so knobs, live stats and breakers of
one test never reach another. Privacy is checked where it matters: in what the cloud fake received.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from openai import OpenAI

from gateway.config import Config, parse_config
from gateway.http.app import create_app
from gateway.live.state import _REFRESH_S
from gateway.live.stats import observations_to_converge
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, Gateway
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer, free_port

BREAKER_FAILURES = 2
BREAKER_OPEN_S = 2.0  # long enough that load on a shared machine cannot outlast it between trip and check
STATS_ALPHA = 0.3
FRESH_S = _REFRESH_S + 0.02  # long enough that the next decision sees a rebuilt snapshot
EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"

# backend -> (fake, privacy tier, prior TTFT ms, extra settings)
BACKENDS: dict[str, tuple[str, str, float, dict[str, Any]]] = {
    "gpu_a": ("site", "internal", 20, {}),
    "gpu_b": ("site", "internal", 60, {}),
    "pair_a": ("site", "internal", 20, {"timeout_s": 0.4}),  # short: a hung upstream costs 0.4 s
    "pair_b": ("site", "internal", 60, {}),
    "gpu_dead": ("dead", "internal", 10, {"connect_timeout_s": 0.5}),
    "zdr": ("cloud", "external_zdr", 120, {}),
    "cloud": ("cloud", "external", 250, {}),
}
# public model -> deployments as (backend, upstream model, USD/Mtok in, USD/Mtok out)
MODELS: dict[str, list[tuple[str, str, str, str]]] = {
    "obj": [
        ("gpu_a", "obj-gpu", "3", "12"),
        ("zdr", "obj-zdr", "0.5", "1.5"),
        ("cloud", "obj-cloud", "0.1", "0.4"),
    ],
    "mover": [("gpu_a", "mv-a", "1", "2"), ("gpu_b", "mv-b", "1", "2")],
    "still": [("gpu_a", "st-a", "1", "2"), ("gpu_b", "st-b", "1", "2")],
    "pair500": [("pair_a", "p5-a", "1", "2"), ("pair_b", "p5-b", "1", "2")],
    "pairhang": [("pair_a", "ph-a", "1", "2"), ("pair_b", "ph-b", "1", "2")],
    "priv": [("gpu_a", "pv-gpu", "2", "8"), ("cloud", "pv-cloud", "0.1", "0.4")],
    "privfail": [("gpu_a", "pf-gpu", "2", "8"), ("cloud", "pf-cloud", "0.1", "0.4")],
    "privdead": [("gpu_dead", "pd-gpu", "2", "8"), ("cloud", "pd-cloud", "0.1", "0.4")],
    "fallback": [
        ("cloud", "fb-cloud", "0.1", "0.4"),
        ("gpu_a", "fb-first", "1", "2"),
        ("gpu_b", "fb-second", "2", "4"),
    ],
    "streamfb": [("gpu_a", "sf-first", "1", "2"), ("gpu_b", "sf-second", "2", "4")],
    "streamcut": [("gpu_a", "sc-first", "1", "2"), ("gpu_b", "sc-second", "2", "4")],
    "streamopen": [("gpu_a", "so-first", "1", "2"), ("gpu_b", "so-second", "2", "4")],
}
TEAMS: dict[str, dict[str, Any]] = {
    "thrifty": {"objective": "cost"},  # floor external, on_sensitive raise_floor
    "speedy": {"objective": "latency"},
    "steady": {"objective": "balanced"},
    "locked": {"objective": "cost", "privacy_floor": "internal"},  # cost would pick the cloud if it could
    "blocker": {"objective": "cost", "on_sensitive": "block"},
}
# Real upstream behaviour, matching the priors above so routing starts out right.
TTFT_MS = {"obj-gpu": 10, "obj-zdr": 80, "obj-cloud": 150, "p5-a": 10, "p5-b": 30, "ph-a": 10, "ph-b": 30}


def routing_config(urls: dict[str, str], tmp: str) -> Config:
    backends = {
        name: {
            "kind": "openai",
            "base_url": urls[fake],
            "privacy_tier": tier,
            "prior_ttft_ms": ttft_ms,
            "prior_tokens_per_s": 2000,  # requests ask for 8 tokens: TTFT decides latency
            "prior_latency_ms": ttft_ms + 10,
            "timeout_s": 5,
            **extra,
        }
        for name, (fake, tier, ttft_ms, extra) in BACKENDS.items()
    }
    models = {
        public: {
            "deployments": [
                {"backend": b, "upstream_model": up, "input_usd_per_mtok": pin, "output_usd_per_mtok": pout}
                for b, up, pin, pout in deps
            ]
        }
        for public, deps in MODELS.items()
    }
    return parse_config(
        {
            "server": {"admin_key_env": "SB_TEST_ADMIN_KEY"},
            "database": {
                "url": f"sqlite:///{tmp}/sb.db",
                "spill_path": f"{tmp}/spill.jsonl",
                "flush_interval_s": 0.02,
            },
            "backends": backends,
            "models": models,
            "teams": TEAMS,
            "routing": {
                "breaker_failures": BREAKER_FAILURES,
                "breaker_open_s": BREAKER_OPEN_S,
                "stats_alpha": STATS_ALPHA,
            },
        }
    )


@dataclass(frozen=True, slots=True)
class Reply:
    backend: str | None
    request_id: str
    route: str
    text: str


@dataclass
class Env:
    gw: Gateway
    site: FakeProvider
    cloud: FakeProvider
    keys: dict[str, str]
    clients: dict[str, OpenAI] = field(default_factory=dict)

    def client(self, team: str) -> OpenAI:
        if team not in self.clients:
            self.clients[team] = OpenAI(
                base_url=self.gw.v1, api_key=self.keys[team], max_retries=0, timeout=20
            )
        return self.clients[team]

    def row(self, reply: Reply) -> dict[str, Any]:
        return self.gw.usage_row(reply.request_id)

    def cloud_bodies(self) -> list[dict[str, Any]]:
        """Every request body the cloud fake received, for any model."""
        ups = {up for deps in MODELS.values() for b, up, _, _ in deps if BACKENDS[b][0] == "cloud"}
        return [body for up in sorted(ups) for body in self.cloud.requests(up)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    tmp = tmp_path_factory.mktemp("gw-routing")
    with FakeProvider() as site, FakeProvider() as cloud:
        urls = {
            "site": site.openai_base_url,
            "cloud": cloud.openai_base_url,
            "dead": f"http://127.0.0.1:{free_port()}/v1",  # nothing listens there
        }
        for upstream, ttft_ms in TTFT_MS.items():
            (cloud if upstream.startswith("obj-") and upstream != "obj-gpu" else site).configure(
                upstream, ttft_ms=ttft_ms
            )
        config = routing_config(urls, str(tmp))
        with LiveServer(create_app(config)) as server:
            engine = make_engine(config.database.url, config.database.schema_name)
            gw = Gateway(server.base_url, config, engine, site)
            env = Env(gw, site, cloud, {team: gw.key(team) for team in TEAMS})
            try:
                yield env
            finally:
                for sdk in env.clients.values():
                    sdk.close()
                engine.dispose()


def ask(
    env: Env,
    team: str,
    model: str,
    content: str = "Say hello",
    *,
    stream: bool = False,
    prefs: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    raw = env.client(team).chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        stream=stream,
        extra_body=None if prefs is None else {"switchboard": prefs},
        extra_headers=headers,
    )
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content or ""
    headers_in = raw.headers
    return Reply(
        headers_in.get("x-switchboard-backend"),
        headers_in["x-request-id"],
        headers_in.get("x-switchboard-route", ""),
        text,
    )


def refusal(call: Callable[[], object]) -> tuple[int, dict[str, Any], str]:
    """(status, error object, request id) of a call the gateway refuses."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    response = info.value.response
    return response.status_code, response.json()["error"], response.headers["x-request-id"]


def candidates(row: dict[str, Any]) -> list[str]:
    return [c["backend"] for c in json.loads(row["route_candidates"])]


# ---- 1. objectives --------------------------------------------------------------------------------------


def test_cost_objective_picks_the_cheapest_and_latency_the_fastest(env: Env) -> None:
    cheap = ask(env, "thrifty", "obj")
    assert cheap.backend == "cloud" and cheap.route.startswith("cheapest eligible: obj@cloud")
    row = env.row(cheap)
    assert row["backend"] == "cloud" and row["route_reason"].startswith("cheapest eligible: obj@cloud")
    assert candidates(row) == ["cloud", "zdr", "gpu_a"]  # ranked by predicted cost
    ranked = json.loads(row["route_candidates"])
    costs = [float(c["cost_usd"]) for c in ranked]
    assert costs == sorted(costs) and costs[0] < costs[-1]

    fast = ask(env, "speedy", "obj")  # from the priors: no traffic measured yet
    assert fast.backend == "gpu_a" and fast.route.startswith("fastest eligible: obj@gpu_a")
    row = env.row(fast)
    assert row["backend"] == "gpu_a" and candidates(row) == ["gpu_a", "zdr", "cloud"]
    latencies = [c["latency_ms"] for c in json.loads(row["route_candidates"])]
    assert latencies == sorted(latencies)

    for _ in range(3):  # measured TTFTs (streams) agree with the priors: the choice holds
        assert ask(env, "speedy", "obj", stream=True).backend == "gpu_a"
        time.sleep(FRESH_S)
    assert ask(env, "speedy", "obj").backend == "gpu_a"
    assert ask(env, "thrifty", "obj").backend == "cloud"


# ---- 2. live latency moves traffic ----------------------------------------------------------------------


def _served_until(env: Env, model: str, backend: str, limit: int) -> list[str | None]:
    """Streams one by one, each seeing a fresh snapshot, until `backend` serves one (at most `limit`)."""
    served: list[str | None] = []
    while len(served) < limit and (not served or served[-1] != backend):
        time.sleep(FRESH_S)
        served.append(ask(env, "speedy", model, stream=True).backend)
    return served


def test_slowing_a_backend_moves_traffic_within_bounded_requests(env: Env) -> None:
    warm = observations_to_converge(STATS_ALPHA)  # observations for an estimate to get 90% of the way
    bound = warm + 1  # + 1: a decision may see a snapshot one refresh old
    env.site.configure("mv-a", ttft_ms=10)
    env.site.configure("mv-b", ttft_ms=120)
    for _ in range(warm):  # measure gpu_b (the request's `order` pins it)
        assert ask(env, "speedy", "mover", stream=True, prefs={"order": ["gpu_b"]}).backend == "gpu_b"
    assert _served_until(env, "mover", "gpu_a", 1) == ["gpu_a"]

    env.site.configure("mv-a", ttft_ms=400)
    served = _served_until(env, "mover", "gpu_b", bound)
    assert served[0] == "gpu_a" and served[-1] == "gpu_b", served  # moved, and only on evidence
    for _ in range(3):
        time.sleep(FRESH_S)
        assert ask(env, "speedy", "mover", stream=True).backend == "gpu_b"

    env.site.configure("mv-a", ttft_ms=10)  # and back, once gpu_b slows down more than gpu_a did
    env.site.configure("mv-b", ttft_ms=700)
    served = _served_until(env, "mover", "gpu_a", bound)
    assert served[-1] == "gpu_a", served
    reply = ask(env, "speedy", "mover", stream=True)
    assert reply.backend == "gpu_a"
    assert candidates(env.row(reply)) == ["gpu_a", "gpu_b"]


def test_slow_non_streamed_traffic_moves_too(env: Env) -> None:
    env.site.configure("st-a", ttft_ms=250)  # its prior says 20 ms; gpu_b's says 60 ms
    env.site.configure("st-b", ttft_ms=10)
    served: list[str | None] = []
    for _ in range(observations_to_converge(STATS_ALPHA) + 1):
        time.sleep(FRESH_S)
        served.append(ask(env, "speedy", "still").backend)
    assert "gpu_b" in served, served


# ---- 3. privacy floor ------------------------------------------------------------------------------------


def test_sensitive_content_and_header_raise_the_floor(env: Env) -> None:
    marker = uuid.uuid4().hex
    assert ask(env, "thrifty", "priv", f"plain {marker}").backend == "cloud"  # the cloud is up and cheapest

    secret = uuid.uuid4().hex
    cases = [
        (f"write to {EMAIL} {secret}", {}, "internal:email"),
        (f"charge card {CARD} {secret}", {}, "internal:credit_card"),
        (f"nothing sensitive {secret}", {"x-switchboard-privacy": "internal"}, "internal"),
    ]
    for content, headers, privacy_class in cases:
        reply = ask(env, "thrifty", "priv", content, headers=headers)
        row = env.row(reply)
        assert reply.backend == "gpu_a" and row["backend"] == "gpu_a"
        assert row["privacy_class"] == privacy_class
        assert candidates(row) == ["gpu_a"]  # the cloud was never a candidate
        assert "1 eligible, 1 rejected" in row["route_reason"]
    assert not any(secret in json.dumps(body) for body in env.cloud_bodies())
    assert any(marker in json.dumps(body) for body in env.cloud_bodies())


def test_a_request_cannot_lower_the_team_floor(env: Env) -> None:
    secret = uuid.uuid4().hex
    reply = ask(env, "locked", "priv", secret, headers={"x-switchboard-privacy": "external"})
    row = env.row(reply)
    assert reply.backend == "gpu_a" and row["privacy_class"] == "internal"

    lower = {"x-switchboard-privacy": "external"}
    status, error, request_id = refusal(
        lambda: ask(env, "locked", "priv", secret, prefs={"only": ["cloud"]}, headers=lower)
    )
    assert status == 400 and error["code"] == "no_eligible_deployment"
    assert "privacy floor `internal`" in error["message"]
    assert "a request cannot lower the team floor" in error["message"]
    assert env.gw.usage_row(request_id)["error_type"] == "no_eligible_deployment"

    status, error, _ = refusal(
        lambda: ask(env, "locked", "priv", headers={"x-switchboard-privacy": "secret"})
    )
    assert status == 400 and error["param"] == "x-switchboard-privacy"
    assert not any(secret in json.dumps(body) for body in env.cloud_bodies())


def test_floor_holds_when_the_internal_deployment_fails(env: Env) -> None:
    assert ask(env, "thrifty", "privfail").backend == "cloud"
    cloud_before = len(env.cloud.requests("pf-cloud"))
    env.site.configure("pf-gpu", fail_status=500)
    codes = []
    for team, content, headers in [
        ("locked", "hello", {}),
        ("thrifty", f"mail {EMAIL}", {}),
        ("thrifty", "hello", {"x-switchboard-privacy": "internal"}),
        ("locked", "hello", {}),
    ]:
        status, error, request_id = refusal(
            lambda t=team, c=content, h=headers: ask(env, t, "privfail", c, headers=h)
        )
        assert status == 503, error
        codes.append(error["code"])
        if error["code"] == "no_healthy_deployment":
            assert "privacy floor `internal`" in error["message"] and "circuit open" in error["message"]
            assert "`cloud`: tier external < floor internal" in error["message"]  # named, with why
        else:
            assert error["code"] == "upstream_unavailable" and "`gpu_a`" in error["message"]
        row = env.gw.usage_row(request_id)
        assert row["status"] == "error" and row["error_type"] == error["code"]
        assert row["privacy_class"].startswith("internal")
        assert row["backend"] in ("gpu_a", None)  # None: routing refused before any attempt (fail closed)
    # upstream failures first; once the circuit is open, routing itself refuses, naming the floor
    assert codes[0] == "upstream_unavailable" and "no_healthy_deployment" in codes
    assert len(env.cloud.requests("pf-cloud")) == cloud_before
    env.site.configure("pf-gpu", fail_status=None)


def test_floor_holds_when_the_internal_backend_is_down(env: Env) -> None:
    for _ in range(3):
        status, error, _ = refusal(lambda: ask(env, "locked", "privdead"))
        assert status == 503 and error["code"] in ("upstream_unavailable", "no_healthy_deployment")
        assert "gpu_dead" in error["message"]
        # Security finding: error bodies carried `cannot connect to 127.0.0.1:PORT`; the log keeps that.
        assert "127.0.0.1" not in error["message"] and "onnect" not in error["message"]
    assert env.cloud.requests("pd-cloud") == []
    assert ask(env, "thrifty", "privdead").backend == "cloud"  # without the floor the cloud serves it


def test_blocking_team_refuses_sensitive_data_naming_kinds_only(env: Env) -> None:
    seen = len(env.site.requests("pv-gpu")) + len(env.cloud.requests("pv-cloud"))
    status, error, request_id = refusal(
        lambda: ask(env, "blocker", "priv", f"reach me at {EMAIL}, card {CARD}")
    )
    assert status == 403 and error["code"] == "sensitive_data_blocked"
    assert "email" in error["message"] and "credit_card" in error["message"]
    assert "teams.blocker.on_sensitive" in error["message"]
    for fragment in ("jane.doe", "example.com", "4111"):
        assert fragment not in error["message"]
    row = env.gw.usage_row(request_id)
    assert row["error_type"] == "sensitive_data_blocked" and row["backend"] is None
    assert len(env.site.requests("pv-gpu")) + len(env.cloud.requests("pv-cloud")) == seen
    assert ask(env, "blocker", "priv", "nothing to see").backend == "cloud"


# ---- 4. a backend dies mid-load -------------------------------------------------------------------------

TOTAL, CONCURRENCY, KILL_AT = 60, 6, 30


@pytest.mark.parametrize("mode", ["fail_500", "hang"])
def test_killing_a_backend_mid_load(env: Env, mode: str) -> None:
    model = {"fail_500": "pair500", "hang": "pairhang"}[mode]
    up_a = MODELS[model][0][1]
    kill = {"fail_status": 500} if mode == "fail_500" else {"hang": True}
    killed = threading.Event()

    def one(i: int) -> tuple[Reply | None, Exception | None]:
        if i == KILL_AT:
            env.site.configure(up_a, **kill)
            killed.set()
        elif i > KILL_AT:
            killed.wait(10)
        try:
            return ask(env, "steady", model), None
        except openai.APIError as exc:
            return None, exc

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, range(TOTAL)))
    assert [exc for _, exc in results if exc is not None] == []
    replies = [reply for reply, _ in results if reply is not None]
    rows = [env.row(reply) for reply in replies]
    assert all(row["status"] == "ok" for row in rows)
    assert {r.backend for r in replies[: KILL_AT - CONCURRENCY]} == {"pair_a"}
    assert {r.backend for r in replies[KILL_AT:]} == {"pair_b"}
    assert [r["backend"] for r in rows] == [r.backend for r in replies]
    fell_back = [row for row in rows if row["attempts"] > 1]
    assert fell_back and all(row["backend"] == "pair_b" for row in fell_back)
    assert len(fell_back) <= BREAKER_FAILURES + 2 * CONCURRENCY
    circuit_open = [row for row in rows[KILL_AT:] if candidates(row) == ["pair_b"]]
    assert circuit_open, "the open circuit should take pair_a out of the ranking"
    assert all(row["attempts"] == 1 for row in circuit_open[-3:])
    assert len(env.site.requests(up_a)) <= KILL_AT + BREAKER_FAILURES + 2 * CONCURRENCY

    env.site.configure(up_a, fail_status=None, hang=False)
    recovered_at = time.monotonic()
    served: list[str | None] = []
    deadline = recovered_at + BREAKER_OPEN_S * 8
    while time.monotonic() < deadline and (not served or served[-1] != "pair_a"):
        served.append(ask(env, "steady", model).backend)
        time.sleep(0.05)
    assert served[0] == "pair_b", served  # recovered, but the circuit stays open for breaker_open_s
    assert served[-1] == "pair_a", served  # then a probe succeeded and the circuit closed
    assert set(served[:-1]) == {"pair_b"}
    time.sleep(FRESH_S)
    reply = ask(env, "steady", model)
    row = env.row(reply)
    assert reply.backend == "pair_a" and row["attempts"] == 1 and candidates(row) == ["pair_a", "pair_b"]


# ---- 5. the ledger of a fallback ------------------------------------------------------------------------


def test_fallback_is_recorded_in_the_ledger(env: Env) -> None:
    env.site.configure("fb-first", fail_status=500, fail_times=1)
    reply = ask(env, "thrifty", "fallback", f"the invoice for {EMAIL}")
    row = env.row(reply)
    assert reply.backend == "gpu_b" and reply.text
    assert row["attempts"] == 2 and row["backend"] == "gpu_b" and row["status"] == "ok"
    assert row["served_model"] == "fb-second"
    assert row["privacy_class"] == "internal:email"
    assert row["route_reason"].startswith("cheapest eligible: fallback@gpu_a")  # the plan; gpu_b served
    assert reply.route == row["route_reason"][:200]
    assert candidates(row) == ["gpu_a", "gpu_b"]
    assert len(env.site.requests("fb-first")) == 1 and len(env.site.requests("fb-second")) == 1
    assert env.cloud.requests("fb-cloud") == []  # the cheapest, but below the raised floor


# ---- 6. preferences -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefs", "backend"),
    [
        (None, "gpu_a"),
        ({"order": ["cloud"]}, "cloud"),
        ({"order": ["obj@zdr", "cloud"]}, "zdr"),
        ({"only": ["zdr", "cloud"]}, "zdr"),
        ({"ignore": ["gpu_a"]}, "zdr"),
        ({"ignore": ["obj@gpu_a", "zdr"]}, "cloud"),
        ({"sort": "price"}, "cloud"),
    ],
)
def test_preferences_change_the_choice(env: Env, prefs: dict[str, Any] | None, backend: str) -> None:
    reply = ask(env, "speedy", "obj", prefs=prefs)
    assert reply.backend == backend
    row = env.row(reply)
    assert row["backend"] == backend
    if prefs and "order" in prefs:
        assert row["route_reason"].startswith(f"first in requested order: obj@{backend}")
    if prefs and ("only" in prefs or "ignore" in prefs):
        assert "gpu_a" not in candidates(row)
    upstream = {"gpu_a": "obj-gpu", "zdr": "obj-zdr", "cloud": "obj-cloud"}[backend]
    fake = env.site if backend == "gpu_a" else env.cloud
    assert "switchboard" not in fake.requests(upstream)[-1]  # preferences stay at the gateway


@pytest.mark.parametrize(
    ("prefs", "param", "words"),
    [
        ({"order": "cloud"}, "switchboard.order", "expected a list"),
        ({"only": [1]}, "switchboard.only", "expected a list"),
        ({"ignore": [""]}, "switchboard.ignore", "expected a list"),
        ({"sort": "cheapest"}, "switchboard.sort", "price"),
        ({"max_latency_ms": 0}, "switchboard.max_latency_ms", "> 0"),
        ({"max_ttft_ms": "soon"}, "switchboard.max_ttft_ms", "> 0"),
        ({"max_price": {"tokens": 1}}, "switchboard.max_price", "unknown field `tokens`"),
        ({"colour": "red"}, "switchboard", "unknown field `colour`"),
    ],
)
def test_invalid_preferences_are_400_naming_the_field(
    env: Env, prefs: dict[str, Any], param: str, words: str
) -> None:
    status, error, _ = refusal(lambda: ask(env, "speedy", "obj", prefs=prefs))
    assert status == 400 and error["code"] == "invalid_request"
    assert error["param"] == param and error["message"].startswith(param) and words in error["message"]


def test_preferences_excluding_everything_fail_closed(env: Env) -> None:
    status, error, _ = refusal(lambda: ask(env, "speedy", "obj", prefs={"ignore": ["gpu_a", "zdr", "cloud"]}))
    assert status == 400 and error["code"] == "no_eligible_deployment"
    assert "`gpu_a`: in `ignore`" in error["message"]
    # A name no deployment carries is a typo, refused by name rather than silently matching nothing.
    status, error, _ = refusal(lambda: ask(env, "speedy", "obj", prefs={"only": ["nowhere"]}))
    assert status == 400 and error["param"] == "switchboard.only" and "nowhere" in error["message"]


# ---- 7. streams -----------------------------------------------------------------------------------------


def test_stream_falls_back_before_the_first_byte(env: Env) -> None:
    env.site.configure("sf-first", fail_status=500, fail_times=1)
    reply = ask(env, "thrifty", "streamfb", stream=True)
    assert reply.backend == "gpu_b"
    assert reply.text == " ".join(f"tok{i}" for i in range(8))
    row = env.row(reply)
    assert row["stream"] and row["status"] == "ok" and row["attempts"] == 2 and row["backend"] == "gpu_b"
    assert len(env.site.requests("sf-first")) == 1 and len(env.site.requests("sf-second")) == 1


def test_stream_falls_back_when_the_server_dies_after_its_role_chunk(env: Env) -> None:
    """Found by bench/chaos: an engine killed (or queued past its timeout) after sending only the role-only
    opening chunk had committed the stream, so the client got an error instead of the fallback's answer."""
    env.site.configure("so-first", cut_after_chunks=1)  # the role chunk, then the connection drops
    reply = ask(env, "thrifty", "streamopen", stream=True)
    assert reply.backend == "gpu_b"
    assert reply.text == " ".join(f"tok{i}" for i in range(8))
    row = env.row(reply)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["backend"] == "gpu_b"
    assert len(env.site.requests("so-first")) == 1 and len(env.site.requests("so-second")) == 1


def test_stream_is_not_retried_after_its_first_chunk(env: Env) -> None:
    env.site.configure("sc-first", cut_after_chunks=3)
    raw = env.client("thrifty").chat.completions.with_raw_response.create(
        model="streamcut", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    assert raw.headers["x-switchboard-backend"] == "gpu_a"
    with pytest.raises(openai.APIError):
        list(raw.parse())
    row = env.gw.usage_row(raw.headers["x-request-id"])
    assert row["status"] == "error" and row["attempts"] == 1 and row["backend"] == "gpu_a"
    assert env.site.requests("sc-second") == []


def test_evasions_found_in_every_field_keep_data_inside(env: Env) -> None:
    """Security finding: each of these reached the cloud for a team whose floor rises on sensitive data."""
    secret = uuid.uuid4().hex
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    cases: list[tuple[str, dict[str, Any]]] = [
        (
            "email split across two text parts",
            {"messages": [{"role": "user", "content": [
                {"type": "text", "text": f"{secret} mail jane.doe@exa"},
                {"type": "text", "text": "mple.com"}]}]},
        ),
        (
            "card split across two messages",
            {"messages": [{"role": "user", "content": f"{secret} card 4111 1111"},
                          {"role": "user", "content": "1111 1111"}]},
        ),
        (
            "full-width at sign and zero-width space",
            {"messages": [{"role": "user", "content": f"{secret} jane.doe\uff20exam\u200bple.com"}]},
        ),
        ("the message name field", {"messages": [{"role": "user", "content": secret, "name": EMAIL}]}),
        ("a tool description", {"tools": [{**tool, "function": {**tool["function"], "description": EMAIL}}]}),
        ("a stop string", {"stop": [EMAIL]}),
        (
            "base64 of an email",
            {"messages": [{"role": "user", "content": f"{secret} amFuZS5kb2VAZXhhbXBsZS5jb20="}]},
        ),
        ("percent-encoded", {"messages": [{"role": "user", "content": f"{secret} jane.doe%40example.com"}]}),
    ]  # fmt: skip
    for name, extra in cases:
        body = {"model": "priv", "messages": [{"role": "user", "content": secret}], "max_tokens": 8, **extra}
        raw = env.client("thrifty").chat.completions.with_raw_response.create(**body)
        row = env.row(Reply(raw.headers.get("x-switchboard-backend"), raw.headers["x-request-id"], "", ""))
        assert row["backend"] == "gpu_a" and row["privacy_class"].startswith("internal:"), (name, row)
    assert not any(secret in json.dumps(body) for body in env.cloud_bodies())
