"""Usage and savings reports as JSON (bytes), CSV (text) and rich tables, one column set per report kind.

Invariant: money appears as a USD string ("12.50") next to its exact integer micro-dollars in JSON, as the
USD string in CSV and tables; no money is ever a float. Group columns are named after the dimensions, and
an empty group value (no key, backend or privacy class) is null in JSON and empty in CSV.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from typing import Any

import orjson
from rich.table import Table

from gateway.reports.batch_savings import BatchSavingsRow, as_json
from gateway.reports.model import Report, ReportQuery, ReportRow
from gateway.reports.savings import OwnedCapacity, SavingsReport, SavingsRow
from gateway.store.spend import micro_to_usd_text

AnyReport = Report | SavingsReport
NONE_TEXT = "(none)"  # tables: an empty group value


def to_json(report: AnyReport) -> bytes:
    if isinstance(report, SavingsReport):
        return orjson.dumps(_savings_json(report))
    return orjson.dumps(
        {
            "query": _query_json(report.query),
            "source": report.source,
            "percentiles_exact": report.percentiles_exact,
            "rows": [_usage_json(report, row) for row in report.rows],
            "totals": _usage_json(report, report.totals),
        }
    )


def to_csv(report: AnyReport) -> str:
    """One header line, then one line per row (no totals line: it would break column sums)."""
    return "".join(csv_lines(report))


def csv_lines(report: AnyReport, rows_per_chunk: int = 500) -> Iterator[str]:
    """`to_csv`'s text in pieces of at most `rows_per_chunk` lines, for a streamed response."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [
        str(d) for d in (report.group_by if isinstance(report, SavingsReport) else report.query.group_by)
    ]
    if isinstance(report, SavingsReport):
        writer.writerow([*names, *_SAVINGS_CELLS])
        lines: Iterator[list[str]] = ([*(v or "" for v in r.group), *_savings_cells(r)] for r in report.rows)
    else:
        writer.writerow([*names, *_USAGE_CELLS])
        lines = ([*(v or "" for v in r.group), *_usage_cells(r)] for r in report.rows)
    for i, line in enumerate(lines, start=1):
        writer.writerow(line)
        if i % rows_per_chunk == 0:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    if out.tell():
        yield out.getvalue()


def to_table(report: AnyReport) -> Table:
    """A rich table with a totals line and a caption that says what the figures were read from."""
    batch: list[BatchSavingsRow] = []
    if isinstance(report, SavingsReport):
        names = [str(d) for d in report.group_by]
        heads: tuple[str, ...] = _SAVINGS_HEADS
        lines = [(r.group, _savings_cells(r)) for r in report.rows]
        total = _savings_cells(report.totals)
        caption = (
            f"reference: {report.reference.source}; hours {_span(report.since, report.until)}; "
            f"actual $: {SAVINGS_COST_BASIS}"
        )
        if report.owned:
            caption += "; owned capacity: " + "; ".join(owned_text(o) for o in report.owned)
        batch = [
            *report.batch,
            *([report.batch_total] if report.batch_total and report.batch_total.requests else []),
        ]
        if batch:
            caption += f"; {BATCH_BASIS}"
    else:
        names = [str(d) for d in report.query.group_by]
        heads = _USAGE_HEADS
        lines = [(r.group, _usage_cells(r, table=True)) for r in report.rows]
        total = _usage_cells(report.totals, table=True)
        how = "exact" if report.percentiles_exact else "from hourly histograms, approximate"
        caption = (
            f"source: {report.source}; percentiles {how}; {_span(report.query.since, report.query.until)}"
        )
    table = Table(title=_title(report), caption=caption)
    for name in names:
        table.add_column(name)
    for head in heads:
        table.add_column(head, justify="left" if head == "served by" else "right")
    for group, cells in lines:
        table.add_row(*(NONE_TEXT if v is None else v for v in group), *cells)
    table.add_section()
    table.add_row(*(["total", *([""] * (len(names) - 1))] if names else []), *total, style="bold")
    if batch:
        table.add_section()
        for line in batch:
            label = line.group[0] if line.group else "all batches"
            table.add_row(*([label, *([""] * (len(names) - 1))] if names else []), *_batch_cells(line))
    return table


