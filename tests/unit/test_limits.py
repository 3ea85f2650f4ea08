"""Rate limits, concurrency caps and budgets on MemoryLimiter with explicit clocks; header rendering.

`LimiterContract` (tests/support/limiter_contract.py) holds the behaviour both implementations must share;
tests/integration/test_limits_redis.py runs it against real Redis. Every call passes `now_ms`, so nothing
here sleeps or reads a clock.
"""

from __future__ import annotations

import calendar
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.limits.base import (
    Admission,
    BudgetPeriod,
    LimitKind,
    LimitRule,
    RuleStatus,
    format_duration,
    period_end_ms,
    period_key,
    ratelimit_headers,
    retry_after_header,
)
from gateway.limits.memory import MemoryLimiter
from tests.support.limiter_contract import MINUTE, T0, LimiterContract, requests


class TestMemoryLimiter(LimiterContract):
    @pytest.fixture
    def store(self) -> MemoryLimiter:
        return MemoryLimiter(clock_ms=lambda: pytest.fail("every call in these tests passes now_ms"))

    async def test_the_injected_clock_is_used_when_no_time_is_passed(self) -> None:
        now = [float(T0)]
        store = MemoryLimiter(clock_ms=lambda: now[0])
        rule = requests("key:clock", 1, 1.0)
        assert (await store.admit([rule], cost_tokens=0)).allowed
        assert not (await store.admit([rule], cost_tokens=0)).allowed
        now[0] += 1000
        assert (await store.admit([rule], cost_tokens=0)).allowed

    async def test_negative_costs_are_refused(self) -> None:
        with pytest.raises(ValueError, match="cost_tokens must be >= 0"):
            await MemoryLimiter().admit([requests("k", 1)], cost_tokens=-1)

    @example(limit=159, window_s=1, kind=LimitKind.REQUESTS, cost_share=1.0, now_ms=1.7e12)  # a slot boundary
    @given(
        limit=st.integers(1, 500),
        window_s=st.sampled_from([0.333, 1, 7, 13.7, 60, 3600, 86400]),
        kind=st.sampled_from(LimitKind),
        cost_share=st.floats(0.01, 1),
        now_ms=st.floats(1.7e12, 2.2e12),
    )
    async def test_a_burst_fits_the_limit_and_retry_after_is_honoured(
        self, limit: int, window_s: float, kind: LimitKind, cost_share: float, now_ms: float
    ) -> None:
        store, rule = MemoryLimiter(), LimitRule("key:p", kind, limit, window_s)
        cost = max(1, int(limit * cost_share)) if kind is LimitKind.TOKENS else 0
        admitted = 0
        while (denied := await store.admit([rule], cost_tokens=cost, now_ms=now_ms)).allowed:
            admitted += rule.cost(cost)
        assert limit - rule.cost(cost) < admitted <= limit
        assert denied.retry_after_ms is not None and denied.retry_after_ms > 0
        assert (await store.admit([rule], cost_tokens=cost, now_ms=now_ms + denied.retry_after_ms)).allowed

    def test_a_rule_needs_a_positive_limit_and_window(self) -> None:
        with pytest.raises(ValueError, match="rate limit `team:x` requests: needs limit >= 1"):
            requests("team:x", 0)


def _status(kind: LimitKind, limit: int, remaining: int, reset_ms: int) -> RuleStatus:
    return RuleStatus(LimitRule(f"scope{limit}", kind, limit), remaining, reset_ms, True)


def test_headers_take_the_tightest_rule_of_each_kind() -> None:
    admission = Admission(
        True,
        0,
        (
            _status(LimitKind.REQUESTS, 100, 40, 36_000),
            _status(LimitKind.REQUESTS, 10, 4, 360_000),
            _status(LimitKind.TOKENS, 1000, 900, 6_000),
        ),
        cost_tokens=100,
    )
    assert ratelimit_headers(admission) == [
        ("x-ratelimit-limit-requests", "10"),
        ("x-ratelimit-remaining-requests", "4"),
        ("x-ratelimit-reset-requests", "6m0s"),
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "900"),
        ("x-ratelimit-reset-tokens", "6s"),
    ]


def test_a_degraded_admission_renders_no_headers() -> None:
    assert ratelimit_headers(Admission(True, 0, (), cost_tokens=5, degraded=True)) == []


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0s"), (20, "20ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"), (1020, "1.02s"),
     (360_000, "6m0s"), (3_723_004, "1h2m3.004s"), (7_200_000, "2h0m0s")],
)  # fmt: skip
def test_durations_use_openai_s_go_style(ms: int, text: str) -> None:
    assert format_duration(ms) == text
    assert re.fullmatch(r"0s|\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s", text)


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after_header(ms) for ms in (0, 1, 1000, 1001, None)] == ["1", "1", "1", "2", "60"]


def test_period_keys_and_ends_are_utc() -> None:
    assert period_key(BudgetPeriod.DAY, T0) == "2030-01-31"
    assert period_key(BudgetPeriod.MONTH, T0) == "2030-01"
    assert period_end_ms("2030-01-31") == period_end_ms("2030-01") == T0 + MINUTE
    assert period_end_ms("2030-12") == calendar.timegm((2031, 1, 1, 0, 0, 0)) * 1000
