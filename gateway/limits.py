"""Rate limits, per-team concurrency caps and spend budgets; each check charges every rule or none.

Rate limits use GCRA: one number per rule (the theoretical arrival time), O(1) time and memory, exact
across replicas because each check is one Lua script run atomically on Redis's clock. A sliding-window log
is exact too but stores one entry per request (O(n) memory); a fixed window lets 2N through at a boundary.
"N per window" means a burst of at most N, refilled at N per window (how OpenAI describes its limits).
Tokens are charged from the estimate at admission and corrected by `settle`. Budgets admit a request only
while spent + reserved + estimate <= limit, so concurrent requests overshoot only by what is in flight.
Leases and reservations expire, so a crashed replica leaks nothing for long. `MemoryLimiter` is the
single-replica twin of `RedisLimiter` (whose script is gateway/limits.lua); both pass the same tests.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from importlib import resources
from typing import Any, Protocol

from gateway.errors import LimiterUnavailable
from gateway.outage import OutageGuard

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 600.0  # a concurrency slot outlives any request, then frees itself
DEFAULT_RESERVATION_TTL_S = 900.0  # an unsettled budget reservation is released after this
BUDGET_GRACE_MS = 7 * 86_400_000  # budget counters outlive their period, so late settlements still land


def wall_clock_ms() -> float:
    return time.time() * 1000.0


class LimitKind(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class LimitRule:
    scope: str  # "key:<id>", "team:<name>" or "team_model:<team>:<model>"
    kind: LimitKind
    limit: int
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window_ms < 1:
            raise ValueError(f"rate limit `{self.scope}` {self.kind}: needs limit >= 1 and window_s >= 0.001")

    @property
    def window_ms(self) -> int:
        return round(self.window_s * 1000)

    def cost(self, cost_tokens: int) -> int:
        return 1 if self.kind is LimitKind.REQUESTS else cost_tokens


@dataclass(frozen=True, slots=True)
class RuleStatus:
    rule: LimitRule
    remaining: int
    reset_ms: int  # until the bucket is full again (OpenAI's x-ratelimit-reset-*)
    fits: bool


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    retry_after_ms: int | None  # 0 when allowed; None when the cost exceeds a limit and can never fit
    statuses: tuple[RuleStatus, ...]
    cost_tokens: int
    degraded: bool = False  # admitted without a check (store down, fail-open); nothing was charged

    @property
    def retry_after_s(self) -> float | None:
        return None if self.retry_after_ms is None else self.retry_after_ms / 1000

    @property
    def blocked_by(self) -> tuple[LimitRule, ...]:
        return tuple(s.rule for s in self.statuses if not s.fits)


@dataclass(frozen=True, slots=True)
class ConcurrencyGrant:
    scope: str
    limit: int
    acquired: bool
    in_flight: int  # after this call
    lease_id: str = ""
    degraded: bool = False


class BudgetPeriod(StrEnum):
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class BudgetRule:
    scope: str  # "key:<id>" or "team:<name>"
    period: BudgetPeriod
    limit_micro_usd: int
    soft_limit_micro_usd: int | None = None


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    rule: BudgetRule
    period_key: str  # "2026-11-05" (day) or "2026-11" (month), UTC
    spent_micro_usd: int
    reserved_micro_usd: int  # in flight, including this reservation when it was allowed
    fits: bool

    @property
    def over_soft_limit(self) -> bool:
        soft = self.rule.soft_limit_micro_usd
        return soft is not None and self.spent_micro_usd + self.reserved_micro_usd >= soft


@dataclass(frozen=True, slots=True)
class BudgetReservation:
    allowed: bool
    reservation_id: str
    estimate_micro_usd: int
    statuses: tuple[BudgetStatus, ...]
    retry_after_ms: int | None = None  # when denied: until the latest blocking period ends
    degraded: bool = False

    @property
    def blocked_by(self) -> tuple[BudgetRule, ...]:
        return tuple(s.rule for s in self.statuses if not s.fits)


@dataclass(frozen=True, slots=True)
class BudgetCharge:
    rule: BudgetRule
    period_key: str
    spent_before_micro_usd: int
    spent_after_micro_usd: int

    @property
    def crossed_soft_limit(self) -> bool:
        soft = self.rule.soft_limit_micro_usd
        return soft is not None and self.spent_before_micro_usd < soft <= self.spent_after_micro_usd


@dataclass(frozen=True, slots=True)
class BudgetSettlement:
    charges: tuple[BudgetCharge, ...] = ()

    @property
    def soft_crossed(self) -> tuple[BudgetRule, ...]:
        """Rules whose soft limit this settlement crossed: log once and bump a metric for each."""
        return tuple(c.rule for c in self.charges if c.crossed_soft_limit)


class Limiter(Protocol):
    """Rate limits and the per-team concurrency cap. `now_ms=None` means the store's own clock."""

    async def admit(
        self, rules: Sequence[LimitRule], *, cost_tokens: int, now_ms: float | None = None
    ) -> Admission: ...

    async def settle(
        self,
        admission: Admission,
        actual_tokens: int,
        *,
        count_request: bool = True,
        now_ms: float | None = None,
    ) -> None: ...

    async def concurrency_acquire(
        self, scope: str, limit: int, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S, now_ms: float | None = None
    ) -> ConcurrencyGrant: ...

    async def concurrency_release(self, grant: ConcurrencyGrant) -> None: ...


