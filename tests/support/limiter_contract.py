"""The behaviour every limiter implementation must share, as a test class to subclass.

`LimiterContract` runs on MemoryLimiter (tests/unit/test_limits.py) and on RedisLimiter against the real Redis
(tests/integration/test_limits_redis.py). A subclass provides a `store` fixture: a fresh, empty limiter.
Every call passes `now_ms`, so nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import calendar

from gateway.limits.base import (
    BudgetPeriod,
    BudgetRule,
    LimitKind,
    LimitRule,
)
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis_store import RedisLimiter

T0 = calendar.timegm((2030, 1, 31, 23, 59, 0)) * 1000  # a whole minute, one minute before two rollovers
MINUTE = 60_000

Store = MemoryLimiter | RedisLimiter


def requests(scope: str, limit: int, window_s: float = 1.0) -> LimitRule:
    return LimitRule(scope, LimitKind.REQUESTS, limit, window_s)


def tokens(scope: str, limit: int, window_s: float = 60.0) -> LimitRule:
    return LimitRule(scope, LimitKind.TOKENS, limit, window_s)


class LimiterContract:
    """Subclasses provide a `store` fixture (a fresh, empty limiter)."""

    async def test_a_burst_of_exactly_n_then_retry_after_one_emission_interval(self, store: Store) -> None:
        rule = requests("key:burst", 5, 1.0)  # emission interval 200 ms
        results = [await store.admit([rule], cost_tokens=0, now_ms=T0) for _ in range(6)]
        assert [a.allowed for a in results] == [True] * 5 + [False]
        assert [a.statuses[0].remaining for a in results] == [4, 3, 2, 1, 0, 0]
        assert results[4].statuses[0].reset_ms == 1000  # full again after one window
        assert results[5].retry_after_ms == 200 and results[5].blocked_by == (rule,)
        assert not (await store.admit([rule], cost_tokens=0, now_ms=T0 + 199)).allowed
        assert (await store.admit([rule], cost_tokens=0, now_ms=T0 + 200)).allowed

    async def test_a_burst_just_before_an_interval_edge_gets_no_more_at_it(self, store: Store) -> None:
        # Regression: state counted in whole emission intervals aligned to the epoch credited a burst with the
        # time since its interval began, so 2 per minute at :59.999 admitted a third request at :00.
        rule = requests("key:edge", 2, 60.0)  # emission interval 30 s
        late = T0 + 29_999
        assert all([(await store.admit([rule], cost_tokens=0, now_ms=late)).allowed for _ in range(2)])
        at_edge = await store.admit([rule], cost_tokens=0, now_ms=T0 + 30_000)
        assert not at_edge.allowed and at_edge.retry_after_ms == 29_999
        assert not (await store.admit([rule], cost_tokens=0, now_ms=late + 29_999)).allowed
        refilled = await store.admit([rule], cost_tokens=0, now_ms=late + 30_000)
        assert refilled.allowed and refilled.statuses[0].remaining == 0

    async def test_remaining_counts_whole_units_that_fit_now(self, store: Store) -> None:
        rule = tokens("team:partial", 100, 60.0)  # one token per 600 ms
        await store.admit([rule], cost_tokens=100, now_ms=T0)
        assert (await store.admit([rule], cost_tokens=1, now_ms=T0 + 599)).statuses[0].remaining == 0
        half = await store.admit([rule], cost_tokens=1, now_ms=T0 + 1_799)  # 2.998 tokens back, 1 spent
        assert half.allowed and half.statuses[0].remaining == 1 and half.statuses[0].reset_ms == 58_801

    async def test_after_the_burst_exactly_n_per_window(self, store: Store) -> None:
        rule = requests("key:steady", 5, 1.0)
        per_window = [0] * 10
        for t in range(0, 10_000, 10):  # a request every 10 ms for ten windows
            if (await store.admit([rule], cost_tokens=0, now_ms=T0 + t)).allowed:
                per_window[t // 1000] += 1
        # GCRA: the first window holds the burst (5) plus the refill (4); after it, exactly N per window.
        assert per_window == [9] + [5] * 9

    async def test_all_rules_are_charged_or_none(self, store: Store) -> None:
        per_key, team_tokens = requests("key:a", 10, 60), tokens("team:a", 100)
        assert (await store.admit([per_key, team_tokens], cost_tokens=60, now_ms=T0)).allowed
        denied = await store.admit([per_key, team_tokens], cost_tokens=60, now_ms=T0)
        assert not denied.allowed and denied.blocked_by == (team_tokens,)
        assert [s.remaining for s in denied.statuses] == [9, 40]  # the request rule was not charged
        assert denied.retry_after_ms == 12_000  # 20 tokens short at 600 ms per token
        after = await store.admit([per_key, team_tokens], cost_tokens=40, now_ms=T0)
        assert after.allowed and [s.remaining for s in after.statuses] == [8, 0]

    async def test_a_cost_above_the_limit_never_fits(self, store: Store) -> None:
        rule = tokens("team_model:a:m", 100)
        too_big = await store.admit([requests("key:b", 5), rule], cost_tokens=101, now_ms=T0)
        assert not too_big.allowed and too_big.retry_after_ms is None and too_big.blocked_by == (rule,)
        assert (await store.admit([rule], cost_tokens=100, now_ms=T0)).allowed  # nothing was charged

    async def test_settle_refunds_or_charges_the_difference(self, store: Store) -> None:
        rule = tokens("team:settle", 100)
        first = await store.admit([rule], cost_tokens=80, now_ms=T0)
        await store.settle(first, 30, now_ms=T0)  # 50 tokens back
        second = await store.admit([rule], cost_tokens=70, now_ms=T0)
        assert second.allowed and second.statuses[0].remaining == 0
        await store.settle(second, 90, now_ms=T0)  # 20 more than reserved: the bucket is in debt
        late = await store.admit([rule], cost_tokens=1, now_ms=T0 + 12_000)
        assert not late.allowed and late.retry_after_ms == 600
        assert (await store.admit([rule], cost_tokens=1, now_ms=T0 + 12_600)).allowed

    async def test_settle_can_give_the_request_back(self, store: Store) -> None:
        rule = requests("key:cancel", 1, 60)
        admitted = await store.admit([rule], cost_tokens=10, now_ms=T0)
        await store.settle(admitted, 0, count_request=False, now_ms=T0)
        assert (await store.admit([rule], cost_tokens=10, now_ms=T0)).allowed

    async def test_settle_of_a_denied_admission_changes_nothing(self, store: Store) -> None:
        rule = requests("key:denied", 1, 60)
        await store.admit([rule], cost_tokens=0, now_ms=T0)
        denied = await store.admit([rule], cost_tokens=0, now_ms=T0)
        await store.settle(denied, 0, count_request=False, now_ms=T0)
        assert not (await store.admit([rule], cost_tokens=0, now_ms=T0)).allowed

    async def test_a_changed_limit_starts_a_fresh_bucket(self, store: Store) -> None:
        await store.admit([requests("team:cfg", 1, 60)], cost_tokens=0, now_ms=T0)
        assert (await store.admit([requests("team:cfg", 2, 60)], cost_tokens=0, now_ms=T0)).allowed

    async def test_no_rules_admit_everything(self, store: Store) -> None:
        admission = await store.admit([], cost_tokens=10, now_ms=T0)
        assert admission.allowed and admission.statuses == ()
        assert (await store.reserve_budget([], 10, now_ms=T0)).allowed

    async def test_concurrency_cap_and_release(self, store: Store) -> None:
        grants = [await store.concurrency_acquire("team:c", 2, now_ms=T0) for _ in range(3)]
        assert [g.acquired for g in grants] == [True, True, False]
        assert [g.in_flight for g in grants] == [1, 2, 2]
        await store.concurrency_release(grants[0])
        await store.concurrency_release(grants[2])  # a refused grant holds nothing
        assert (await store.concurrency_acquire("team:c", 2, now_ms=T0)).acquired
        assert not (await store.concurrency_acquire("team:c", 2, now_ms=T0)).acquired

    async def test_a_lost_lease_expires(self, store: Store) -> None:
        held = await store.concurrency_acquire("team:crash", 1, lease_ttl_s=10, now_ms=T0)
        assert held.acquired  # the replica holding it "crashes": never released
        assert not (await store.concurrency_acquire("team:crash", 1, now_ms=T0 + 9_999)).acquired
        assert (await store.concurrency_acquire("team:crash", 1, now_ms=T0 + 10_000)).acquired

    async def test_budget_reserves_until_the_limit_then_settles_actual_spend(self, store: Store) -> None:
        rule = BudgetRule("team:b", BudgetPeriod.MONTH, 1_000)
        first = await store.reserve_budget([rule], 600, now_ms=T0)
        assert first.allowed and first.statuses[0].reserved_micro_usd == 600
        second = await store.reserve_budget([rule], 600, now_ms=T0)  # 600 + 600 > 1000 while in flight
        assert not second.allowed and second.blocked_by == (rule,)
        assert second.retry_after_ms == MINUTE  # the month ends a minute after T0
        await store.settle_budget(first, 350, now_ms=T0)
        third = await store.reserve_budget([rule], 600, now_ms=T0)
        assert third.allowed
        status = third.statuses[0]
        assert (status.period_key, status.spent_micro_usd, status.reserved_micro_usd) == ("2030-01", 350, 600)

    async def test_budget_rules_are_reserved_all_or_none(self, store: Store) -> None:
        team, key = BudgetRule("team:t", BudgetPeriod.DAY, 10_000), BudgetRule("key:k", BudgetPeriod.DAY, 500)
        denied = await store.reserve_budget([team, key], 600, now_ms=T0)
        assert not denied.allowed and denied.blocked_by == (key,)
        alone = await store.reserve_budget([team], 10_000, now_ms=T0)
        assert alone.allowed  # the denied request reserved nothing on the team

    async def test_soft_limit_crossing_is_reported_once(self, store: Store) -> None:
        rule = BudgetRule("team:soft", BudgetPeriod.DAY, 1_000, soft_limit_micro_usd=500)
        crossed = []
        for _ in range(3):
            reservation = await store.reserve_budget([rule], 300, now_ms=T0)
            settlement = await store.settle_budget(reservation, 300, now_ms=T0)
            crossed.append(settlement.soft_crossed)
        assert crossed == [(), (rule,), ()]
        assert (await store.reserve_budget([rule], 100, now_ms=T0)).statuses[0].over_soft_limit

    async def test_budget_periods_roll_over(self, store: Store) -> None:
        day, month = BudgetRule("key:d", BudgetPeriod.DAY, 100), BudgetRule("team:m", BudgetPeriod.MONTH, 100)
        for rule in (day, month):
            await store.settle_budget(await store.reserve_budget([rule], 100, now_ms=T0), 100, now_ms=T0)
            assert not (await store.reserve_budget([rule], 1, now_ms=T0 + MINUTE - 1)).allowed
            fresh = await store.reserve_budget([rule], 100, now_ms=T0 + MINUTE)
            assert fresh.allowed and fresh.statuses[0].spent_micro_usd == 0
        assert fresh.statuses[0].period_key == "2030-02"

    async def test_an_unsettled_reservation_expires(self, store: Store) -> None:
        rule = BudgetRule("team:lost", BudgetPeriod.MONTH, 1_000)
        assert (await store.reserve_budget([rule], 1_000, reservation_ttl_s=5, now_ms=T0)).allowed
        assert not (await store.reserve_budget([rule], 1, now_ms=T0 + 4_999)).allowed
        assert (await store.reserve_budget([rule], 1_000, now_ms=T0 + 5_000)).allowed

    async def test_settling_an_expired_reservation_still_records_the_spend(self, store: Store) -> None:
        rule = BudgetRule("team:slow", BudgetPeriod.MONTH, 1_000)
        slow = await store.reserve_budget([rule], 400, reservation_ttl_s=1, now_ms=T0)
        other = await store.reserve_budget([rule], 10, now_ms=T0 + 2_000)  # the slow one's hold has expired
        assert other.statuses[0].reserved_micro_usd == 10
        charge = (await store.settle_budget(slow, 400, now_ms=T0 + 2_000)).charges[0]
        assert (charge.spent_before_micro_usd, charge.spent_after_micro_usd) == (0, 400)
        after = await store.reserve_budget([rule], 1, now_ms=T0 + 2_000)
        assert (after.statuses[0].spent_micro_usd, after.statuses[0].reserved_micro_usd) == (400, 11)

    async def test_load_spent_rebuilds_from_the_ledger_without_going_backwards(self, store: Store) -> None:
        rule = BudgetRule("team:ledger", BudgetPeriod.MONTH, 1_000)
        await store.load_spent("team:ledger", "2030-01", 900)
        assert not (await store.reserve_budget([rule], 101, now_ms=T0)).allowed
        await store.load_spent("team:ledger", "2030-01", 100)  # a stale ledger never lowers a live counter
        assert (await store.reserve_budget([rule], 100, now_ms=T0)).statuses[0].spent_micro_usd == 900
