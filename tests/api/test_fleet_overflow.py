"""Fleet economics through a live gateway, driven by the official `openai` SDK: owned capacity serves at
marginal cost 0 while it meets the SLO, overflows to the cloud when its queue would break it, never for a
request that may not leave (it queues, or gets a 503 past its deadline); prefix affinity keeps a
conversation on one replica; headers, the ledger and `/admin/route/explain` carry the predictions.

Two fake providers stand in for an owned GPU box (`site`) and the cloud (`cloud`). The box's capacity curve
says it runs 2 requests at once and that a queued request waits 2 s for its first token, so two slow
requests in flight are enough to make the third overflow.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.config import Config, parse_config
from gateway.http.app import create_app
from gateway.live.state import _REFRESH_S
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, Gateway
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer

FRESH_S = _REFRESH_S + 0.05
USD_PER_HOUR = "36"  # 10 micro-USD per millisecond of the box
SLOW_TTFT_MS = 1500  # what the box's upstream takes while the test holds it busy
SYSTEM = "You are the migration agent. Follow the runbook step by step. " * 30  # ~1.9 KB opening
TEAMS: dict[str, dict[str, Any]] = {
    "slo": {"objective": "latency", "slo_p95_ttft_ms": 600},
    "private": {"privacy_floor": "internal", "slo_p95_ttft_ms": 600},
    "deadline": {"privacy_floor": "internal", "slo_p95_ttft_ms": 600, "max_latency_ms": 1500},
    "first": {"privacy_floor": "internal", "slo_p95_ttft_ms": 600, "max_ttft_ms": 1200},
    "batchy": {"privacy_floor": "internal", "slo_p95_e2e_ms": 60_000},
    "plain": {"privacy_floor": "internal"},
}


def fleet_config(site: str, cloud: str, tmp: str) -> Config:
    box = {"tokens_per_s": [[1, 50], [2, 80]], "ttft_ms": [[0, 100], [1, 2000]], "max_concurrency": 2}
    owned = {"kind": "openai", "base_url": site, "privacy_tier": "internal", "usd_per_hour": USD_PER_HOUR,
             "capacity": box, "prior_ttft_ms": 100, "prior_tokens_per_s": 50}  # fmt: skip
    prefilling = {
        **owned,
        "capacity": {**box, "ttft_ms": [], "max_concurrency": 4, "prefill_tokens_per_s": 200},
    }
    return parse_config(
        {
            "server": {"admin_key_env": "SB_TEST_ADMIN_KEY"},
            "database": {
                "url": f"sqlite:///{tmp}/sb.db",
                "spill_path": f"{tmp}/spill.jsonl",
                "flush_interval_s": 0.02,
            },  # fmt: skip
            "backends": {
                "gpu": {**owned, "send_priority": True},  # as a vLLM with priority scheduling
                "gpu_r1": owned,
                "gpu_r2": owned,
                "gpu_r3": owned,
                **{f"gpu_p{i}": prefilling for i in (1, 2, 3)},
                "cloud": {
                    "kind": "openai",
                    "base_url": cloud,
                    "privacy_tier": "external",
                    "prior_ttft_ms": 200,
                    "prior_tokens_per_s": 100,
                },  # fmt: skip
            },
            "models": {
                "fleet": {
                    "deployments": [
                        {"backend": "gpu", "upstream_model": "fl-gpu"},
                        {
                            "backend": "cloud",
                            "upstream_model": "fl-cloud",
                            "input_usd_per_mtok": "0.15",
                            "output_usd_per_mtok": "0.60",
                        },
                    ]
                },
                # The same deployments under a model's own deadlines (tighter than an idle box's 100 ms)
                "fleet_first": {
                    "deployments": [{"backend": "gpu", "upstream_model": "fl-gpu"}],
                    "max_ttft_ms": 50,
                },
                "fleet_quick": {
                    "deployments": [{"backend": "gpu", "upstream_model": "fl-gpu"}],
                    "max_latency_ms": 50,
                },
                "agents": {
                    "deployments": [{"backend": f"gpu_r{i}", "upstream_model": f"ag-r{i}"} for i in (1, 2, 3)]
                },
                # The same replicas under a second public name (an alias, as `auto` beside a model's own)
                "agents_alias": {
                    "deployments": [{"backend": f"gpu_r{i}", "upstream_model": f"ag-r{i}"} for i in (1, 2, 3)]
                },
                "agents_pf": {
                    "deployments": [{"backend": f"gpu_p{i}", "upstream_model": f"ag-p{i}"} for i in (1, 2, 3)]
                },
                "agents_pf_alias": {
                    "deployments": [{"backend": f"gpu_p{i}", "upstream_model": f"ag-p{i}"} for i in (1, 2, 3)]
                },
            },  # fmt: skip
            "teams": TEAMS,
            "routing": {"prefix_min_chars": 1024},
        }
    )


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


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    tmp = tmp_path_factory.mktemp("gw-fleet")
    with FakeProvider() as site, FakeProvider() as cloud:
        config = fleet_config(site.openai_base_url, cloud.openai_base_url, str(tmp))
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
    model: str = "fleet",
    messages: list[dict[str, str]] | None = None,
    text: str = "Say hello",
) -> Any:
    return env.client(team).chat.completions.with_raw_response.create(
        model=model, messages=messages or [{"role": "user", "content": text}], max_tokens=8
    )


@pytest.fixture
def busy_box(env: Env) -> Iterator[None]:
    """Two slow requests hold both of the box's slots; they end (and the knob is reset) after the test."""
    env.site.configure("fl-gpu", ttft_ms=SLOW_TTFT_MS)
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(ask, env, "slo") for _ in range(2)]
        deadline = time.monotonic() + 5
        while len(env.site.received("fl-gpu")) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(FRESH_S)  # the next snapshot sees both in flight
        try:
            yield
        finally:
            for f in held:
                assert f.result().headers["x-switchboard-backend"] == "gpu"
            env.site.forget("fl-gpu")


