"""Admission (limits/gate.py) and the cache policy (cache/policy.py) over the in-process store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from gateway.cache.policy import plan_cache, ttl_s
from gateway.config import Config, parse_config
from gateway.errors import BudgetExceeded, RateLimited
from gateway.limits.base import LimitKind
from gateway.limits.gate import Gate, micro_usd
from gateway.limits.memory import MemoryLimiter
from gateway.records import KeyBudget, KeyIdentity
from gateway.translate.openai_chat import chat_request, parse_chat_body


def config(**teams: Any) -> Config:
    return parse_config(
        {
            "models": {
                "m": {"backend": "local", "cache_ttl_s": 60},
                "n": {"backend": "local"},
            },
            "teams": teams,
        }
    )


def key(team: str, key_id: str = "k1", **extra: Any) -> KeyIdentity:
    return KeyIdentity(key_id, team, "sk-sb-x", None, None, False, **extra)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_rules_cover_key_team_and_team_model_and_the_keys_own_limit_wins() -> None:
    cfg = config(
        t={"limits": {"requests": 10, "tokens": 1000, "key_requests": 5, "models": {"m": {"requests": 2}}}}
    )
    gate = Gate(MemoryLimiter(), cfg)
    rules = gate.rules(key("t"), "m")
    got = {(r.scope, r.kind, r.limit) for r in rules.rate}
    assert got == {
        ("key:k1", LimitKind.REQUESTS, 5),
        ("team:t", LimitKind.REQUESTS, 10),
        ("team:t", LimitKind.TOKENS, 1000),
        ("team_model:t:m", LimitKind.REQUESTS, 2),
    }
    assert {(r.scope, r.limit) for r in gate.rules(key("t"), "n").rate} == {
        ("key:k1", 5),
        ("team:t", 10),
        ("team:t", 1000),
    }
    own = gate.rules(key("t", "k2", limit_requests=1, limit_tokens=50), "n")
    assert ("key:k2", LimitKind.REQUESTS, 1) in {(r.scope, r.kind, r.limit) for r in own.rate}
    assert ("key:k2", LimitKind.TOKENS, 50) in {(r.scope, r.kind, r.limit) for r in own.rate}
    assert gate.rules(key("unlimited"), "m").rate == ()


def test_a_denied_request_frees_its_concurrency_slot_and_names_the_setting() -> None:
    async def scenario() -> None:
        gate = Gate(MemoryLimiter(), config(t={"limits": {"requests": 1, "max_concurrent": 5}}))
        first = await gate.admit(key("t"), "m", 10)
        assert (b"x-ratelimit-remaining-requests", b"0") in first.headers()
        with pytest.raises(RateLimited) as info:
            await gate.admit(key("t"), "m", 10)
        assert (b"x-ratelimit-remaining-requests", b"0") in info.value.headers
        assert "teams.t.limits.requests" in info.value.message
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        # Only the admitted request holds a slot: 4 more fit.
        grants = [await gate.store.concurrency_acquire("team:t", 5) for _ in range(5)]
        assert [g.acquired for g in grants] == [True, True, True, True, False]
        gate.settle_soon(first, tokens=10, cost_micro_usd=0)
        await gate.aclose()

    run(scenario())


def test_budget_reserve_settle_and_soft_alert_once() -> None:
    alerts: list[tuple[str, int]] = []

    async def scenario() -> None:
        cfg = config(t={"budgets": [{"period": "month", "usd": "1", "soft_usd": "0.5"}]})
        gate = Gate(
            MemoryLimiter(), cfg, on_soft_limit=lambda rule, period, spent: alerts.append((rule.scope, spent))
        )
        for _ in range(3):
            ticket = await gate.admit(key("t"), "m", 1)
            await gate.reserve(ticket, 300_000)
            gate.settle_soon(ticket, tokens=1, cost_micro_usd=300_000)
            await gate.aclose()
        ticket = await gate.admit(key("t"), "m", 1)
        with pytest.raises(BudgetExceeded) as info:
            await gate.reserve(ticket, 300_000)
        err = info.value
        assert err.code == "insufficient_quota" and err.status_code == 429
        assert "team `t` has used $0.9 of its $1 monthly budget" in err.message
        assert "teams.t.budgets" in err.message

    run(scenario())
    assert alerts == [("team:t", 600_000)]


def test_key_budget_rule() -> None:
    gate = Gate(MemoryLimiter(), config(t={}))
    rules = gate.rules(key("t", budget=KeyBudget("day", 5_000, 1_000)), "m").budgets
    assert [(r.scope, str(r.period), r.limit_micro_usd, r.soft_limit_micro_usd) for r in rules] == [
        ("key:k1", "day", 5_000, 1_000)
    ]


def test_budget_counters_are_rebuilt_from_the_ledger_once_per_period_and_survive_a_db_error() -> None:
    calls: list[tuple[str, str]] = []
    fail = {"on": True}

    def spend(scope: str, period: str) -> int:
        calls.append((scope, period))
        if fail["on"]:
            raise OperationalError("SELECT", {}, Exception("database down"))
        return 900_000

    now = {"s": 0.0}

    async def scenario() -> None:
        cfg = config(t={"budgets": [{"period": "day", "usd": "1"}]})
        gate = Gate(MemoryLimiter(), cfg, spend=spend, monotonic_s=lambda: now["s"])
        ticket = await gate.admit(key("t"), "m", 1)
        await gate.reserve(ticket, 200_000)  # DB down: admitted on the counter alone, no exception
        gate.settle_soon(ticket, tokens=1, cost_micro_usd=0)
        await gate.aclose()
        assert len(calls) == 1
        fail["on"] = False
        now["s"] += 6.0  # the retry after a failed rebuild is due (5 s), in the background
        ticket = await gate.admit(key("t"), "m", 1)
        await gate.reserve(ticket, 50_000)
        gate.settle_soon(ticket, tokens=1, cost_micro_usd=50_000)
        await gate.aclose()
        assert len(calls) == 2
        ticket = await gate.admit(key("t"), "m", 1)
        with pytest.raises(BudgetExceeded):
            await gate.reserve(
                ticket, 150_000
            )  # the ledger's 900k (it exceeds the counter's 50k) + 150k > 1M
        assert len(calls) == 2  # not again until limits.budget_sync_s has passed

    run(scenario())


def test_micro_usd_rounds_half_up() -> None:
    from decimal import Decimal

    assert micro_usd(Decimal("0.0000005")) == 1 and micro_usd(Decimal("12.5")) == 12_500_000


# ---- cache policy ------------------------------------------------------------------------------------------


def body(**extra: Any) -> Any:
    import orjson

    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra})
    return chat_request(parse_chat_body(raw), "r", 1.0)


def test_ttl_precedence_team_then_model_then_default() -> None:
    cfg = config(a={"cache_ttl_s": 5}, b={})
    assert ttl_s(cfg, "a", "m") == 5
    assert ttl_s(cfg, "b", "m") == 60
    assert ttl_s(cfg, "b", "n") == cfg.cache.ttl_s == 3600


def test_plan_cache_rules() -> None:
    cfg = config(a={}, b={}, s1={"cache_share": "g"}, s2={"cache_share": "g"}, all={"cache_all": True})
    assert plan_cache(cfg, "a", body(temperature=0.5), None, None) is None
    assert plan_cache(cfg, "all", body(temperature=0.5), None, None) is not None
    assert plan_cache(cfg, "a", body(temperature=0.5), None, "on") is not None
    assert plan_cache(cfg, "a", body(temperature=0), None, "off") is None
    plan = plan_cache(cfg, "a", body(seed=3), "no-store", None)
    assert plan is not None and plan.read and not plan.write
    plan = plan_cache(cfg, "a", body(seed=3), "max-age=0", None)
    assert plan is not None and not plan.read and plan.write
    assert plan_cache(cfg, "a", body(seed=3), "no-cache, no-store", None) is None
    keys = {t: plan_cache(cfg, t, body(temperature=0), None, None).key for t in ("a", "b", "s1", "s2")}  # type: ignore[union-attr]
    assert keys["a"] != keys["b"] and keys["s1"] == keys["s2"] != keys["a"]
