"""`savings_report`: what self-hosted serving, edge nodes and the cache cost, next to a reference cloud model.

Rows per backend (and team, if the query groups by team; other dimensions are ignored) over whole UTC hours
(`since` rounds down, `until` up). Self-hosted backends (kind "openai" with `usd_per_hour`) cost usd_per_hour
x busy time (backend_busy_hourly, rolled-up hours only; a team grouping or team/model/endpoint filter
shares each hour's busy time by token share, cache hits included, and busy hours without a request start by
the window's share). Edge nodes (backend `<edge backend>/<node id>`) cost what the ledger recorded: their
owned share (`owned_micro_usd`; before migration 0010, an occupancy price in `cost_micro_usd`). Cache hits
cost 0. Reference = tokens x reference prices. `owned`: each self-hosted box's fixed cost over the window
(usd_per_hour x hours, paid whatever it serves) next to the cloud spend its traffic avoided.
Traffic sums are exact (`usage_report`); cache hits are split out by the same plan (cache_hits.py: the
rollups' cache columns, raw rows where the traffic read raw rows). The batch line (batch_savings.py)
compares batch items with interactive cloud prices.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from sqlalchemy.engine import Connection, Engine

from gateway.config import CloudBackendConfig, Config, EdgeBackendConfig
from gateway.edge.pool import split_node_backend
from gateway.errors import InvalidRequest
from gateway.reports import sql
from gateway.reports.batch_savings import BatchSavingsRow, batch_savings
from gateway.reports.cache_hits import cache_hit_sums
from gateway.reports.costs import ListPrice, busy_cost_micro_usd, busy_ms_by
from gateway.reports.model import Dimension, ReportQuery, ReportRow
from gateway.reports.query import (
    ceil_hour,
    floor_hour,
    make_plan,
    no_progress,
    read_state,
    report_on,
    snapshot,
)
from gateway.reports.runner import Guard
from routing.decision import Price
from routing.fleet import owned_share_micro_usd

_ZEROS = [0] * len(sql.SUM_FIELDS)


class ServedBy(StrEnum):
    SELF_HOSTED = "self_hosted"  # our own engines: cost is busy time x usd_per_hour
    EDGE = "edge"  # edge nodes: their owned share as the ledger recorded it
    CACHE = "cache"  # answered from the response cache: cost 0
    ALL = "all"  # the totals row


@dataclass(frozen=True, slots=True)
class ReferencePrice:
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    source: str  # where the prices come from, for the reader

    def cost_micro_usd(self, prompt_tokens: int, completion_tokens: int) -> int:
        return Price(self.input_usd_per_mtok, self.output_usd_per_mtok).cost_micro_usd(
            prompt_tokens, completion_tokens
        )


@dataclass(frozen=True, slots=True)
class SavingsRow:
    group: tuple[str | None, ...]  # values of SavingsReport.group_by; backend: the one that made the answer
    served_by: ServedBy
    requests: int
    prompt_tokens: int
    completion_tokens: int
    busy_ms: float  # measured busy time charged to this row (edge: for information only); 0 for cache hits
    actual_micro_usd: int
    reference_micro_usd: int  # the same tokens at the reference prices

    @property
    def saved_micro_usd(self) -> int:
        return self.reference_micro_usd - self.actual_micro_usd


@dataclass(frozen=True, slots=True)
class OwnedCapacity:
    """One self-hosted backend over the report's window: what it costs per hour whatever it serves, next to
    what its traffic would have cost at the reference cloud price."""

    backend: str
    usd_per_hour: Decimal
    hours: float | None  # the window's length; None when it is open (no since or until)
    fixed_micro_usd: int | None  # usd_per_hour x hours
    busy_ms: float
    avoided_micro_usd: int


@dataclass(frozen=True, slots=True)
class SavingsReport:
    query: ReportQuery
    group_by: tuple[Dimension, ...]  # (backend,) or (team, backend)
    since: dt.datetime | None  # the whole-hour window reported
    until: dt.datetime | None
    reference: ReferencePrice
    rows: tuple[SavingsRow, ...]  # self-hosted rows, then edge rows, then cache rows, each sorted by group
    totals: SavingsRow  # group (), served_by ALL
    source: str  # of the traffic sums: "raw" | "rollup" | "mixed"
    owned: tuple[OwnedCapacity, ...] = ()  # self-hosted backends with traffic, by name
    # `/v1/batches` items against interactive cloud prices (batch_savings.py): per batch when the query
    # groups by batch, and in total (in none of the rows above: they overlap them)
    batch: tuple[BatchSavingsRow, ...] = ()
    batch_total: BatchSavingsRow | None = None


def savings_report(
    engine: Engine,
    config: Config,
    query: ReportQuery,
    *,
    list_price: ListPrice | None = None,
    guard: Guard | None = None,
) -> SavingsReport:
    """Savings of self-hosted serving, edge nodes and the cache over `query`'s window and filters.
    `list_price` looks up a cloud model's list price (default: litellm's local cost map, through the cloud
    backend); raises `InvalidRequest` when no reference price is configured or known."""
    reference = reference_price(config, list_price)
    dims = (Dimension.TEAM, Dimension.BACKEND) if Dimension.TEAM in query.group_by else (Dimension.BACKEND,)
    since = None if query.since is None else floor_hour(query.since)
    until = None if query.until is None else ceil_hour(query.until)
    hosted = {
        name: b.usd_per_hour
        for name, b in config.backends.items()
        if b.kind == "openai" and b.usd_per_hour is not None
    }
    edge = frozenset(name for name, b in config.backends.items() if isinstance(b, EdgeBackendConfig))
    with snapshot(engine, guard) as conn:
        whole_hours = dataclasses.replace(query, group_by=dims, since=since, until=until)
        plan = make_plan(conn, whole_hours, read_state(conn))
        traffic = report_on(conn, whole_hours, guard.check if guard is not None else no_progress, plan)
        cached = cache_hit_sums(conn, whole_hours, plan)  # from the rollups, as the traffic
        nodes = {name for row in traffic.rows if is_edge_node(name := row.group[-1] or "", edge)}
        measured = sorted(hosted.keys() | nodes)  # edge nodes' busy time is shown, not charged
        busy = _busy_ms(conn, dims, (since, until), measured, query) if measured else {}
        ref = Price(reference.input_usd_per_mtok, reference.output_usd_per_mtok)
        lines, batch_total = batch_savings(
            conn, config, query, (since, until), ref, list_price or _litellm_list_price, plan
        )
    cache = {tuple(v or None for v in key): sums for key, sums in cached.items()}
    rows = _self_hosted_rows(traffic.rows, cache, busy, hosted, reference)
    rows += _edge_rows(traffic.rows, cache, busy, edge, reference)
    for key in sorted(cache, key=_order):
        c = cache[key]
        rows.append(
            SavingsRow(key, ServedBy.CACHE, c[0], c[3], c[4], 0.0, 0, reference.cost_micro_usd(c[3], c[4]))
        )
    owned = _owned(rows, hosted, since, until)
    return SavingsReport(
        query,
        dims,
        since,
        until,
        reference,
        tuple(rows),
        _totals(rows),
        traffic.source,
        owned,
        lines,
        batch_total,
    )


def _owned(
    rows: Sequence[SavingsRow],
    hosted: Mapping[str, Decimal],
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> tuple[OwnedCapacity, ...]:
    hours = None if since is None or until is None else (until - since).total_seconds() / 3600
    out = []
    for name in sorted(hosted):
        mine = [r for r in rows if r.served_by is ServedBy.SELF_HOSTED and r.group[-1] == name]
        if not mine:
            continue
        per_hour = hosted[name]
        fixed = None if hours is None else owned_share_micro_usd(hours * 3_600_000, per_hour)
        busy, avoided = sum(r.busy_ms for r in mine), sum(r.reference_micro_usd for r in mine)
        out.append(OwnedCapacity(name, per_hour, hours, fixed, busy, avoided))
    return tuple(out)


def _self_hosted_rows(
    traffic: Sequence[ReportRow],
    cache: Mapping[tuple[str | None, ...], list[int]],
    busy: Mapping[tuple[str | None, ...], float],
    hosted: Mapping[str, Decimal],
    reference: ReferencePrice,
) -> list[SavingsRow]:
    """Self-hosted backends' traffic rows less their cache hits (vectors in sql.SUM_FIELDS order)."""
    rows = []
    for row in traffic:
        usd_per_hour = hosted.get(row.group[-1] or "")
        if usd_per_hour is None:
            continue
        c = cache.get(row.group, _ZEROS)
        prompt, completion = row.prompt_tokens - c[3], row.completion_tokens - c[4]
        busy_ms = busy.get(row.group, 0.0)
        rows.append(
            SavingsRow(
                group=row.group,
                served_by=ServedBy.SELF_HOSTED,
                requests=row.requests - c[0],
                prompt_tokens=prompt,
                completion_tokens=completion,
                busy_ms=busy_ms,
                actual_micro_usd=busy_cost_micro_usd(busy_ms, usd_per_hour),
                reference_micro_usd=reference.cost_micro_usd(prompt, completion),
            )
        )
    return rows


