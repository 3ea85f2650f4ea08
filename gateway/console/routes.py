"""The console's routes: login and logout, Overview, Usage and cost, Savings (their JSON under /console/api),
and `install_console`, which mounts the static files, adds the manage pages (gateway/console/manage.py) and
renders the console's refusals as pages. Routes are left out of the OpenAPI document: they are a UI.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse, Response

from backends.errors import SwitchboardError
from gateway.console import charts, overview
from gateway.console.access import (
    LoginRequired,
    Refused,
    User,
    checked_form,
    current_user,
    log_in,
    log_out,
    read_form,
    require_admin,
)
from gateway.console.manage import manage_router
from gateway.console.views import STATIC_DIR, html, with_headers
from gateway.http.usage import ReportParams, render, run_report
from gateway.reports import parse_query, savings_report, usage_report
from gateway.reports.model import parse_time
from gateway.reports.render import to_json

RANGES = {
    "1h": dt.timedelta(hours=1),
    "24h": dt.timedelta(hours=24),
    "7d": dt.timedelta(days=7),
    "30d": dt.timedelta(days=30),
}
_JSON = "application/json"


def _window(range_: str, since: str | None, until: str | None) -> tuple[dt.datetime, dt.datetime, str]:
    """[since, until) of the overview: a named range ending now, or a chosen one (`since`, `until`)."""
    now = dt.datetime.now(dt.UTC)
    if since:
        start = parse_time(since, "since")
        end = parse_time(until, "until") or now
        assert start is not None
        parse_query(None, start.isoformat(), end.isoformat())  # since < until, or a 400 naming it
        return start, end, "custom"
    if range_ not in RANGES:
        raise Refused(400, f"Unknown range {range_[:16]!r}; choose one of {', '.join(RANGES)}.")
    return now - RANGES[range_], now, range_


def _wants_json(request: Request) -> bool:
    """A script's login (Accept: application/json) gets its refusal as the API's JSON error envelope."""
    accept = request.headers.get("accept", "")
    return _JSON in accept and "text/html" not in accept


def _page_error(exc: SwitchboardError) -> tuple[int, str]:
    return exc.status_code, exc.message


def _json(value: Any) -> Response:
    return with_headers(Response(orjson.dumps(value, default=str), media_type=_JSON))


def _row_json(row: Any) -> dict[str, Any]:
    fields = ("requests", "errors", "cost_micro_usd", "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms")
    return {"group": list(row.group), **{f: getattr(row, f) for f in (*fields, "ttft_p95_ms")}}


async def _overview(request: Request, user: User, range_: str, since: str | None, until: str | None) -> Any:
    start, end, label = _window(range_, since, until)
    deps = user.deps.reports
    result = await run_report(
        deps.runner, request, lambda guard: overview.overview(deps.db, start, end, user.team, guard)
    )
    return result, start, end, label


def console_router() -> APIRouter:
    router = APIRouter(prefix="/console", include_in_schema=False)

    @router.get("")
    async def home(request: Request) -> Response:
        return RedirectResponse("/console/overview", status_code=303)

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        return html("login.html", user=None, page="login", error=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
        try:
            return await log_in(request, form.get("key", "").strip())
        except Refused as exc:
            if _wants_json(request):
                body = {"error": {"message": exc.message, "type": "invalid_request_error", "code": None}}
                refused = Response(orjson.dumps(body), status_code=exc.status, media_type=_JSON)
            else:
                refused = html(
                    "login.html", status_code=exc.status, user=None, page="login", error=exc.message
                )
            refused.headers.update(exc.headers())
            return with_headers(refused)

    @router.post("/logout")
    async def logout(request: Request, user: User = Depends(current_user)) -> Response:
        await checked_form(request, user)
        return await log_out(request, user)

    @router.get("/overview")
    async def overview_page(
        request: Request,
        range: str = "1h",
        since: str | None = None,
        until: str | None = None,
        part: str | None = None,
        user: User = Depends(current_user),
    ) -> Response:
        try:
            view, start, end, label = await _overview(request, user, range, since, until)
        except SwitchboardError as exc:
            status, message = _page_error(exc)
            return html("error.html", status_code=status, user=user, page="overview", message=message)
        backends = [(r.group[0] or "(none)", r.cost_micro_usd / 1e6) for r in view.by_backend][:12]
        teams = [(r.group[0] or "(none)", r.cost_micro_usd / 1e6) for r in view.by_team][:12]
        context: dict[str, Any] = {
            "user": user,
            "page": "overview",
            "view": view,
            "range": label,
            "ranges": list(RANGES),
            "since": start,
            "until": end,
            "live": label == "1h",
            "traffic_chart": charts.columns(
                [(b, float(n), float(e)) for b, n, e in view.series],
                label=f"requests per {view.series_unit}, errors in red",
            ),
            "backend_chart": charts.bars(
                backends, label="spend per backend (USD)", fmt=lambda v: f"${v:,.4f}"
            ),
            "team_chart": charts.bars(teams, label="spend per team (USD)", fmt=lambda v: f"${v:,.4f}"),
        }
        return html("overview.html", part=part == "live", **context)

    @router.get("/api/overview")
    async def overview_json(
        request: Request,
        range: str = "1h",
        since: str | None = None,
        until: str | None = None,
        user: User = Depends(current_user),
    ) -> Response:
        view, start, end, _ = await _overview(request, user, range, since, until)
        return _json(
            {
                "since": start.isoformat(),
                "until": end.isoformat(),
                "team": user.team,
                "source": view.source,
                "totals": _row_json(view.totals),
                "by_backend": [_row_json(r) for r in view.by_backend],
                "by_team": [_row_json(r) for r in view.by_team],
                "series": [{"bucket": b, "requests": n, "errors": e} for b, n, e in view.series],
            }
        )

    @router.get("/usage")
    async def usage_page(
        request: Request, params: ReportParams = Depends(), user: User = Depends(current_user)
    ) -> Response:
        return await _report_page(request, user, params, "usage")

    @router.get("/savings")
    async def savings_page(
        request: Request, params: ReportParams = Depends(), user: User = Depends(require_admin)
    ) -> Response:
        return await _report_page(request, user, params, "savings")

    return router


def _defaults(params: ReportParams, kind: str) -> ReportParams:
    """The page's first view: the last 7 days, grouped by team (usage) or by nothing (savings)."""
    if params.since is None and params.until is None and params.group_by is None:
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=7)).strftime("%Y-%m-%d")
        params.since, params.group_by = since, ("team" if kind == "usage" else "")
    return params