class Budgets(Protocol):
    """Spend limits per period: reserve the estimate before dispatch, settle the actual cost after."""

    async def reserve_budget(
        self,
        rules: Sequence[BudgetRule],
        estimate_micro_usd: int,
        *,
        reservation_ttl_s: float = DEFAULT_RESERVATION_TTL_S,
        now_ms: float | None = None,
    ) -> BudgetReservation: ...

    async def settle_budget(
        self, reservation: BudgetReservation, actual_micro_usd: int, *, now_ms: float | None = None
    ) -> BudgetSettlement: ...

    async def load_spent(self, scope: str, period_key: str, micro_usd: int) -> None: ...


# ---- periods and headers -------------------------------------------------------------------------------


def period_key(period: BudgetPeriod, now_ms: float) -> str:
    day = datetime.fromtimestamp(now_ms / 1000, UTC)
    return day.strftime("%Y-%m-%d" if period is BudgetPeriod.DAY else "%Y-%m")


def period_end_ms(key: str) -> int:
    """The first millisecond after the period named by `key` ("2026-11-05" or "2026-11")."""
    parts = [int(p) for p in key.split("-")]
    if len(parts) == 3:
        return (calendar.timegm((parts[0], parts[1], parts[2], 0, 0, 0)) + 86_400) * 1000
    year, month = (parts[0] + 1, 1) if parts[1] == 12 else (parts[0], parts[1] + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


def format_duration(ms: int) -> str:
    """OpenAI's reset format (Go durations): "0s", "20ms", "1.5s", "6m0s", "1h2m3s"."""
    if ms < 1000:
        return f"{ms}ms" if ms > 0 else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


def retry_after_header(ms: int | None) -> str:
    """Retry-After in whole seconds, rounded up (RFC 9110); a request that can never fit gets a minute."""
    return "60" if ms is None else str(max(1, math.ceil(ms / 1000)))


def ratelimit_headers(admission: Admission) -> list[tuple[str, str]]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} from the tightest rule of each kind."""
    headers: list[tuple[str, str]] = []
    for kind in LimitKind:
        statuses = [s for s in admission.statuses if s.rule.kind is kind]
        if not statuses:
            continue
        tight = min(statuses, key=lambda s: (s.remaining, -s.reset_ms))
        headers += [
            (f"x-ratelimit-limit-{kind}", str(tight.rule.limit)),
            (f"x-ratelimit-remaining-{kind}", str(tight.remaining)),
            (f"x-ratelimit-reset-{kind}", format_duration(tight.reset_ms)),
        ]
    return headers


def _ceil0(x: float) -> int:
    return math.ceil(x) if x > 0 else 0


def _new_id() -> str:
    return secrets.token_hex(8)


def _rule_key(rule: LimitRule) -> str:
    """The slot length is part of the key, so a changed limit or window starts a fresh bucket."""
    return f"rl:{rule.kind}:{rule.limit}/{rule.window_ms}:{rule.scope}"


def _now_slot(rule: LimitRule, now_ms: float) -> int:
    """The slot `now_ms` falls in. Multiplying first keeps a slot boundary exact; `now / slot_ms` can round
    it down by one slot (1.7e12 ms at 159 per second), which denied a request with Retry-After 0."""
    return math.floor(now_ms * rule.limit / rule.window_ms)


def _rule_status(rule: LimitRule, tat: int, now_ms: float, fits: bool) -> RuleStatus:
    slot_ms = rule.window_ms / rule.limit
    used = tat - _now_slot(rule, now_ms)
    remaining = min(rule.limit, max(0, rule.limit - used))
    return RuleStatus(rule, remaining, _ceil0(tat * slot_ms - now_ms), fits)


def _settle_deltas(
    admission: Admission, actual_tokens: int, count_request: bool
) -> list[tuple[LimitRule, int]]:
    if not admission.allowed or admission.degraded:
        return []
    deltas = []
    for status in admission.statuses:
        tokens = status.rule.kind is LimitKind.TOKENS
        delta = actual_tokens - admission.cost_tokens if tokens else (0 if count_request else -1)
        if delta:
            deltas.append((status.rule, delta))
    return deltas


def _budget_retry_ms(statuses: Sequence[BudgetStatus], now_ms: float) -> int | None:
    blocked = [period_end_ms(s.period_key) for s in statuses if not s.fits]
    return _ceil0(max(blocked) - now_ms) if blocked else None


def _check_cost(cost: int, what: str) -> None:
    if cost < 0:
        raise ValueError(f"{what} must be >= 0, got {cost}")


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
    """In-process twin of `RedisLimiter` for a single replica: the same arithmetic as gateway/limits.lua.
    No call awaits anything, so each is atomic on the event loop."""

    def __init__(self, *, clock_ms: Callable[[], float] = wall_clock_ms) -> None:
        self._clock_ms = clock_ms
        self._tats: dict[str, int] = {}  # GCRA state in slots, keyed like Redis; see limits.lua
        self._leases: dict[str, dict[str, float]] = {}  # scope -> lease id -> expires_ms
        self._budgets: dict[tuple[str, str], _BudgetCell] = {}  # (scope, period key)

    def _now(self, now_ms: float | None) -> float:
        return self._clock_ms() if now_ms is None else now_ms

    async def admit(
        self, rules: Sequence[LimitRule], *, cost_tokens: int, now_ms: float | None = None
    ) -> Admission:
        _check_cost(cost_tokens, "cost_tokens")
        now = self._now(now_ms)
        allowed = True
        retry_ms: int | None = 0
        plans: list[tuple[LimitRule, int, int, bool]] = []
        for rule in rules:
            now_slot = _now_slot(rule, now)
            tat = max(self._tats.get(_rule_key(rule), 0), now_slot)
            cost = rule.cost(cost_tokens)
            fits = cost <= rule.limit and tat + cost - now_slot <= rule.limit
            if cost > rule.limit:
                allowed, retry_ms = False, None
            elif not fits:
                allowed = False
                if retry_ms is not None:
                    denied_for = (tat + cost - rule.limit) * rule.window_ms / rule.limit - now
                    retry_ms = max(retry_ms, 1, _ceil0(denied_for))
            plans.append((rule, tat, tat + cost, fits))
        statuses = []
        for rule, tat, new_tat, fits in plans:
            if allowed:
                self._tats[_rule_key(rule)] = tat = new_tat
            statuses.append(_rule_status(rule, tat, now, fits))
        return Admission(allowed, retry_ms, tuple(statuses), cost_tokens)

    async def settle(
        self,
        admission: Admission,
        actual_tokens: int,
        *,
        count_request: bool = True,
        now_ms: float | None = None,
    ) -> None:
        _check_cost(actual_tokens, "actual_tokens")
        now = self._now(now_ms)
        for rule, delta in _settle_deltas(admission, actual_tokens, count_request):
            key = _rule_key(rule)
            now_slot = _now_slot(rule, now)
            tat = max(self._tats.get(key, 0), now_slot) + delta
            if tat > now_slot:
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
        lease_id = _new_id()
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
        _check_cost(estimate_micro_usd, "estimate_micro_usd")
        now = self._now(now_ms)
        rid = _new_id()
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
        return BudgetReservation(allowed, rid, estimate_micro_usd, statuses, _budget_retry_ms(statuses, now))

    async def settle_budget(
        self, reservation: BudgetReservation, actual_micro_usd: int, *, now_ms: float | None = None
    ) -> BudgetSettlement:
        _check_cost(actual_micro_usd, "actual_micro_usd")
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


class RedisClient(Protocol):
    """The two calls we make on a `redis.asyncio.Redis` (a protocol, so `redis` stays an optional install)."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: str) -> Awaitable[Any]: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: str) -> Awaitable[Any]: ...


