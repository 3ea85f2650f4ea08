"""Admission of one chat request: the team's concurrency cap, rate limits, spend budgets, then settlement.

`admit` takes a concurrency slot and charges every rate rule (one request, estimated tokens) in one atomic
check; `reserve` holds the estimated cost against every budget (a cache hit skips it). `settle` charges the
real tokens and cost and frees the slot, off the response path; it never raises. Every step that refuses
undoes the steps before it. Budget counters are rebuilt from the SQL ledger (the source of truth) the first
time this process meets a (scope, period) and again every `limits.budget_sync_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from gateway.background import TaskSet
from gateway.config import Config, TeamConfig
from gateway.errors import BudgetExceeded, LimiterUnavailable, RateLimited
from gateway.limits.base import (
    Admission,
    BudgetPeriod,
    BudgetReservation,
    BudgetRule,
    Budgets,
    ConcurrencyGrant,
    Limiter,
    LimitKind,
    LimitRule,
    period_end_ms,
    period_key,
    ratelimit_headers,
    wall_clock_ms,
)
from gateway.records import KeyIdentity

log = logging.getLogger(__name__)

_LOAD_TIMEOUT_S = 2.0  # a first-time budget rebuild waits this long for SQL, then goes on from the counter
_LOAD_RETRY_S = 5.0  # after a failed rebuild
_RELEASE_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # then the lease expires it


class QuotaStore(Limiter, Budgets, Protocol):
    """`MemoryLimiter` (one replica) or `RedisLimiter` (shared)."""


SpendReader = Callable[[str, str], int]  # (scope, period key) -> micro-USD the SQL ledger holds


@dataclass(frozen=True, slots=True)
class RequestRules:
    team: str
    model: str
    rate: tuple[LimitRule, ...]
    concurrency: int | None  # the team's cap on requests in flight
    budgets: tuple[BudgetRule, ...]


@dataclass(slots=True)
class Ticket:
    """What one admitted request holds until it is settled."""

    rules: RequestRules
    grant: ConcurrencyGrant | None = None
    admission: Admission | None = None
    reservation: BudgetReservation | None = None
    settled: bool = False

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        if self.admission is None:
            return ()
        return tuple((k.encode(), v.encode()) for k, v in ratelimit_headers(self.admission))


def micro_usd(usd: Decimal) -> int:
    return int((usd * 1_000_000).to_integral_value(rounding="ROUND_HALF_UP"))


def _rate_rules(
    team: str, cfg: TeamConfig | None, identity: KeyIdentity, model: str, window_s: float
) -> tuple[LimitRule, ...]:
    limits = cfg.limits if cfg is not None else None
    rules: list[LimitRule] = []

    def add(scope: str, kind: LimitKind, limit: int | None) -> None:
        if limit is not None:
            rules.append(LimitRule(scope, kind, limit, window_s))

    key_requests = identity.limit_requests or (limits.key_requests if limits else None)
    key_tokens = identity.limit_tokens or (limits.key_tokens if limits else None)
    add(f"key:{identity.key_id}", LimitKind.REQUESTS, key_requests)
    add(f"key:{identity.key_id}", LimitKind.TOKENS, key_tokens)
    if limits is not None:
        add(f"team:{team}", LimitKind.REQUESTS, limits.requests)
        add(f"team:{team}", LimitKind.TOKENS, limits.tokens)
        per_model = limits.models.get(model)
        if per_model is not None:
            add(f"team_model:{team}:{model}", LimitKind.REQUESTS, per_model.requests)
            add(f"team_model:{team}:{model}", LimitKind.TOKENS, per_model.tokens)
    return tuple(rules)


def _budget_rules(team: str, cfg: TeamConfig | None, identity: KeyIdentity) -> tuple[BudgetRule, ...]:
    rules = [
        BudgetRule(
            f"team:{team}",
            BudgetPeriod(b.period),
            micro_usd(b.usd),
            None if b.soft_usd is None else micro_usd(b.soft_usd),
        )
        for b in (cfg.budgets if cfg is not None else ())
    ]
    if identity.budget is not None:
        b = identity.budget
        period = BudgetPeriod(b.period)
        rules.append(BudgetRule(f"key:{identity.key_id}", period, b.limit_micro_usd, b.soft_limit_micro_usd))
    return tuple(rules)


def _rule_setting(rule: LimitRule, team: str) -> str:
    """The config setting that sets a rate rule, for error messages."""
    kind = str(rule.kind)
    if rule.scope.startswith("key:"):
        return f"teams.{team}.limits.key_{kind}, or the key's own limit"
    if rule.scope.startswith("team_model:"):
        return f"teams.{team}.limits.models.{rule.scope.split(':', 2)[2]}.{kind}"
    return f"teams.{team}.limits.{kind}"


def _describe(rule: LimitRule) -> str:
    who = rule.scope.replace("team_model:", "team+model ").replace(":", " `", 1) + "`"
    return f"{who}: {rule.limit} {rule.kind} per {rule.window_s:g} s"


def _usd(micro: int) -> str:
    return f"${Decimal(micro).scaleb(-6).quantize(Decimal('0.000001')).normalize():f}"


class Gate:
    """The limits step of the pipeline; owned by `Services`, event-loop use only."""

    def __init__(
        self,
        store: QuotaStore,
        config: Config,
        *,
        spend: SpendReader | None = None,
        on_soft_limit: Callable[[BudgetRule, str, int], None] | None = None,
        monotonic_s: Callable[[], float] = time.monotonic,
        clock_ms: Callable[[], float] = wall_clock_ms,
    ) -> None:
        self.store, self.config = store, config
        self._spend, self._on_soft_limit = spend, on_soft_limit
        self._monotonic_s, self._clock_ms = monotonic_s, clock_ms
        self._rules: dict[tuple[object, ...], RequestRules] = {}
        self._loaded: dict[tuple[str, str], float] = {}  # (scope, period) -> when rebuilt from SQL
        self._tasks = TaskSet()
        self._retries = TaskSet()  # dropped at shutdown: leases expire on their own

    # ---- rules ------------------------------------------------------------------------------------------

    def rules(self, identity: KeyIdentity, model: str) -> RequestRules:
        cache_key = (identity.team, identity.key_id, identity.limit_requests, identity.limit_tokens,
                     identity.budget, model)  # fmt: skip
        found = self._rules.get(cache_key)
        if found is None:
            if len(self._rules) > 10_000:
                self._rules.clear()
            team = identity.team
            cfg = self.config.teams.get(team)
            found = RequestRules(
                team=team,
                model=model,
                rate=_rate_rules(team, cfg, identity, model, self.config.limits.window_s),
                concurrency=cfg.limits.max_concurrent if cfg is not None else None,
                budgets=_budget_rules(team, cfg, identity),
            )
            self._rules[cache_key] = found
        return found

    # ---- admission --------------------------------------------------------------------------------------

    async def admit(self, identity: KeyIdentity, model: str, estimated_tokens: int) -> Ticket:
        """Concurrency slot, then every rate rule at once. The x-ratelimit-* headers are `ticket.headers()`,
        and travel on the RateLimited error when refused. Raises RateLimited or LimiterUnavailable."""
        rules = self.rules(identity, model)
        ticket = Ticket(rules)
        if rules.concurrency is not None:
            grant = await self.store.concurrency_acquire(f"team:{rules.team}", rules.concurrency)
            if not grant.acquired:
                raise RateLimited(
                    f"team `{rules.team}` already has {grant.in_flight} requests in flight, its limit "
                    f"(config: teams.{rules.team}.limits.max_concurrent); retry when one finishes",
                    retry_after_s=1.0,
                )
            ticket.grant = grant
        if rules.rate:
            try:
                admission = await self.store.admit(rules.rate, cost_tokens=estimated_tokens)
            except BaseException:
                # Whatever went wrong, the slot taken above is not this request's to keep.
                await asyncio.shield(self._release(ticket))
                raise
            ticket.admission = admission
            if not admission.allowed:
                await self._release(ticket)
                refused = self._rate_error(rules, admission, estimated_tokens)
                refused.headers = ticket.headers()
                raise refused
        return ticket

    def _rate_error(self, rules: RequestRules, admission: Admission, estimated_tokens: int) -> RateLimited:
        blocked = admission.blocked_by
        settings = "; ".join(sorted({_rule_setting(r, rules.team) for r in blocked}))
        what = ", ".join(_describe(r) for r in blocked)
        if admission.retry_after_ms is None:
            message = (
                f"request needs about {estimated_tokens} tokens, more than a whole window allows ({what}); "
                f"send a smaller max_tokens or shorter messages, or raise the limit (config: {settings})"
            )
        else:
            message = f"rate limit reached ({what}); retry after the Retry-After delay (config: {settings})"
        return RateLimited(message, retry_after_s=admission.retry_after_s or 60.0)

    async def reserve(self, ticket: Ticket, estimated_micro_usd: int) -> None:
        """Hold the estimated cost against every budget. Raises BudgetExceeded or LimiterUnavailable."""
        rules = ticket.rules.budgets
        if not rules:
            return
        await self._rebuild(rules)
        try:
            reservation = await self.store.reserve_budget(rules, estimated_micro_usd)
        except LimiterUnavailable:
            if self.config.limits.budgets_fail_open:
                return
            await self._release(ticket)
            raise
        if not reservation.allowed:
            await self._release(ticket)
            raise self._budget_error(ticket.rules, reservation, estimated_micro_usd)
        ticket.reservation = reservation

    def _budget_error(
        self, rules: RequestRules, reservation: BudgetReservation, estimated_micro_usd: int
    ) -> BudgetExceeded:
        status = next(s for s in reservation.statuses if not s.fits)
        rule = status.rule
        scope, _, name = rule.scope.partition(":")
        setting = f"teams.{rules.team}.budgets" if scope == "team" else "the key's budget (admin API or CLI)"
        period = "daily" if rule.period is BudgetPeriod.DAY else "monthly"
        resets = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(period_end_ms(status.period_key) / 1000))
        used = _usd(status.spent_micro_usd + status.reserved_micro_usd)
        message = (
            f"{scope} `{name}` has used {used} of its {_usd(rule.limit_micro_usd)} {period} budget (counting "
            f"requests in flight; this one needs about {_usd(estimated_micro_usd)}); it resets at {resets} "
            f"(config: {setting})"
        )
        return BudgetExceeded(message, retry_after_s=(reservation.retry_after_ms or 60_000) / 1000)

    # ---- budgets rebuilt from SQL -----------------------------------------------------------------------

    async def _rebuild(self, rules: Sequence[BudgetRule]) -> None:
        if self._spend is None:
            return
        now_s, now_ms = self._monotonic_s(), self._clock_ms()
        for rule in rules:
            cell = (rule.scope, period_key(rule.period, now_ms))
            loaded_s = self._loaded.get(cell)
            if loaded_s is None:
                self._loaded[cell] = now_s  # concurrent first requests do not all query
                await self._load(cell)  # first sight: the counter must hold the ledger's spend first
            elif now_s - loaded_s >= self.config.limits.budget_sync_s:
                self._loaded[cell] = now_s
                self._tasks.spawn(self._load(cell))

    async def _load(self, cell: tuple[str, str]) -> None:
        assert self._spend is not None
        try:
            async with asyncio.timeout(_LOAD_TIMEOUT_S):
                spent = await asyncio.to_thread(self._spend, *cell)
            await self.store.load_spent(cell[0], cell[1], spent)
        except (TimeoutError, LimiterUnavailable, OSError, SQLAlchemyError) as exc:
            log.warning("budget %s %s: not rebuilt from the ledger (%s); retrying", *cell, type(exc).__name__)
            self._loaded[cell] = self._monotonic_s() - self.config.limits.budget_sync_s + _LOAD_RETRY_S

    async def preload(self) -> None:
        """At start-up: rebuild every configured team budget for the current period."""
        rules = [
            r for team in self.config.teams for r in _budget_rules(team, self.config.teams[team], _NO_KEY)
        ]
        await self._rebuild(rules)

    # ---- settlement -------------------------------------------------------------------------------------

    def settle_soon(self, ticket: Ticket, *, tokens: int, cost_micro_usd: int) -> None:
        """Settle off the response path (the ledger row is already queued)."""
        if ticket.settled:
            return
        ticket.settled = True
        if ticket.admission is None and ticket.reservation is None and ticket.grant is None:
            return  # it holds nothing (no limits or budgets apply): no task to settle nothing
        self._tasks.spawn(self._settle(ticket, tokens, cost_micro_usd))

    async def _settle(self, ticket: Ticket, tokens: int, cost_micro_usd: int) -> None:
        try:
            if ticket.admission is not None:
                await self.store.settle(ticket.admission, tokens)
            if ticket.reservation is not None:
                settlement = await self.store.settle_budget(ticket.reservation, cost_micro_usd)
                for charge in settlement.charges:
                    if charge.crossed_soft_limit:
                        self._soft_limit(charge.rule, charge.period_key, charge.spent_after_micro_usd)
        except LimiterUnavailable as exc:
            log.warning("settling request usage failed (%s); held amounts expire on their own", exc)
        finally:
            await self._release(ticket)

    def _soft_limit(self, rule: BudgetRule, period: str, spent_micro_usd: int) -> None:
        log.warning(
            "budget alert: %s spent %s in %s, past its soft limit %s (hard limit %s)",
            rule.scope,
            _usd(spent_micro_usd),
            period,
            _usd(rule.soft_limit_micro_usd or 0),
            _usd(rule.limit_micro_usd),
        )
        if self._on_soft_limit is not None:
            self._on_soft_limit(rule, period, spent_micro_usd)

    async def _release(self, ticket: Ticket) -> None:
        grant, ticket.grant = ticket.grant, None
        if grant is not None:
            try:
                await self.store.concurrency_release(grant)
            except LimiterUnavailable:
                # A slot left held would count against the team until its lease expires: keep trying.
                self._retries.spawn(self._release_later(grant, ticket.rules.team))

    async def _release_later(self, grant: ConcurrencyGrant, team: str) -> None:
        for delay_s in _RELEASE_RETRY_S:
            await asyncio.sleep(delay_s)
            try:
                await self.store.concurrency_release(grant)
                return
            except LimiterUnavailable:
                continue
        log.warning("a concurrency slot of team %s could not be released; its lease expires it", team)

    async def aclose(self) -> None:
        """Finish pending settlements (shutdown)."""
        await self._tasks.aclose()
        await self._retries.aclose(cancel=True)


_NO_KEY = KeyIdentity(key_id="", team="", display_prefix="", models=None, expires_at=None, revoked=False)
