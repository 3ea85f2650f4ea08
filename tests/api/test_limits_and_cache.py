"""Rate limits, concurrency caps, budgets and the response cache through a live gateway, with the limits and
cache in-process (no Redis configured) and in the real Redis. Multi-replica exactness: tests/replicas."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from gateway.config import Config, parse_config
from gateway.http.app import create_app
from gateway.records import KeyBudget
from gateway.store.db import make_engine
from tests.support.api_gateway import Gateway
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.services import REDIS_URL

PRICE = "1000"  # USD per Mtok = 1,000 micro-USD per token: every request costs a visible amount


def limits_config(fake: FakeProvider, tmp: Any, redis_prefix: str | None) -> Config:
    models = {
        name: {
            "backend": "fakeoai",
            "upstream_model": f"lc-{name}",
            "input_usd_per_mtok": PRICE,
            "output_usd_per_mtok": PRICE,
        }
        for name in ("fast", "slow", "other")
    }
    teams: dict[str, Any] = {
        "rl": {"limits": {"requests": 3}},
        "hits": {"limits": {"requests": 3}},
        "tok": {"limits": {"tokens": 150}},
        "permodel": {"limits": {"models": {"other": {"requests": 1}}}},
        "conc": {"limits": {"max_concurrent": 1}},
        "bud": {"budgets": [{"period": "day", "usd": "0.05", "soft_usd": "0.02"}]},
        "keys": {"limits": {"key_requests": 2}},
        "c1": {},
        "c2": {},
        "s1": {"cache_share": "grp"},
        "s2": {"cache_share": "grp"},
        "all": {"cache_all": True},
        "nocache": {"cache_ttl_s": 0},
    }
    return parse_config(
        {
            "server": {"metrics_public": True},
            "database": {
                "url": f"sqlite:///{tmp}/sb.db",
                "spill_path": str(tmp / "spill.jsonl"),
                "flush_interval_s": 0.02,
            },
            "backends": {"fakeoai": {"kind": "openai", "base_url": fake.base_url + "/v1"}},
            "models": models,
            "teams": teams,
            "redis": {"url": REDIS_URL if redis_prefix else None, "prefix": redis_prefix or "sb:"},
        }
    )


@pytest.fixture(scope="module", params=["memory", "redis"])
def lgw(
    request: pytest.FixtureRequest, fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp(f"limits-{request.param}")
    prefix = f"sbtest:{uuid.uuid4().hex[:8]}:" if request.param == "redis" else None
    fake.configure("lc-slow", ttft_ms=600)
    config = limits_config(fake, tmp, prefix)
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, engine, fake)
        finally:
            engine.dispose()
            if prefix:
                client = redis.Redis.from_url(REDIS_URL)
                for key in client.scan_iter(prefix + "*"):
                    client.delete(key)
                client.close()


def post(
    gw: Gateway, key: str, model: str = "fast", *, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 8,
    }
    payload.update(body)
    hdrs = {"authorization": f"Bearer {key}", **(headers or {})}
    return httpx.post(gw.v1 + "/chat/completions", json=payload, headers=hdrs, timeout=10)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def wait_rows(gw: Gateway, request_ids: list[str]) -> list[dict[str, Any]]:
    return [gw.usage_row(rid) for rid in request_ids]


# ---- rate limits -------------------------------------------------------------------------------------------


def test_team_request_limit_gives_exactly_n_then_429_with_retry_after(lgw: Gateway) -> None:
    key = lgw.key("rl")
    responses = [post(lgw, key, temperature=0.7) for _ in range(5)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429], [r.text[:300] for r in responses]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses[:3]] == ["2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in responses)
    refused = responses[3]
    err = error_of(refused)
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert "teams.rl.limits.requests" in err["message"]
    assert key not in err["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # a slot frees every 20 s at 3 per minute
    rows = wait_rows(lgw, [r.headers["x-request-id"] for r in responses])
    assert [row["http_status"] for row in rows] == [200, 200, 200, 429, 429]
    assert rows[3]["error_type"] == "rate_limit_exceeded" and rows[3]["attempts"] == 0


def test_token_limit_reserves_the_estimate_and_refuses_a_request_that_can_never_fit(lgw: Gateway) -> None:
    key = lgw.key("tok")
    too_big = post(lgw, key, max_tokens=500)
    assert too_big.status_code == 429
    assert "more than a whole window allows" in error_of(too_big)["message"]
    assert "teams.tok.limits.tokens" in error_of(too_big)["message"]
    ok = post(lgw, key, temperature=0.7)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-tokens"] == "150"
    used = ok.json()["usage"]["total_tokens"]
    # Settled against real usage: the next response's remaining reflects what was used, not the estimate.
    again = post(lgw, key, temperature=0.7)
    assert again.status_code == 200
    remaining = int(again.headers["x-ratelimit-remaining-tokens"])
    estimate_upper = 150 - used - 8  # at least this request's max_tokens is reserved
    assert remaining <= estimate_upper


def test_per_team_model_limit_applies_to_that_model_only(lgw: Gateway) -> None:
    key = lgw.key("permodel")
    assert post(lgw, key, "other", temperature=0.7).status_code == 200
    second = post(lgw, key, "other", temperature=0.7)
    assert second.status_code == 429
    assert "teams.permodel.limits.models.other.requests" in error_of(second)["message"]
    assert post(lgw, key, "fast", temperature=0.7).status_code == 200


def test_per_key_limits_from_team_default_and_from_the_key_itself(lgw: Gateway) -> None:
    default_key = lgw.key("keys")
    assert [post(lgw, default_key, temperature=0.7).status_code for _ in range(3)] == [200, 200, 429]
    own_key = lgw.key("keys", limit_requests=1)
    assert [post(lgw, own_key, temperature=0.7).status_code for _ in range(2)] == [200, 429]
    assert "key_requests, or the key's own limit" in error_of(post(lgw, own_key, temperature=0.7))["message"]


def test_concurrency_cap_per_team(lgw: Gateway) -> None:
    key = lgw.key("conc")
    slow: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: slow.setdefault("r", post(lgw, key, "slow", temperature=0.7)))
    thread.start()
    time.sleep(0.3)
    busy = post(lgw, key, "fast", temperature=0.7)
    thread.join()
    assert slow["r"].status_code == 200
    assert busy.status_code == 429
    assert "teams.conc.limits.max_concurrent" in error_of(busy)["message"]
    assert post(lgw, key, "fast", temperature=0.7).status_code == 200  # the slot was released


# ---- budgets -----------------------------------------------------------------------------------------------


def _spend_until_refused(gw: Gateway, key: str, limit: int = 20) -> list[httpx.Response]:
    responses = []
    for i in range(limit):
        resp = post(gw, key, temperature=0.7, messages=[{"role": "user", "content": f"count {i}"}])
        responses.append(resp)
        if resp.status_code != 200:
            break
    return responses


def test_team_budget_refuses_with_insufficient_quota_and_never_overshoots(lgw: Gateway) -> None:
    key = lgw.key("bud")
    responses = _spend_until_refused(lgw, key)
    assert len(responses) >= 3 and responses[-1].status_code == 429
    err = error_of(responses[-1])
    assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
    assert "teams.bud.budgets" in err["message"] and "$0.05" in err["message"]
    rows = wait_rows(lgw, [r.headers["x-request-id"] for r in responses])
    assert sum(row["cost_micro_usd"] for row in rows) <= 50_000
    assert rows[-1]["error_type"] == "insufficient_quota"
    metrics = httpx.get(lgw.base_url + "/metrics").text  # server.metrics_public in this rig
    assert "switchboard_budget_soft_limit_crossed_total{period=" in metrics and 'scope="team:bud"' in metrics


def test_key_budget(lgw: Gateway) -> None:
    key = lgw.key("c2", budget=KeyBudget("month", 30_000))
    responses = _spend_until_refused(lgw, key)
    assert responses[-1].status_code == 429
    assert error_of(responses[-1])["code"] == "insufficient_quota"
    assert "key `" in error_of(responses[-1])["message"]


def test_budget_counters_are_rebuilt_from_the_ledger_on_a_new_gateway(
    fake: FakeProvider, tmp_path: Any
) -> None:
    """A fresh process (empty in-process counters) still refuses: it rebuilt the spend from SQL."""
    config = limits_config(fake, tmp_path, None)
    with LiveServer(create_app(config)) as first:
        gw = Gateway(first.base_url, config, make_engine(config.database.url), fake)
        key = gw.key("bud")
        responses = _spend_until_refused(gw, key)
        assert responses[-1].status_code == 429
        wait_rows(gw, [r.headers["x-request-id"] for r in responses])
    with LiveServer(create_app(config)) as second:
        gw2 = Gateway(second.base_url, config, gw.db, fake)
        again = post(gw2, key, temperature=0.7, messages=[{"role": "user", "content": "one more"}])
        assert again.status_code == 429 and error_of(again)["code"] == "insufficient_quota"
    gw.db.dispose()


# ---- cache -------------------------------------------------------------------------------------------------


def _content(resp: httpx.Response) -> tuple[Any, Any, Any]:
    data = resp.json()
    return data["choices"], data["usage"], data["model"]


def test_deterministic_request_is_served_from_cache_with_cost_saved(lgw: Gateway) -> None:
    key = lgw.key("c1")
    question = [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}]
    before = len(lgw.fake.requests("lc-fast"))
    first = post(lgw, key, temperature=0, messages=question)
    second = post(lgw, key, temperature=0, messages=question)
    assert first.headers["x-switchboard-cache"] == "miss" and second.headers["x-switchboard-cache"] == "hit"
    assert len(lgw.fake.requests("lc-fast")) == before + 1  # the hit never reached the backend
    assert _content(first) == _content(second)
    for name in ("x-switchboard-backend", "x-switchboard-route", "content-type"):
        assert first.headers[name] == second.headers[name]
    row1, row2 = wait_rows(lgw, [first.headers["x-request-id"], second.headers["x-request-id"]])
    assert row1["cache_hit"] is False and row1["cost_micro_usd"] > 0
    assert row2["cache_hit"] is True and row2["cost_micro_usd"] == 0
    assert row2["cost_saved_micro_usd"] == row1["cost_micro_usd"]
    assert row2["backend"] == row1["backend"] and row2["status"] == "ok"


def test_streamed_answer_is_cached_and_replayed_as_a_stream(lgw: Gateway) -> None:
    client = openai.OpenAI(base_url=lgw.v1, api_key=lgw.key("c1"), max_retries=0)
    question = [{"role": "user", "content": f"stream me {uuid.uuid4().hex}"}]

    def run() -> tuple[str, list[Any], Any, str]:
        raw = client.chat.completions.with_raw_response.create(
            model="fast",
            messages=question,
            max_tokens=8,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        usage = [c.usage for c in chunks if c.usage is not None]
        return text, finishes, usage, raw.headers["x-switchboard-cache"]

    text1, fin1, usage1, cache1 = run()
    text2, fin2, usage2, cache2 = run()
    assert (cache1, cache2) == ("miss", "hit")
    assert text1 and text2 == text1 and fin2 == fin1 and usage2 == usage1


def test_cache_control_and_opt_in_headers(lgw: Gateway) -> None:
    key = lgw.key("c1")
    q = [{"role": "user", "content": f"directives {uuid.uuid4().hex}"}]
    assert (
        post(lgw, key, temperature=0, messages=q, headers={"cache-control": "no-store"}).headers[
            "x-switchboard-cache"
        ]
        == "miss"
    )
    assert (
        post(lgw, key, temperature=0, messages=q).headers["x-switchboard-cache"] == "miss"
    )  # was not stored
    assert post(lgw, key, temperature=0, messages=q).headers["x-switchboard-cache"] == "hit"
    no_cache = post(lgw, key, temperature=0, messages=q, headers={"cache-control": "no-cache"})
    assert no_cache.headers["x-switchboard-cache"] == "miss"
    random = [{"role": "user", "content": f"random {uuid.uuid4().hex}"}]
    assert post(lgw, key, temperature=0.9, messages=random).headers["x-switchboard-cache"] == "skip"
    opted = {"x-switchboard-cache": "on"}
    assert (
        post(lgw, key, temperature=0.9, messages=random, headers=opted).headers["x-switchboard-cache"]
        == "miss"
    )
    assert (
        post(lgw, key, temperature=0.9, messages=random, headers=opted).headers["x-switchboard-cache"]
        == "hit"
    )
    off = post(lgw, key, temperature=0, messages=q, headers={"x-switchboard-cache": "off"})
    assert off.headers["x-switchboard-cache"] == "skip"


def test_team_settings_cache_all_and_ttl_zero(lgw: Gateway) -> None:
    q = [{"role": "user", "content": f"team settings {uuid.uuid4().hex}"}]
    key_all = lgw.key("all")
    assert [
        post(lgw, key_all, temperature=1, messages=q).headers["x-switchboard-cache"] for _ in range(2)
    ] == [
        "miss",
        "hit",
    ]
    key_off = lgw.key("nocache")
    assert post(lgw, key_off, temperature=0, messages=q).headers["x-switchboard-cache"] == "skip"


def test_cache_never_crosses_teams_unless_they_share_a_group(lgw: Gateway) -> None:
    q = [{"role": "user", "content": f"teams {uuid.uuid4().hex}"}]
    assert post(lgw, lgw.key("c1"), temperature=0, messages=q).headers["x-switchboard-cache"] == "miss"
    assert post(lgw, lgw.key("c2"), temperature=0, messages=q).headers["x-switchboard-cache"] == "miss"
    assert post(lgw, lgw.key("s1"), temperature=0, messages=q).headers["x-switchboard-cache"] == "miss"
    assert post(lgw, lgw.key("s2"), temperature=0, messages=q).headers["x-switchboard-cache"] == "hit"


def test_a_cache_hit_still_counts_as_a_request(lgw: Gateway) -> None:
    q = [{"role": "user", "content": f"hits and limits {uuid.uuid4().hex}"}]
    key = lgw.key("hits")  # 3 requests per window
    responses = [post(lgw, key, temperature=0, messages=q) for _ in range(4)]
    assert [r.headers.get("x-switchboard-cache") for r in responses[:3]] == ["miss", "hit", "hit"]
    assert responses[3].status_code == 429  # hits are requests too: the limit protects the gateway


def test_readyz_reports_redis(lgw: Gateway) -> None:
    body = httpx.get(lgw.base_url + "/readyz").json()
    expected = "ok" if lgw.config.redis.url else "not configured"
    assert body["redis"] == expected and body["status"] == "ok"