class RedisLimiter:
    """Limits shared by every replica: one EVALSHA of gateway/limits.lua per call, bounded by `timeout_s`.

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
        self._script = resources.files("gateway").joinpath("limits.lua").read_text()
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
        _check_cost(cost_tokens, "cost_tokens")
        if not rules:
            return Admission(True, 0, (), cost_tokens)
        keys = [self.prefix + _rule_key(r) for r in rules]
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
        _check_cost(actual_tokens, "actual_tokens")
        deltas = _settle_deltas(admission, actual_tokens, count_request)
        if deltas:
            keys = [self.prefix + _rule_key(rule) for rule, _ in deltas]
            args = [x for rule, delta in deltas for x in (rule.limit, rule.window_ms, delta)]
            await self._call("settle", keys, args, now_ms)

    async def concurrency_acquire(
        self, scope: str, limit: int, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S, now_ms: float | None = None
    ) -> ConcurrencyGrant:
        lease_id = _new_id()
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
        _check_cost(estimate_micro_usd, "estimate_micro_usd")
        wall = self._now(now_ms)
        rid = _new_id()
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
            bool(reply[0]), rid, estimate_micro_usd, statuses, _budget_retry_ms(statuses, wall)
        )

    async def settle_budget(
        self, reservation: BudgetReservation, actual_micro_usd: int, *, now_ms: float | None = None
    ) -> BudgetSettlement:
        _check_cost(actual_micro_usd, "actual_micro_usd")
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