async def _report_page(request: Request, user: User, params: ReportParams, kind: str) -> Response:
    """A usage or savings report as a page (with a chart), its JSON (`format=json`) or CSV (`format=csv`),
    with the team filter forced to a team session's own team."""
    deps = user.deps.reports
    params = _defaults(params, kind)
    if user.team is not None and params.team not in (None, "", user.team):
        raise Refused(403, f"You are logged in for team {user.team} and can see that team's usage only.")
    error, report_json = None, None
    try:
        query = params.query(deps.config.reports.max_span_days, team=user.team)
        fmt = params.output_format() if request.query_params.get("format") else "html"
        if kind == "usage":
            report: Any = await run_report(
                deps.runner, request, lambda g: usage_report(deps.db, query, guard=g)
            )
        else:
            report = await run_report(
                deps.runner, request, lambda g: savings_report(deps.db, deps.config, query, guard=g)
            )
        if fmt != "html":
            return with_headers(render(report, fmt, kind))
        report_json = orjson.loads(to_json(report))
    except SwitchboardError as exc:
        status, message = _page_error(exc)
        error = message
        if request.query_params.get("format"):
            raise
    chart = None
    if report_json is not None:
        money = "cost_micro_usd" if kind == "usage" else "saved_micro_usd"
        dims = report_json.get("group_by", report_json["query"]["group_by"])
        points = [
            (" / ".join(str(r.get(d) or "(none)") for d in dims) or "total", r[money] / 1e6)
            for r in report_json["rows"]
        ][:20]
        label = "cost per group (USD)" if kind == "usage" else "saved per group (USD)"
        chart = charts.bars(points, label=label, fmt=lambda v: f"${v:,.4f}")
    csv_query = request.url.include_query_params(format="csv").query
    return html(
        f"{kind}.html",
        status_code=400 if error else 200,
        user=user,
        page=kind,
        params=params,
        report=report_json,
        chart=chart,
        error=error,
        csv_href=f"/console/{kind}?{csv_query}",
    )


def install_console(app: FastAPI) -> None:
    """Serve the console at /console (config: console.enabled)."""
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    app.include_router(console_router())
    app.include_router(manage_router())

    async def on_login_required(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/console/api/"):
            body = {"error": {"message": "log in at /console/login", "type": "invalid_request_error"}}
            return with_headers(Response(orjson.dumps(body), status_code=401, media_type=_JSON))
        return with_headers(RedirectResponse("/console/login", status_code=303))

    async def on_refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        if request.url.path.startswith("/console/api/"):
            body = {"error": {"message": exc.message, "type": "invalid_request_error"}}
            return with_headers(Response(orjson.dumps(body), status_code=exc.status, media_type=_JSON))
        return html("error.html", status_code=exc.status, user=None, page="", message=exc.message)

    app.add_exception_handler(LoginRequired, on_login_required)
    app.add_exception_handler(Refused, on_refused)