def test_an_idle_box_serves_at_marginal_cost_zero_and_charges_back_its_share(env: Env) -> None:
    raw = ask(env, "slo")
    h = raw.headers
    assert h["x-switchboard-backend"] == "gpu"
    assert h["x-switchboard-marginal-cost-usd"] == "0"
    assert h["x-switchboard-predicted-ttft-ms"] == "100"  # the curve at queue depth 0
    assert h["x-switchboard-slo"] == "p95 ttft<=600ms; predicted met"
    assert h["x-switchboard-route"].startswith("cheapest meeting SLO: fleet@gpu (0.0000 USD, ttft 100 ms")
    row = env.gw.usage_row(h["x-request-id"])
    assert row["cost_micro_usd"] == 0  # no cloud money
    # Its share of the box: serving time (alone on it) x 36 USD/h = 10 micro-USD per ms, within the request.
    assert 0 < row["owned_micro_usd"] <= 10 * row["latency_ms"] + 1
    ranked = json.loads(row["route_candidates"])
    assert [(c["backend"], c["cost_usd"], c["slo_met"], c["usd_per_hour"]) for c in ranked] == [
        ("gpu", "0", True, USD_PER_HOUR),
        ("cloud", ranked[1]["cost_usd"], True, None),
    ]
    assert float(ranked[1]["cost_usd"]) > 0


def test_the_box_is_told_when_the_first_token_is_due_by_the_teams_slo(env: Env) -> None:
    # x-switchboard-deadline-ms: the engine queues earliest deadline first. The TTFT SLO, else the
    # end-to-end one; no SLO, no header. With send_priority (a vLLM with priority scheduling) also vLLM's
    # `priority`: the due time in ms since the epoch, the engine's default 10 s without an SLO.
    started = time.time() * 1000
    for team, text in (("slo", "due probe 1"), ("batchy", "due probe 2"), ("plain", "due probe 3")):
        assert ask(env, team, text=text).headers["x-switchboard-backend"] == "gpu"
        stream = env.client(team).chat.completions.create(
            model="fleet",
            messages=[{"role": "user", "content": text + " streamed"}],
            max_tokens=8,
            stream=True,
        )
        assert [c for c in stream]
    sent = {
        r["body"]["messages"][-1]["content"]: r["headers"].get("x-switchboard-deadline-ms")
        for r in env.site.received("fl-gpu")
        if "due probe" in json.dumps(r["body"])
    }
    assert sent == {
        "due probe 1": "600",
        "due probe 1 streamed": "600",
        "due probe 2": "60000",
        "due probe 2 streamed": "60000",
        "due probe 3": None,
        "due probe 3 streamed": None,
    }
    due = {
        r["body"]["messages"][-1]["content"]: r["body"]["priority"] - started
        for r in env.site.received("fl-gpu")
        if "due probe" in json.dumps(r["body"])
    }
    for text, wanted in (("due probe 1", 600), ("due probe 2", 60_000), ("due probe 3", 10_000)):
        for key in (text, text + " streamed"):
            assert wanted <= due[key] <= wanted + 15_000, key


