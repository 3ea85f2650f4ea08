"""`RedisLimiter`: limits shared by every replica, one atomic EVALSHA of gcra.lua per call.

Redis errors or slowness degrade as `fail_open` says; after a failure Redis rests for `retry_after_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Protocol

from gateway.errors import LimiterUnavailable
from gateway.limits.base import (
    BUDGET_GRACE_MS,
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
    RuleStatus,
    budget_retry_ms,
    check_cost,
    new_id,
    period_end_ms,
    period_key,
    rule_key,
    settle_deltas,
    wall_clock_ms,
)
from gateway.outage import OutageGuard

log = logging.getLogger(__name__)


class RedisClient(Protocol):
    """The two calls we make on a `redis.asyncio.Redis` (a protocol, so `redis` stays an optional install)."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: str) -> Awaitable[Any]: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: str) -> Awaitable[Any]: ...


class RedisLimiter:
    """Limits shared by every replica: one EVALSHA of gcra.lua per call, bounded by `timeout_s`.

    When Redis errs or is slow, admit/acquire/reserve admit unchecked (`degraded`) if `fail_open`, else raise
    `LimiterUnavailable`; settle/release/load always raise it (the caller logs; leases and holds expire).
    After a failure Redis is not called for `retry_after_s`, so an outage costs one timeout, not one per call.
    Budget period keys follow this replica's UTC clock; everything else uses Redis's clock.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "sb:limits:",
        timeout_s: float = 0.05,
        fail_open: bool = False,
        retry_after_s: float = 1.0,
        clock_ms: Callable[[], float] = wall_clock_ms,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        from redis.exceptions import NoScriptError, RedisError  # only a Redis limiter needs the package

        self._client, self.prefix, self.timeout_s, self.fail_open = client, prefix, timeout_s, fail_open
        self._clock_ms = clock_ms
        self._script = resources.files("gateway.limits").joinpath("gcra.lua").read_text()
        self._sha = hashlib.sha1(self._script.encode()).hexdigest()
        self._noscript: type[BaseException] = NoScriptError
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._outage = OutageGuard(
            log,
            "limits",
            retry_after_s=retry_after_s,
            clock=monotonic_s,
            while_down="admitting requests unchecked (fail_open)" if fail_open else "refusing requests",
            when_back="limits enforced again",
        )

    async def _call(
        self, op: str, keys: Sequence[str], args: Sequence[object], now_ms: float | None
    ) -> list[int]:
        if self._outage.skipping:
            raise LimiterUnavailable(self._unavailable("failed moments ago"))
        argv = [op, "" if now_ms is None else repr(float(now_ms)), *(str(a) for a in args)]
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    reply = await self._client.evalsha(self._sha, len(keys), *keys, *argv)
                except self._noscript:  # first call on this server, or after SCRIPT FLUSH / a restart
                    reply = await self._client.eval(self._script, len(keys), *keys, *argv)
        except self._errors as exc:
            self._outage.failed(op, exc)
            raise LimiterUnavailable(self._unavailable(f"failed ({type(exc).__name__})")) from exc
        self._outage.succeeded()
        return [int(x) for x in reply]

    def _unavailable(self, what: str) -> str:
        return (
            f"rate limits cannot be checked: Redis {what} (timeout {self.timeout_s * 1000:g} ms) and limits "
            "fail closed; retry shortly (an admin may set fail_open to admit requests unchecked meanwhile)"
        )

    async def admit(
        self, rules: Sequence[LimitRule], *, cost_tokens: int, now_ms: float | None = None
    ) -> Admission:
        check_cost(cost_tokens, "cost_tokens")
        if not rules:
            return Admission(True, 0, (), cost_tokens)
        keys = [self.prefix + rule_key(r) for r in rules]
        args = [x for r in rules for x in (r.limit, r.window_ms, r.cost(cost_tokens))]
        try:
            reply = await self._call("admit", keys, args, now_ms)
        except LimiterUnavailable:
            if not self.fail_open:
                raise
            return Admission(True, 0, (), cost_tokens, degraded=True)
        rows = [reply[2 + 3 * i : 5 + 3 * i] for i in range(len(rules))]
        statuses = tuple(
            RuleStatus(r, row[0], row[1], bool(row[2])) for r, row in zip(rules, rows, strict=True)
        )
        return Admission(bool(reply[0]), None if reply[1] < 0 else reply[1], statuses, cost_tokens)

    async def settle(
        self,
        admission: Admission,
        actual_tokens: int,
        *,
        count_request: bool = True,
        now_ms: float | None = None,
    ) -> None:
        check_cost(actual_tokens, "actual_tokens")
        deltas = settle_deltas(admission, actual_tokens, count_request)
        if deltas:
            keys = [self.prefix + rule_key(rule) for rule, _ in deltas]
            args = [x for rule, delta in deltas for x in (rule.limit, rule.window_ms, delta)]
            await self._call("settle", keys, args, now_ms)

    async def concurrency_acquire(
        self, scope: str, limit: int, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S, now_ms: float | None = None
    ) -> ConcurrencyGrant:
        lease_id = new_id()
        try:
            reply = await self._call(
                "acquire",
                [self.prefix + "conc:" + scope],
                [limit, lease_id, round(lease_ttl_s * 1000)],
                now_ms,
            )
        except LimiterUnavailable:
            if not self.fail_open:
                raise
            return ConcurrencyGrant(scope, limit, True, 0, degraded=True)
        acquired = bool(reply[0])
        return ConcurrencyGrant(scope, limit, acquired, reply[1], lease_id if acquired else "")

    async def concurrency_release(self, grant: ConcurrencyGrant) -> None:
        if grant.acquired and not grant.degraded:
            await self._call("release", [self.prefix + "conc:" + grant.scope], [grant.lease_id], None)

    def _budget_keys(self, scope: str, key: str) -> list[str]:
        return [f"{self.prefix}budget:{scope}:{key}", f"{self.prefix}budget-holds:{scope}:{key}"]

    async def reserve_budget(
        self,
        rules: Sequence[BudgetRule],
        estimate_micro_usd: int,
        *,
        reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S,
        now_ms: float | None = None,
    ) -> BudgetReservation:
        check_cost(estimate_micro_usd, "estimate_micro_usd")
        wall = self._now(now_ms)
        rid = new_id()
        if not rules:
            return BudgetReservation(True, rid, estimate_micro_usd, ())
        periods = [period_key(rule.period, wall) for rule in rules]
        keys = [k for rule, p in zip(rules, periods, strict=True) for k in self._budget_keys(rule.scope, p)]
        args: list[object] = [estimate_micro_usd, rid, round(reservation_ttl_s * 1000)]
        args += [
            x
            for rule, p in zip(rules, periods, strict=True)
            for x in (rule.limit_micro_usd, _keep_ms(p, wall))
        ]
        try:
            reply = await self._call("reserve", keys, args, now_ms)
        except LimiterUnavailable:
            if not self.fail_open:
                raise
            return BudgetReservation(True, rid, estimate_micro_usd, (), degraded=True)
        statuses = tuple(
            BudgetStatus(rule, p, reply[1 + 3 * i], reply[2 + 3 * i], bool(reply[3 + 3 * i]))
            for i, (rule, p) in enumerate(zip(rules, periods, strict=True))
        )
        return BudgetReservation(
            bool(reply[0]), rid, estimate_micro_usd, statuses, budget_retry_ms(statuses, wall)
        )

    async def settle_budget(
        self, reservation: BudgetReservation, actual_micro_usd: int, *, now_ms: float | None = None
    ) -> BudgetSettlement:
        check_cost(actual_micro_usd, "actual_micro_usd")
        if not reservation.allowed or reservation.degraded or not reservation.statuses:
            return BudgetSettlement()
        wall = self._now(now_ms)
        statuses = reservation.statuses
        keys = [k for s in statuses for k in self._budget_keys(s.rule.scope, s.period_key)]
        args: list[object] = [actual_micro_usd, reservation.reservation_id]
        args += [_keep_ms(s.period_key, wall) for s in statuses]
        reply = await self._call("settle_budget", keys, args, now_ms)
        return BudgetSettlement(
            tuple(
                BudgetCharge(s.rule, s.period_key, reply[2 * i], reply[2 * i + 1])
                for i, s in enumerate(statuses)
            )
        )

    async def load_spent(self, scope: str, period_key: str, micro_usd: int) -> None:
        keys = self._budget_keys(scope, period_key)[:1]
        await self._call("load_spent", keys, [micro_usd, _keep_ms(period_key, self._clock_ms())], None)

    def _now(self, now_ms: float | None) -> float:
        return self._clock_ms() if now_ms is None else now_ms


def _keep_ms(key: str, now_ms: float) -> int:
    """How long a budget counter lives: to the end of its period plus a grace for late settlements."""
    return max(1, round(period_end_ms(key) + BUDGET_GRACE_MS - now_ms))
