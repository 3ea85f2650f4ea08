"""The savings report's batch line: what `/v1/batches` items cost against the same tokens at interactive
cloud prices.

Actual cost, as the savings rows value capacity: items on self-hosted backends with `usd_per_hour` cost their
share of the backend's busy time by tokens (rolled-up hours only), every other item what the ledger recorded
(batch prices on cloud deployments, occupancy on edge nodes). Interactive cost: an item served by a cloud
deployment at that deployment's regular prices; an item on owned or edge capacity at the cheapest cloud
deployment of its model that its team's privacy floor allows; with none, at the reference price. Cache hits
are left out (they cost nothing either way). One line per batch when the query groups by batch, else one
line for every batch item in the window.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Connection

from gateway.config import CloudBackendConfig, Config, EdgeBackendConfig, TeamConfig
from gateway.reports import sql
from gateway.reports.cache_hits import cache_hit_sums
from gateway.reports.costs import ListPrice, busy_cost_micro_usd, busy_ms_by
from gateway.reports.model import ANY_BATCH, INTERACTIVE, Dimension, ReportQuery
from gateway.reports.query import Plan, make_plan, no_progress, read_state, report_on
from routing.decision import Price
from routing.privacy import PrivacyTier

_DIMS = (Dimension.TEAM, Dimension.BATCH, Dimension.MODEL, Dimension.BACKEND)
_CLOUD_TIERS = (PrivacyTier.EXTERNAL, PrivacyTier.EXTERNAL_ZDR)


@dataclass(frozen=True, slots=True)
class BatchSavingsRow:
    group: tuple[str, ...]  # (batch id,) when the query groups by batch; () for all batch items
    requests: int
    prompt_tokens: int
    completion_tokens: int
    busy_ms: float  # self-hosted busy time charged to these items
    actual_micro_usd: int
    interactive_micro_usd: int  # the same tokens at interactive cloud prices

    @property
    def saved_micro_usd(self) -> int:
        return self.interactive_micro_usd - self.actual_micro_usd


@dataclass(frozen=True, slots=True)
class _Traffic:
    team: str
    batch: str
    model: str
    backend: str
    requests: int
    prompt: int
    completion: int
    cost: int  # as the ledger recorded it


def batch_savings(
    conn: Connection,
    config: Config,
    query: ReportQuery,
    hours: tuple[dt.datetime | None, dt.datetime | None],
    reference: Price,
    list_price: ListPrice,
    plan: Plan | None = None,
) -> tuple[tuple[BatchSavingsRow, ...], BatchSavingsRow]:
    """Batch lines (per batch when `query` groups by batch) and their total, over the whole `hours`; `plan`:
    the savings traffic's (the same window and source, so the same reads), else made here."""
    if query.batch == INTERACTIVE:
        return (), _total([])
    scoped = dataclasses.replace(
        query, group_by=_DIMS, since=hours[0], until=hours[1], batch=query.batch or ANY_BATCH
    )
    traffic = _served(conn, scoped, plan)
    hosted = {
        name: b.usd_per_hour
        for name, b in config.backends.items()
        if b.kind == "openai" and b.usd_per_hour is not None
    }
    used = sorted({t.backend for t in traffic} & hosted.keys())
    busy = busy_ms_by(conn, ("batch_id",), hours, used, scoped) if used else {}
    prices = _InteractivePrices(config, reference, list_price)
    per_batch: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for t in traffic:
        acc = per_batch[t.batch]
        acc[0] += t.requests
        acc[1] += t.prompt
        acc[2] += t.completion
        acc[3] += t.cost if t.backend not in hosted else 0
        acc[4] += prices.price(t).cost_micro_usd(t.prompt, t.completion)
    busy_of: dict[str, tuple[float, int]] = defaultdict(lambda: (0.0, 0))  # batch -> busy ms, its cost
    for (batch_id, backend), busy_ms in busy.items():
        had_ms, had_cost = busy_of[batch_id or ""]
        cost = busy_cost_micro_usd(busy_ms, hosted[backend or ""])
        busy_of[batch_id or ""] = (had_ms + busy_ms, had_cost + cost)
    lines = []
    for batch, (requests, prompt, completion, cost, interactive) in sorted(per_batch.items()):
        busy_ms, busy_cost = busy_of.get(batch, (0.0, 0))
        lines.append(
            BatchSavingsRow((batch,), requests, prompt, completion, busy_ms, cost + busy_cost, interactive)
        )
    total = _total(lines)
    return (tuple(lines) if Dimension.BATCH in query.group_by else ()), total


