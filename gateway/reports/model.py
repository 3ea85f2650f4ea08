"""What a usage report asks for and what it answers: `ReportQuery` (parsed from text), `ReportRow`, `Report`.

Invariant: a `ReportQuery` is valid once built by `parse_query` (known dimensions, each at most once; aware
UTC bounds with `since < until`; `until` exclusive). Money is integer micro-dollars; percentiles are
milliseconds, None where a group has no value to rank.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import InvalidRequest

_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BATCH_ID = re.compile(r"^batch_[A-Za-z0-9_-]{1,58}$")
DATE_HINT = (
    "use YYYY-MM-DD (a UTC midnight) or ISO 8601 with a time, e.g. 2030-01-31T15:00:00Z (no zone: UTC)"
)


class Dimension(StrEnum):
    TEAM = "team"
    KEY = "key"
    MODEL = "model"
    BACKEND = "backend"
    PRIVACY = "privacy"
    ENDPOINT = "endpoint"  # the API called, e.g. "chat.completions"
    BATCH = "batch"  # the `/v1/batches` batch id; INTERACTIVE for requests of no batch
    DAY = "day"
    HOUR = "hour"


INTERACTIVE = "interactive"  # the batch dimension's value, and batch filter, for rows of no batch
ANY_BATCH = "batch"  # the batch filter that keeps every batch's rows (ids are batch_<hex>: no clash)


class Source(StrEnum):
    AUTO = "auto"  # rollups where they cover the window, raw ledger rows for the rest
    RAW = "raw"  # ledger rows only: exact percentiles
    ROLLUP = "rollup"  # hourly rollups (partial hours at the ends from ledger rows)


@dataclass(frozen=True, slots=True)
class ReportQuery:
    group_by: tuple[Dimension, ...]
    since: dt.datetime | None  # inclusive, aware UTC; None: from the first row
    until: dt.datetime | None  # exclusive, aware UTC; None: up to now and beyond
    team: str | None = None
    model: str | None = None  # the requested (public) model name
    endpoint: str | None = None  # the API called, e.g. "chat.completions" (usage.endpoint)
    source: Source = Source.AUTO
    batch: str | None = None  # a batch id, INTERACTIVE (rows of no batch) or ANY_BATCH (rows of any batch)


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One group's figures. `group` holds one value per `ReportQuery.group_by` entry: day "YYYY-MM-DD", hour
    "YYYY-MM-DDTHH:00Z" (UTC), key = key id, privacy = tier, endpoint = the API called ("chat.completions"),
    batch = batch id or "interactive"; None where a row has none (no key, backend or privacy class)."""

    group: tuple[str | None, ...]
    requests: int
    errors: int  # status "error"
    client_closed: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    cache_hits: int
    cost_saved_micro_usd: int  # what cache hits would have cost
    fallbacks: int  # requests that needed more than one backend attempt
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    owned_micro_usd: int = 0  # owned capacity's chargeback share (cost_micro_usd is cloud money)

    @property
    def error_rate(self) -> float:
        """errors / requests; 0.0 for no requests."""
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class Report:
    query: ReportQuery
    rows: tuple[ReportRow, ...]  # sorted by group; None sorts last
    totals: ReportRow  # over every row of the window (group is ())
    source: str  # "raw" | "rollup" | "mixed": what the figures were read from
    percentiles_exact: bool  # False: from merged histograms (see live/histogram.py for the error bound)


def parse_query(
    group_by: str | None,
    since: str | None,
    until: str | None,
    team: str | None = None,
    model: str | None = None,
    source: str = "auto",
    endpoint: str | None = None,
    batch: str | None = None,
) -> ReportQuery:
    """A `ReportQuery` from text (CLI options, query strings); a bad value raises `InvalidRequest` naming
    its parameter. `group_by` is comma-separated ("team,model"); None or "" groups nothing (totals only)."""
    start = parse_time(since, "since")
    end = parse_time(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidRequest(
            f"until ({end.isoformat()}) must be after since ({start.isoformat()}); until is exclusive",
            param="until",
        )
    return ReportQuery(
        group_by=parse_group_by(group_by),
        since=start,
        until=end,
        team=team or None,
        model=model or None,
        endpoint=endpoint or None,
        source=_parse_source(source),
        batch=_parse_batch(batch),
    )


def parse_group_by(text: str | None) -> tuple[Dimension, ...]:
    valid = ", ".join(d.value for d in Dimension)
    dims: list[Dimension] = []
    for part in (text or "").split(","):
        name = part.strip().lower()
        if not name:
            continue
        try:
            dim = Dimension(name)
        except ValueError:
            raise InvalidRequest(
                f"unknown group-by dimension `{part.strip()}`; valid: {valid} (comma-separated)",
                param="group_by",
            ) from None
        if dim in dims:
            raise InvalidRequest(f"group-by dimension `{dim}` is listed twice", param="group_by")
        dims.append(dim)
    return tuple(dims)


def parse_time(text: str | None, param: str) -> dt.datetime | None:
    """Aware UTC from "YYYY-MM-DD" (midnight UTC) or ISO 8601 with a time; naive means UTC."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        if _DATE_ONLY.match(text):
            return dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), tzinfo=dt.UTC)
        if "T" not in text and " " not in text:
            raise ValueError(text)
        value = dt.datetime.fromisoformat(text.replace("z", "Z"))
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{param}: `{text}` is not a date or time; {DATE_HINT}", param=param) from None


def _parse_batch(text: str | None) -> str | None:
    """A batch filter: a batch id, "interactive" or "batch" (any batch); None or "": no filter."""
    value = (text or "").strip()
    if not value:
        return None
    if value.lower() in (INTERACTIVE, ANY_BATCH):
        return value.lower()
    if not _BATCH_ID.match(value):
        raise InvalidRequest(
            f"batch filter `{value[:80]}` is no batch id (batch_...), `{INTERACTIVE}` (requests of no batch) "
            f"or `{ANY_BATCH}` (every batch's requests)",
            param="batch",
        )
    return value


def _parse_source(text: str) -> Source:
    try:
        return Source(text.strip().lower())
    except ValueError:
        valid = ", ".join(s.value for s in Source)
        raise InvalidRequest(f"unknown source `{text}`; valid: {valid}", param="source") from None