@pytest.mark.usefixtures("busy_box")
def test_a_deep_queue_overflows_to_the_cloud_and_the_explanation_says_why(env: Env) -> None:
    raw = ask(env, "slo")
    h = raw.headers
    assert h["x-switchboard-backend"] == "cloud"
    assert float(h["x-switchboard-marginal-cost-usd"]) > 0
    assert h["x-switchboard-slo"] == "p95 ttft<=600ms; predicted met"
    assert "overflow: fleet@gpu predicted ttft 2000 ms" in h["x-switchboard-route"]
    row = env.gw.usage_row(h["x-request-id"])
    assert row["backend"] == "cloud" and row["cost_micro_usd"] > 0 and row["owned_micro_usd"] == 0
    assert "overflow: fleet@gpu" in row["route_reason"]
    resp = httpx.get(
        env.gw.base_url + "/admin/route/explain",
        params={"team": "slo", "model": "fleet", "max_tokens": 8},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    body = resp.json()
    assert resp.status_code == 200 and body["policy"]["slo"] == {"p95_ttft_ms": 600, "p95_e2e_ms": None}
    view = {c["backend"]: c for c in body["candidates"]}
    assert [c["backend"] for c in body["candidates"]] == ["cloud", "gpu"]
    assert (
        view["gpu"]["ttft_ms"] == 2000 and view["gpu"]["slo_met"] is False and view["gpu"]["cost_usd"] == "0"
    )
    assert view["cloud"]["slo_met"] is True and float(view["cloud"]["cost_usd"]) > 0


@pytest.mark.usefixtures("busy_box")
def test_a_request_that_may_not_leave_gets_a_503_past_its_deadline_or_queues(env: Env) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        ask(
            env, "deadline", text="deadline probe"
        )  # internal floor, predicted 2200 ms > its 1500 ms deadline
    err = info.value.response.json()["error"]
    assert info.value.status_code == 503 and err["code"] == "deadline_unmeetable"
    assert (
        "teams.deadline.max_latency_ms" in err["message"]
        and "predicted 2200 ms > max 1500 ms" in err["message"]
    )
    assert "`cloud`: tier external < floor internal" in err["message"]
    row = env.gw.usage_row(info.value.response.headers["x-request-id"])
    assert row["http_status"] == 503 and row["backend"] is None
    with pytest.raises(openai.APIStatusError) as first:
        ask(env, "first", text="first token probe")  # predicted first token 2000 ms > its 1200 ms deadline
    err = first.value.response.json()["error"]
    assert first.value.status_code == 503 and err["code"] == "deadline_unmeetable"
    assert (
        "teams.first.max_ttft_ms" in err["message"]
        and "predicted first token 2000 ms > max 1200 ms" in err["message"]
    )
    with pytest.raises(openai.APIStatusError) as asked:  # a request may set its own (narrowing only)
        env.client("private").chat.completions.create(
            model="fleet",
            messages=[{"role": "user", "content": "own deadline probe"}],
            max_tokens=8,
            extra_body={"switchboard": {"max_ttft_ms": 1000}},
        )
    err = asked.value.response.json()["error"]
    assert asked.value.status_code == 503 and "switchboard.max_ttft_ms" in err["message"]
    raw = ask(env, "private", text="private probe")  # no deadline: it waits for the box, never the cloud
    assert raw.headers["x-switchboard-backend"] == "gpu"
    assert raw.headers["x-switchboard-slo"] == "p95 ttft<=600ms; predicted missed"
    assert not [b for b in env.cloud.received("fl-cloud") if "probe" in json.dumps(b)]


def test_a_model_sets_its_own_deadlines(env: Env) -> None:
    # An idle box predicts its first token at 100 ms: past fleet_first's 50 ms; the team sets none.
    for model, setting, why in (
        ("fleet_first", "max_ttft_ms", "predicted first token 100 ms > max 50 ms"),
        ("fleet_quick", "max_latency_ms", "> max 50 ms"),
    ):
        with pytest.raises(openai.APIStatusError) as info:
            ask(env, "plain", model, text="model deadline probe")
        err = info.value.response.json()["error"]
        assert info.value.status_code == 503 and err["code"] == "deadline_unmeetable"
        assert f"models.{model}.{setting}" in err["message"] and why in err["message"], err["message"]
    assert ask(env, "plain").headers["x-switchboard-backend"] == "gpu"  # the model without them serves


def test_prefix_affinity_keeps_a_conversation_on_one_replica(env: Env) -> None:
    def turn(session: int, turns: int) -> str:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"session {session}"}]
        for t in range(turns):
            messages += [{"role": "assistant", "content": f"step {t}"}, {"role": "user", "content": "next"}]
        raw = ask(env, "slo", "agents", messages)
        assert raw.headers["x-switchboard-affinity"].startswith(
            f"agents@{raw.headers['x-switchboard-backend']}"
        )
        assert "prefix affinity agents@" in raw.headers["x-switchboard-route"]
        return str(raw.headers["x-switchboard-backend"])

    homes = {s: {turn(s, t) for t in range(3)} for s in range(8)}
    assert all(len(replicas) == 1 for replicas in homes.values())  # every turn of a session on its replica
    assert len({next(iter(r)) for r in homes.values()}) >= 2  # sessions spread over replicas
    short = ask(env, "slo", "agents")  # a short prompt has no prefix worth keeping
    assert "x-switchboard-affinity" not in short.headers