def _served(conn: Connection, scoped: ReportQuery, plan: Plan | None) -> list[_Traffic]:
    """Batch traffic per (team, batch, model, backend), less its cache hits."""
    plan = make_plan(conn, scoped, read_state(conn)) if plan is None else plan
    report = report_on(conn, scoped, no_progress, plan)
    cached = cache_hit_sums(conn, scoped, plan)  # from the rollups, as the traffic
    out = []
    for row in report.rows:
        team, batch, model, backend = (v or "" for v in row.group)
        c = cached.get((team, batch, model, backend), [0] * len(sql.SUM_FIELDS))
        if row.requests > c[0]:
            prompt, completion = row.prompt_tokens - c[3], row.completion_tokens - c[4]
            cost = row.cost_micro_usd - c[5]
            out.append(_Traffic(team, batch, model, backend, row.requests - c[0], prompt, completion, cost))
    return out


class _InteractivePrices:
    """The interactive cloud price each group of batch items is compared with (see the module doc)."""

    def __init__(self, config: Config, reference: Price, list_price: ListPrice) -> None:
        self._config, self._list_price, self._reference = config, list_price, reference
        self._cache: dict[tuple[str, str], Price | None] = {}

    def price(self, t: _Traffic) -> Price:
        model = self._config.models.get(t.model)
        if model is None:
            return self._reference
        if self._is_cloud(t.backend):
            own = self._deployment_price(t.model, t.backend)
            if own is not None:
                return own
        team = self._config.teams.get(t.team, TeamConfig())
        options = [
            p
            for dep in model.all_deployments()
            if self._is_cloud(dep.backend)
            and team.privacy_floor.allows(self._tier(dep.backend))
            and (p := self._deployment_price(t.model, dep.backend)) is not None
        ]
        if not options:
            return self._reference
        return min(options, key=lambda p: p.cost_micro_usd(t.prompt, t.completion))

    def _is_cloud(self, backend: str) -> bool:
        cfg = self._config.backends.get(backend)
        if cfg is None or isinstance(cfg, EdgeBackendConfig):
            return False
        return isinstance(cfg, CloudBackendConfig) or cfg.tier in _CLOUD_TIERS

    def _tier(self, backend: str) -> PrivacyTier:
        return self._config.backends[backend].tier

    def _deployment_price(self, model: str, backend: str) -> Price | None:
        """The regular (interactive) price of `model` on `backend`: config, else the provider's list price."""
        key = (model, backend)
        if key not in self._cache:
            self._cache[key] = self._look_up(model, backend)
        return self._cache[key]

    def _look_up(self, model: str, backend: str) -> Price | None:
        for dep in self._config.models[model].all_deployments():
            if dep.backend != backend:
                continue
            prices: list[Decimal | None] = [dep.input_usd_per_mtok, dep.output_usd_per_mtok]
            cfg = self._config.backends[backend]
            if None in prices and isinstance(cfg, CloudBackendConfig):
                listed = self._list_price(cfg.provider, dep.upstream_model or model)
                if listed is not None:
                    prices = [p if p is not None else lp for p, lp in zip(prices, listed, strict=True)]
            if prices[0] is not None and prices[1] is not None:
                return Price(prices[0], prices[1])
        return None


def _total(lines: list[BatchSavingsRow]) -> BatchSavingsRow:
    return BatchSavingsRow(
        group=(),
        requests=sum(r.requests for r in lines),
        prompt_tokens=sum(r.prompt_tokens for r in lines),
        completion_tokens=sum(r.completion_tokens for r in lines),
        busy_ms=sum(r.busy_ms for r in lines),
        actual_micro_usd=sum(r.actual_micro_usd for r in lines),
        interactive_micro_usd=sum(r.interactive_micro_usd for r in lines),
    )


def as_json(row: BatchSavingsRow, usd: Any) -> dict[str, Any]:
    """One batch line as the savings report's JSON writes it (`usd`: micro-dollars -> USD text)."""
    return {
        **({"batch": row.group[0]} if row.group else {}),
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "busy_ms": row.busy_ms,
        "actual_usd": usd(row.actual_micro_usd),
        "actual_micro_usd": row.actual_micro_usd,
        "interactive_usd": usd(row.interactive_micro_usd),
        "interactive_micro_usd": row.interactive_micro_usd,
        "saved_usd": usd(row.saved_micro_usd),
        "saved_micro_usd": row.saved_micro_usd,
    }
