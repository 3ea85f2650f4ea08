"""`MemoryLimiter`: the single-replica twin of `RedisLimiter`, with the same arithmetic as gcra.lua.

No call awaits anything, so each is atomic on the event loop. Both limiters pass the same tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.limits.base import (
    DEFAULT_LEASE_TTL_S,
    DEFAULT_RESERVATION_TTL_S,
    Admission,
    BudgetCharge,
    BudgetReservation,
    BudgetRule,
    BudgetSettlement,
    BudgetStatus,
    ConcurrencyGrant,
    LimitRule,
    budget_retry_ms,
    check_cost,
    gcra_now_us,
    gcra_retry_ms,
    gcra_step,
    new_id,
    period_key,
    rule_key,
    rule_status,
    settle_deltas,
    wall_clock_ms,
)


@dataclass(slots=True)
class _BudgetCell:
    spent: int = 0
    reserved: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # reservation id -> (estimate, expires)

    def sweep(self, now_ms: float) -> None:
        for rid, (amount, expires_ms) in list(self.holds.items()):
            if expires_ms <= now_ms:
                self.reserved -= amount
                del self.holds[rid]


class MemoryLimiter:
    """In-process twin of `RedisLimiter` for a single replica: the same arithmetic as gateway/limits/gcra.lua.
    No call awaits anything, so each is atomic on the event loop."""

    def __init__(self, *, clock_ms: Callable[[], float] = wall_clock_ms) -> None:
        self._clock_ms = clock_ms
        self._tats: dict[str, float] = {}  # GCRA state: TAT in us, keyed like Redis; see gcra.lua
        self._leases: dict[str, dict[str, float]] = {}  # scope -> lease id -> expires_ms
        self._budgets: dict[tuple[str, str], _BudgetCell] = {}  # (scope, period key)

    def _now(self, now_ms: float | None) -> float:
        return self._clock_ms() if now_ms is None else now_ms

    async def admit(
        self, rules: Sequence[LimitRule], *, cost_tokens: int, now_ms: float | None = None
    ) -> Admission:
        check_cost(cost_tokens, "cost_tokens")
        now_us = gcra_now_us(self._now(now_ms))
        allowed = True
        retry_ms: int | None = 0
        plans: list[tuple[LimitRule, float, float, bool]] = []
        for rule in rules:
            cost = rule.cost(cost_tokens)
            tat, new_tat, fits = gcra_step(rule, self._tats.get(rule_key(rule)), cost, now_us)
            if cost > rule.limit:
                allowed, retry_ms = False, None
            elif not fits:
                allowed = False
                if retry_ms is not None:
                    retry_ms = max(retry_ms, gcra_retry_ms(rule, new_tat, now_us))
            plans.append((rule, tat, new_tat, fits))
        statuses = []
        for rule, tat, new_tat, fits in plans:
            if allowed:
                self._tats[rule_key(rule)] = tat = new_tat
            statuses.append(rule_status(rule, tat, now_us, fits))
        return Admission(allowed, retry_ms, tuple(statuses), cost_tokens)

    async def settle(
        self,
        admission: Admission,
        actual_tokens: int,
        *,
        count_request: bool = True,
        now_ms: float | None = None,
    ) -> None:
        check_cost(actual_tokens, "actual_tokens")
        now_us = gcra_now_us(self._now(now_ms))
        for rule, delta in settle_deltas(admission, actual_tokens, count_request):
            key = rule_key(rule)
            tat = gcra_step(rule, self._tats.get(key), delta, now_us)[1]
            if tat > now_us:
                self._tats[key] = tat
            else:
                self._tats.pop(key, None)

    async def concurrency_acquire(
        self, scope: str, limit: int, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S, now_ms: float | None = None
    ) -> ConcurrencyGrant:
        now = self._now(now_ms)
        leases = self._leases.setdefault(scope, {})
        for lease_id, expires_ms in list(leases.items()):
            if expires_ms <= now:
                del leases[lease_id]
        if len(leases) >= limit:
            return ConcurrencyGrant(scope, limit, False, len(leases))
        lease_id = new_id()
        leases[lease_id] = now + round(lease_ttl_s * 1000)
        return ConcurrencyGrant(scope, limit, True, len(leases), lease_id)

    async def concurrency_release(self, grant: ConcurrencyGrant) -> None:
        if grant.acquired and not grant.degraded:
            self._leases.get(grant.scope, {}).pop(grant.lease_id, None)

    async def reserve_budget(
        self,
        rules: Sequence[BudgetRule],
        estimate_micro_usd: int,
        *,
        reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S,
        now_ms: float | None = None,
    ) -> BudgetReservation:
        check_cost(estimate_micro_usd, "estimate_micro_usd")
        now = self._now(now_ms)
        rid = new_id()
        rows = []
        for rule in rules:
            key = period_key(rule.period, now)
            cell = self._budgets.setdefault((rule.scope, key), _BudgetCell())
            cell.sweep(now)
            rows.append(
                (rule, key, cell, cell.spent + cell.reserved + estimate_micro_usd <= rule.limit_micro_usd)
            )
        allowed = all(fits for *_, fits in rows)
        if allowed:
            for _, _, cell, _ in rows:
                cell.reserved += estimate_micro_usd
                cell.holds[rid] = (estimate_micro_usd, now + round(reservation_ttl_s * 1000))
        statuses = tuple(BudgetStatus(r, k, c.spent, c.reserved, f) for r, k, c, f in rows)
        return BudgetReservation(allowed, rid, estimate_micro_usd, statuses, budget_retry_ms(statuses, now))

    async def settle_budget(
        self, reservation: BudgetReservation, actual_micro_usd: int, *, now_ms: float | None = None
    ) -> BudgetSettlement:
        check_cost(actual_micro_usd, "actual_micro_usd")
        if not reservation.allowed or reservation.degraded:
            return BudgetSettlement()
        charges = []
        for status in reservation.statuses:
            cell = self._budgets.setdefault((status.rule.scope, status.period_key), _BudgetCell())
            hold = cell.holds.pop(reservation.reservation_id, None)
            if hold is not None:
                cell.reserved -= hold[0]
            cell.spent += actual_micro_usd
            charges.append(
                BudgetCharge(status.rule, status.period_key, cell.spent - actual_micro_usd, cell.spent)
            )
        return BudgetSettlement(tuple(charges))

    async def load_spent(self, scope: str, period_key: str, micro_usd: int) -> None:
        cell = self._budgets.setdefault((scope, period_key), _BudgetCell())
        cell.spent = max(cell.spent, micro_usd)