def is_edge_node(backend: str | None, edge_backends: frozenset[str]) -> bool:
    """Whether a ledger `backend` is an edge node's: `<edge backend>/<node id>` (gateway/edge/pool.py)."""
    pair = split_node_backend(backend or "")
    return pair is not None and pair[0] in edge_backends


def _edge_rows(
    traffic: Sequence[ReportRow],
    cache: Mapping[tuple[str | None, ...], list[int]],
    busy: Mapping[tuple[str | None, ...], float],
    edge_backends: frozenset[str],
    reference: ReferencePrice,
) -> list[SavingsRow]:
    """Edge nodes' traffic rows less their cache hits, at the cost the ledger recorded for them; a group
    whose only requests were cache hits has no edge row."""
    rows = []
    for row in traffic:
        if not is_edge_node(row.group[-1], edge_backends):
            continue
        c = cache.get(row.group, _ZEROS)
        if row.requests == c[0]:
            continue
        prompt, completion = row.prompt_tokens - c[3], row.completion_tokens - c[4]
        rows.append(
            SavingsRow(
                group=row.group,
                served_by=ServedBy.EDGE,
                requests=row.requests - c[0],
                prompt_tokens=prompt,
                completion_tokens=completion,
                busy_ms=busy.get(row.group, 0.0),
                actual_micro_usd=row.cost_micro_usd - c[5] + row.owned_micro_usd - c[9],
                reference_micro_usd=reference.cost_micro_usd(prompt, completion),
            )
        )
    return rows