def test_a_conversation_that_renames_its_model_keeps_its_replica(env: Env) -> None:
    # Each session's first turn asks for one name, its next for another name of the same three boxes. Without
    # a prefill rate, rendezvous hashing keeps it (it ranks a box alike under any name); with one, the next
    # turn finds the box that served the first holding its history under the new name (the first turns all
    # start where the system prompt was served, so rendezvous order alone would spread the next turns).
    for first, second in (("agents", "agents_alias"), ("agents_pf", "agents_pf_alias")):
        for session in range(8):
            opening = {"role": "user", "content": f"renamed {session}"}
            messages = [{"role": "system", "content": SYSTEM}, opening]
            home = ask(env, "slo", first, messages).headers["x-switchboard-backend"]
            messages += [{"role": "assistant", "content": "step 0"}, {"role": "user", "content": "next"}]
            raw = ask(env, "slo", second, messages)
            assert raw.headers["x-switchboard-backend"] == home
            if first == "agents":
                assert raw.headers["x-switchboard-affinity"].startswith(f"{second}@{home}")
            else:  # its history counted as cached there: elsewhere 2.4 s of prefill
                assert float(raw.headers["x-switchboard-predicted-ttft-ms"]) < 600


def test_a_new_conversation_starts_where_its_system_prompt_was_last_served(env: Env) -> None:
    def first_turn(system: str, session: int) -> Any:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"session {session}"}]
        return ask(env, "slo", "agents_pf", messages)

    # Sessions of one agent: after the first, each starts on the replica that served that system prompt last,
    # which predicts the prompt's ~500 tokens already cached (1 s less of prefill at 200 tokens/s).
    home = first_turn(SYSTEM, 100).headers["x-switchboard-backend"]
    for s in range(101, 109):
        raw = first_turn(SYSTEM, s)
        assert raw.headers["x-switchboard-backend"] == home
        assert float(raw.headers["x-switchboard-predicted-ttft-ms"]) < 600  # elsewhere: 2.4 s of prefill
    # Sessions of different agents have nothing cached anywhere: rendezvous hashing spreads them.
    spread = {first_turn(f"Agent {s}. " + SYSTEM, s).headers["x-switchboard-backend"] for s in range(12)}
    assert len(spread) >= 2


def test_under_concurrent_load_only_requests_that_may_leave_overflow(env: Env) -> None:
    env.site.configure("fl-gpu", ttft_ms=400)
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda i: ask(env, "private" if i % 2 else "slo", text=f"load {i % 2} {i}"), range(16)
                )
            )
    finally:
        env.site.forget("fl-gpu")
    served = [(i % 2, r.headers["x-switchboard-backend"]) for i, r in enumerate(replies)]
    assert all(backend == "gpu" for private, backend in served if private)
    assert not [b for b in env.cloud.received("fl-cloud") if "load 1 " in json.dumps(b)]