# ---- usage ---------------------------------------------------------------------------------------------

_USAGE_CELLS = (
    "requests", "errors", "error_rate", "client_closed", "prompt_tokens", "completion_tokens", "cost_usd",
    "cache_hits", "cost_saved_usd", "fallbacks", "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms",
    "ttft_p95_ms",
)  # fmt: skip
_USAGE_HEADS = (
    "requests", "errors", "err %", "closed", "prompt tok", "compl tok", "cost $", "cache hits", "saved $",
    "fallbacks", "p50 ms", "p95 ms", "ttft p50", "ttft p95",
)  # fmt: skip


def _usage_cells(r: ReportRow, *, table: bool = False) -> list[str]:
    """CSV: error rate as a fraction, milliseconds to the microsecond; table: percent, 0.1 ms."""
    ms = _ms if table else _ms_exact
    return [
        str(r.requests),
        str(r.errors),
        f"{100 * r.error_rate:.2f}" if table else f"{r.error_rate:.6f}",
        str(r.client_closed),
        str(r.prompt_tokens),
        str(r.completion_tokens),
        micro_to_usd_text(r.cost_micro_usd),
        str(r.cache_hits),
        micro_to_usd_text(r.cost_saved_micro_usd),
        str(r.fallbacks),
        *(ms(v) for v in (r.latency_p50_ms, r.latency_p95_ms, r.ttft_p50_ms, r.ttft_p95_ms)),
    ]


def _usage_json(report: Report, r: ReportRow) -> dict[str, Any]:
    return {
        **_group_json(report.query.group_by if r.group else (), r.group),
        "requests": r.requests,
        "errors": r.errors,
        "error_rate": r.error_rate,
        "client_closed": r.client_closed,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cost_usd": micro_to_usd_text(r.cost_micro_usd),
        "cost_micro_usd": r.cost_micro_usd,
        "cache_hits": r.cache_hits,
        "cost_saved_usd": micro_to_usd_text(r.cost_saved_micro_usd),
        "cost_saved_micro_usd": r.cost_saved_micro_usd,
        "owned_usd": micro_to_usd_text(r.owned_micro_usd),
        "owned_micro_usd": r.owned_micro_usd,
        "fallbacks": r.fallbacks,
        "latency_p50_ms": r.latency_p50_ms,
        "latency_p95_ms": r.latency_p95_ms,
        "ttft_p50_ms": r.ttft_p50_ms,
        "ttft_p95_ms": r.ttft_p95_ms,
    }


# ---- savings -------------------------------------------------------------------------------------------

_SAVINGS_CELLS = (
    "served_by", "requests", "prompt_tokens", "completion_tokens", "busy_hours", "actual_usd",
    "reference_usd", "saved_usd",
)  # fmt: skip
SAVINGS_COST_BASIS = (
    "self_hosted = busy h x usd_per_hour, edge = its owned share as the ledger recorded it, cache = 0"
)
BATCH_BASIS = (
    "batch lines: /v1/batches items (cache hits left out; the rows above include them), reference $ = the "
    "same tokens at interactive cloud prices (the serving cloud deployment's, or the cheapest cloud "
    "deployment the team may use for items on owned or edge capacity)"
)
_SAVINGS_HEADS = (
    "served by",
    "requests",
    "prompt tok",
    "compl tok",
    "busy h",
    "actual $",
    "reference $",
    "saved $",
)


def _savings_cells(r: SavingsRow) -> list[str]:
    return [
        str(r.served_by),
        str(r.requests),
        str(r.prompt_tokens),
        str(r.completion_tokens),
        f"{r.busy_ms / 3_600_000:.3f}",
        micro_to_usd_text(r.actual_micro_usd),
        micro_to_usd_text(r.reference_micro_usd),
        micro_to_usd_text(r.saved_micro_usd),
    ]


def _batch_cells(r: BatchSavingsRow) -> list[str]:
    return [
        "batch",
        str(r.requests),
        str(r.prompt_tokens),
        str(r.completion_tokens),
        f"{r.busy_ms / 3_600_000:.3f}",
        micro_to_usd_text(r.actual_micro_usd),
        micro_to_usd_text(r.interactive_micro_usd),
        micro_to_usd_text(r.saved_micro_usd),
    ]


