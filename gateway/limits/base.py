"""Rate limits, per-team concurrency caps and spend budgets; each check charges every rule or none.

Rate limits use GCRA: one number per rule (the theoretical arrival time), O(1) time and memory, exact
across replicas because each check is one Lua script run atomically on Redis's clock. A sliding-window log
is exact too but stores one entry per request (O(n) memory); a fixed window lets 2N through at a boundary.
"N per window" means a burst of at most N, refilled at N per window (how OpenAI describes its limits).
Tokens are charged from the estimate at admission and corrected by `settle`. Budgets admit a request only
while spent + reserved + estimate <= limit, so concurrent requests overshoot only by what is in flight.
Leases and reservations expire, so a crashed replica leaks nothing for long. `MemoryLimiter` is the
single-replica twin of `RedisLimiter` (whose script is gateway/limits/gcra.lua); both pass the same tests.
"""

from __future__ import annotations

import calendar
import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

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


def ceil0(x: float) -> int:
    return math.ceil(x) if x > 0 else 0


def new_id() -> str:
    return secrets.token_hex(8)


def rule_key(rule: LimitRule) -> str:
    """Limit and window are part of the key, so a changed limit or window starts a fresh bucket. `v2`: the
    state is a time in us (before, a count of whole slots), so a replica of the older build never reads it."""
    return f"rl:v2:{rule.kind}:{rule.limit}/{rule.window_ms}:{rule.scope}"


def gcra_now_us(now_ms: float) -> int:
    """GCRA's clock: whole microseconds (exact as doubles until the year 2255, so Lua and Python agree)."""
    return math.floor(now_ms * 1000.0)


def gcra_step(
    rule: LimitRule, stored_tat_us: float | None, cost: int, now_us: int
) -> tuple[float, float, bool]:
    """GCRA in continuous time: (tat, tat after charging `cost`, whether that fits), in microseconds. A charge
    of `cost` units moves the TAT by `cost` emission intervals (window / limit), rounded down to a whole
    microsecond so that a burst of exactly `limit` fits; it fits while the TAT stays within one window of
    now. Float arithmetic on purpose: gcra.lua's doubles give the same numbers."""
    window_us = rule.window_ms * 1000.0
    tat = max(stored_tat_us or 0.0, float(now_us))
    new_tat = tat + math.floor(float(cost) * window_us / rule.limit)
    return tat, new_tat, cost <= rule.limit and new_tat - now_us <= window_us


def rule_status(rule: LimitRule, tat_us: float, now_us: int, fits: bool) -> RuleStatus:
    """What is left of the rule given its TAT: whole units that fit now, and ms until it is full again."""
    window_us = rule.window_ms * 1000.0
    ahead_us = max(0.0, tat_us - now_us)
    remaining = min(rule.limit, max(0, math.floor((window_us - ahead_us) * rule.limit / window_us)))
    return RuleStatus(rule, remaining, ceil0(ahead_us / 1000.0), fits)


def gcra_retry_ms(rule: LimitRule, new_tat_us: float, now_us: int) -> int:
    """How long until a charge that would move the TAT to `new_tat_us` fits (at least 1 ms)."""
    return max(1, ceil0((new_tat_us - rule.window_ms * 1000.0 - now_us) / 1000.0))


def settle_deltas(
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


def budget_retry_ms(statuses: Sequence[BudgetStatus], now_ms: float) -> int | None:
    blocked = [period_end_ms(s.period_key) for s in statuses if not s.fits]
    return ceil0(max(blocked) - now_ms) if blocked else None


def check_cost(cost: int, what: str) -> None:
    if cost < 0:
        raise ValueError(f"{what} must be >= 0, got {cost}")
