"""`GET /v1/usage`: a team key's own usage report; also the HTTP rendering `/admin/reports/*` shares.

Invariant: a team key only ever sees its own team. The team filter is forced to the key's team, and asking
for another team is refused (403), never silently narrowed. Report queries are synchronous SQL; they run on
the report pool (gateway/reports/runner.py), bounded in span, time and number, rate-limited per key, and
stopped when their client goes away.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response, StreamingResponse

from gateway.errors import AdminOnly, InvalidRequest, RateLimited
from gateway.http.auth import authenticate
from gateway.http.deps import ReportDeps, router_deps
from gateway.http.openapi import TAG_TEAM, UsageReport, errors, ok
from gateway.limits.base import LimitKind, LimitRule
from gateway.reports import Dimension, ReportQuery, Source, parse_query, savings_report, usage_report
from gateway.reports.render import AnyReport, csv_lines, to_json
from gateway.reports.runner import Guard, ReportRunner

FORMATS = ("json", "csv")
T = TypeVar("T")
_DIM = "|".join(Dimension)
# Documented shapes only: the values are read as text by `query()`, after authentication.
GroupBy = Annotated[
    str | None,
    Query(
        description=f"comma-separated dimensions, each at most once: {', '.join(Dimension)}",
        json_schema_extra={"pattern": f"^(({_DIM})(,({_DIM}))*)?$"},  # empty: totals only
    ),
]
When = Annotated[
    str | None, Query(description="YYYY-MM-DD (UTC midnight) or ISO 8601 with a time; `until` is exclusive")
]
SourceParam = Annotated[str | None, Query(json_schema_extra={"enum": list(Source)})]
FormatParam = Annotated[str, Query(json_schema_extra={"enum": list(FORMATS)})]


@dataclass(slots=True)
class ReportParams:
    """The reports' query string, as a FastAPI dependency. Nothing is checked until `query()` and
    `output_format()`, so authentication (another dependency) always answers first."""

    group_by: GroupBy = None
    since: When = None
    until: When = None
    team: str | None = None
    model: str | None = None
    endpoint: Annotated[str | None, Query(description="only this API, e.g. chat.completions")] = None
    batch: Annotated[
        str | None,
        Query(description="only this batch id, `interactive` (requests of no batch) or `batch` (any batch)"),
    ] = None
    source: SourceParam = None
    format: FormatParam = "json"

    def query(self, max_span_days: int, *, team: str | None = None) -> ReportQuery:
        """The `ReportQuery` (with `team` in place of the parameter when given); bad values are 400s."""
        query = parse_query(
            self.group_by,
            self.since,
            self.until,
            team=team or self.team,
            model=self.model,
            source="auto" if self.source is None else self.source,  # `source=` is a 400, as documented
            endpoint=self.endpoint,
            batch=self.batch,
        )
        check_span(query, max_span_days, now=dt.datetime.now(dt.UTC))
        return query

    def output_format(self) -> str:
        fmt = self.format.strip().lower()
        if fmt not in FORMATS:
            raise InvalidRequest(
                f"query parameter `format` must be one of {', '.join(FORMATS)}, not {self.format!r}",
                param="format",
            )
        return fmt


def check_span(query: ReportQuery, max_span_days: int, *, now: dt.datetime) -> None:
    """A window longer than the configured span is refused, before any SQL runs."""
    if query.since is None:
        return  # from the first row: bounded by what the ledger holds
    end = query.until or now
    if end - query.since > dt.timedelta(days=max_span_days):
        raise InvalidRequest(
            f"the report window from `since` to `until` (or now) spans more than {max_span_days} days; "
            "ask for a shorter window, or raise the limit (config: reports.max_span_days)",
            param="since",
        )


def render(report: AnyReport, fmt: str, name: str) -> Response:
    """A report (usage or savings) as JSON or as a CSV download named `name`.csv, streamed in chunks of
    rows (a long report's text is never held whole)."""
    if fmt == "csv":
        headers = {"content-disposition": f'attachment; filename="{name}.csv"'}
        return StreamingResponse(csv_lines(report), media_type="text/csv; charset=utf-8", headers=headers)
    return Response(to_json(report), media_type="application/json")


async def usage_response(deps: ReportDeps, request: Request, query: ReportQuery, fmt: str) -> Response:
    report = await run_report(deps.runner, request, lambda guard: usage_report(deps.db, query, guard=guard))
    return render(report, fmt, "usage")


async def savings_response(deps: ReportDeps, request: Request, query: ReportQuery, fmt: str) -> Response:
    report = await run_report(
        deps.runner, request, lambda guard: savings_report(deps.db, deps.config, query, guard=guard)
    )
    return render(report, fmt, "savings")


async def run_report(runner: ReportRunner, request: Request, work: Callable[[Guard], T]) -> T:
    """`work` on the report pool, cancelled if the client disconnects while it runs."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        return await runner.run(work, until_gone=gone)
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def limit_report_calls(deps: ReportDeps, key_id: str) -> None:
    """At most `reports.requests_per_minute` report calls per team key, across replicas with Redis."""
    per_minute = deps.config.reports.requests_per_minute
    rule = LimitRule(f"report:{key_id}", LimitKind.REQUESTS, per_minute, 60.0)
    admission = await deps.limiter.admit([rule], cost_tokens=0)
    if not admission.allowed:
        raise RateLimited(
            f"at most {per_minute} usage reports per minute per key; retry after the Retry-After delay "
            "(config: reports.requests_per_minute)",
            retry_after_s=admission.retry_after_s or 60.0,
        )


def own_team(key_team: str, asked: str | None) -> str:
    """The team a team key may report on: its own. Asking for another one is refused, naming the way."""
    if asked and asked != key_team:
        raise AdminOnly(
            f"this key belongs to team `{key_team}` and can only report that team's usage; drop the `team` "
            f"parameter, or ask an admin for GET /admin/reports/usage?team={asked}",
            param="team",
        )
    return key_team


def usage_router() -> APIRouter:
    router = APIRouter()
    report = {
        **ok(UsageReport, "this key's team's usage", media="text/csv"),
        **errors(400, 401, 403, 429, 503),
    }

    @router.get("/v1/usage", tags=[TAG_TEAM], responses=report)
    async def team_usage(request: Request, params: ReportParams = Depends()) -> Response:
        deps = router_deps(request).reports
        identity = await authenticate(
            deps.access, request.headers.get("authorization"), now=dt.datetime.now(dt.UTC)
        )
        team = own_team(identity.team, params.team)
        query, fmt = params.query(deps.config.reports.max_span_days, team=team), params.output_format()
        await limit_report_calls(deps, identity.key_id)
        return await usage_response(deps, request, query, fmt)

    return router