def _savings_json(report: SavingsReport) -> dict[str, Any]:
    ref = report.reference
    return {
        "query": _query_json(report.query),
        "group_by": [str(d) for d in report.group_by],
        "since": _iso(report.since),
        "until": _iso(report.until),
        "source": report.source,
        "reference": {
            "input_usd_per_mtok": str(ref.input_usd_per_mtok),
            "output_usd_per_mtok": str(ref.output_usd_per_mtok),
            "source": ref.source,
        },
        "rows": [_savings_row_json(report, r) for r in report.rows],
        "totals": _savings_row_json(report, report.totals),
        "owned_capacity": [_owned_json(o) for o in report.owned],
        "batch": {
            "basis": BATCH_BASIS,
            "rows": [as_json(r, micro_to_usd_text) for r in report.batch],
            "totals": None if report.batch_total is None else as_json(report.batch_total, micro_to_usd_text),
        },
    }


def _owned_json(o: OwnedCapacity) -> dict[str, Any]:
    fixed = o.fixed_micro_usd
    return {
        "backend": o.backend,
        "usd_per_hour": str(o.usd_per_hour),
        "hours": o.hours,
        "fixed_usd": None if fixed is None else micro_to_usd_text(fixed),
        "fixed_micro_usd": fixed,
        "busy_ms": o.busy_ms,
        "cloud_avoided_usd": micro_to_usd_text(o.avoided_micro_usd),
        "cloud_avoided_micro_usd": o.avoided_micro_usd,
    }


def owned_text(o: OwnedCapacity) -> str:
    """e.g. `gpu0: 2.40 $/h (57.600000 $ over 24 h) vs 12.3 $ of cloud avoided`."""
    fixed = (
        "" if o.fixed_micro_usd is None else f" ({micro_to_usd_text(o.fixed_micro_usd)} $ over {o.hours:g} h)"
    )
    avoided = micro_to_usd_text(o.avoided_micro_usd)
    return f"{o.backend}: {o.usd_per_hour} $/h{fixed} vs {avoided} $ of cloud avoided"


def _savings_row_json(report: SavingsReport, r: SavingsRow) -> dict[str, Any]:
    return {
        **_group_json(report.group_by if r.group else (), r.group),
        "served_by": str(r.served_by),
        "requests": r.requests,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "busy_ms": r.busy_ms,
        "actual_usd": micro_to_usd_text(r.actual_micro_usd),
        "actual_micro_usd": r.actual_micro_usd,
        "reference_usd": micro_to_usd_text(r.reference_micro_usd),
        "reference_micro_usd": r.reference_micro_usd,
        "saved_usd": micro_to_usd_text(r.saved_micro_usd),
        "saved_micro_usd": r.saved_micro_usd,
    }


# ---- shared --------------------------------------------------------------------------------------------


def _query_json(q: ReportQuery) -> dict[str, Any]:
    return {
        "group_by": [str(d) for d in q.group_by],
        "since": _iso(q.since),
        "until": _iso(q.until),
        "team": q.team,
        "model": q.model,
        "endpoint": q.endpoint,
        "batch": q.batch,
        "source": str(q.source),
    }


def _group_json(dims: tuple[Any, ...], group: tuple[str | None, ...]) -> dict[str, str | None]:
    return {str(d): v for d, v in zip(dims, group, strict=True)}


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _ms_exact(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _span(since: dt.datetime | None, until: dt.datetime | None) -> str:
    return f"{_iso(since) or 'start'} .. {_iso(until) or 'now'} (UTC, end exclusive)"


def _title(report: AnyReport) -> str:
    q = report.query
    what = "savings" if isinstance(report, SavingsReport) else "usage"
    scope = [f"team {q.team}"] if q.team else []
    scope += [f"model {q.model}"] if q.model else []
    scope += [f"endpoint {q.endpoint}"] if q.endpoint else []
    scope += [f"batch {q.batch}"] if q.batch else []
    return f"{what}" + (f" ({', '.join(scope)})" if scope else "")