def reference_price(config: Config, list_price: ListPrice | None = None) -> ReferencePrice:
    """Explicit `reports.reference_*_usd_per_mtok`, else the reference model's configured prices, else
    its list price (`list_price`, default: litellm's local cost map via backends.cloud)."""
    rc = config.reports
    if rc.reference_input_usd_per_mtok is not None or rc.reference_output_usd_per_mtok is not None:
        if rc.reference_input_usd_per_mtok is None or rc.reference_output_usd_per_mtok is None:
            raise InvalidRequest(
                "set both reports.reference_input_usd_per_mtok and reports.reference_output_usd_per_mtok "
                "in the config, or neither (then reports.reference_model's prices are used)"
            )
        source = "config: reports.reference_input_usd_per_mtok / reference_output_usd_per_mtok"
        return ReferencePrice(rc.reference_input_usd_per_mtok, rc.reference_output_usd_per_mtok, source)
    name = rc.reference_model
    if name is None:
        raise InvalidRequest(
            "savings need a reference cloud price: set reports.reference_model (a model under [models]) or "
            "reports.reference_input_usd_per_mtok and reports.reference_output_usd_per_mtok in the config"
        )
    dep = config.models[name].all_deployments()[0]
    prices: list[Decimal | None] = [dep.input_usd_per_mtok, dep.output_usd_per_mtok]
    source = f"config: models.{name} prices"
    backend = config.backends[dep.backend]
    if None in prices and isinstance(backend, CloudBackendConfig):
        upstream = dep.upstream_model or name
        listed = (list_price or _litellm_list_price)(backend.provider, upstream)
        if listed is not None:
            prices = [p if p is not None else lp for p, lp in zip(prices, listed, strict=True)]
            source = f"list price of {backend.provider}/{upstream} (reports.reference_model = {name})"
    if prices[0] is None or prices[1] is None:
        raise InvalidRequest(
            f"no price is known for reports.reference_model `{name}`: set input_usd_per_mtok and "
            f"output_usd_per_mtok under models.{name}, or reports.reference_*_usd_per_mtok"
        )
    return ReferencePrice(prices[0], prices[1], source)


def _litellm_list_price(provider: str, model: str) -> tuple[Decimal, Decimal] | None:
    from backends.cloud import CloudBackend  # imports litellm: only when a list price is needed

    probe = CloudBackend("reports.reference_model", provider, api_key=None, api_base=None, timeout_s=1.0)
    return probe.price_usd_per_mtok(model)


def _busy_ms(
    conn: Connection,
    dims: Sequence[Dimension],
    hours: tuple[dt.datetime | None, dt.datetime | None],
    backends: list[str],
    query: ReportQuery,
) -> dict[tuple[str | None, ...], float]:
    """Busy time per group (dims end with backend), apportioned by token share per hour (see module doc)."""
    return busy_ms_by(conn, ("team",) if Dimension.TEAM in dims else (), hours, backends, query)


def _order(key: tuple[str | None, ...]) -> tuple[tuple[bool, str], ...]:
    return tuple((v is None, v or "") for v in key)


def _totals(rows: Sequence[SavingsRow]) -> SavingsRow:
    return SavingsRow(
        group=(),
        served_by=ServedBy.ALL,
        requests=sum(r.requests for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        busy_ms=sum(r.busy_ms for r in rows),
        actual_micro_usd=sum(r.actual_micro_usd for r in rows),
        reference_micro_usd=sum(r.reference_micro_usd for r in rows),
    )
