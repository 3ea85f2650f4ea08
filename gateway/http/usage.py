"""`GET /v1/usage`: a team key's own usage report; also the HTTP rendering `/admin/reports/*` shares.

Invariant: a team key only ever sees its own team. The team filter is forced to the key's team, and asking
for another team is refused (403), never silently narrowed. Report queries are synchronous SQL and run in a
worker thread, so the event loop keeps serving traffic while a long report is computed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from gateway.errors import AdminOnly, InvalidRequest
from gateway.http.auth import authenticate
from gateway.reports import ReportQuery, parse_query, savings_report, usage_report
from gateway.reports.render import AnyReport, to_csv, to_json
from gateway.services import Services

FORMATS = ("json", "csv")


@dataclass(slots=True)
class ReportParams:
    """The reports' query string, as a FastAPI dependency. Nothing is checked until `query()` and
    `output_format()`, so authentication (another dependency) always answers first."""

    group_by: str | None = None  # comma-separated dimensions
    since: str | None = None
    until: str | None = None
    team: str | None = None
    model: str | None = None
    source: str | None = None
    format: str = "json"

    def query(self, *, team: str | None = None) -> ReportQuery:
        """The `ReportQuery` (with `team` in place of the parameter when given); bad values are 400s."""
        return parse_query(
            self.group_by,
            self.since,
            self.until,
            team=team or self.team,
            model=self.model,
            source=self.source or "auto",
        )

    def output_format(self) -> str:
        fmt = self.format.strip().lower()
        if fmt not in FORMATS:
            raise InvalidRequest(
                f"query parameter `format` must be one of {', '.join(FORMATS)}, not {self.format!r}",
                param="format",
            )
        return fmt


def render(report: AnyReport, fmt: str, name: str) -> Response:
    """A report (usage or savings) as JSON or as a CSV download named `name`.csv."""
    if fmt == "csv":
        headers = {"content-disposition": f'attachment; filename="{name}.csv"'}
        return Response(to_csv(report), media_type="text/csv; charset=utf-8", headers=headers)
    return Response(to_json(report), media_type="application/json")


async def usage_response(svc: Services, query: ReportQuery, fmt: str) -> Response:
    report = await asyncio.to_thread(usage_report, svc.db, query)
    return render(report, fmt, "usage")


async def savings_response(svc: Services, query: ReportQuery, fmt: str) -> Response:
    report = await asyncio.to_thread(savings_report, svc.db, svc.config, query)
    return render(report, fmt, "savings")


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

    @router.get("/v1/usage")
    async def team_usage(request: Request, params: ReportParams = Depends()) -> Response:
        svc: Services = request.app.state.services
        identity = await authenticate(
            svc.access, request.headers.get("authorization"), now=dt.datetime.now(dt.UTC)
        )
        team = own_team(identity.team, params.team)
        return await usage_response(svc, params.query(team=team), params.output_format())

    return router
