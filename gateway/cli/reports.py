"""`switchboard report`, `rollup` and `prune`: usage and savings from the SQL ledger, and its upkeep.

Reports go to stdout (table, CSV or JSON); progress and messages go to stderr, so piped output stays clean.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from gateway.cli.common import (
    PIPED_TABLE_WIDTH,
    ConfigOpt,
    console,
    err_console,
    fail_usage,
    load,
    sql_engine,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from rich.progress import TaskID

    from gateway.errors import GatewayError
    from gateway.store.rollups import RollupResult


class ReportFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


@contextmanager
def _progress_bar() -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback: a transient bar on a terminal's stderr once the report has more
    than one step; silent when stderr is not a terminal, so piped output stays clean."""
    from rich.progress import Progress

    bar = Progress(console=err_console, transient=True)
    task: list[TaskID] = []

    def progress(done: int, total: int) -> None:
        if not err_console.is_terminal or total <= 1:
            return
        if not task:
            bar.start()
            task.append(bar.add_task("report", total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield progress
    finally:
        bar.stop()


def report(
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated dimensions: team, key, model, backend, privacy, endpoint, batch, day, hour."
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Start (inclusive), UTC: 2026-11-01 or 2026-11-01T08:00.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="End (exclusive), UTC; default: no end.")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this requested (public) model.")] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Only this API, as the ledger names it, e.g. chat.completions.")
    ] = None,
    batch: Annotated[
        str | None,
        typer.Option(
            help="Only this batch id, `interactive` (requests of no batch) or `batch` (every batch's)."
        ),
    ] = None,
    fmt: Annotated[
        ReportFormat, typer.Option("--format", help="table (rich), or csv / json on stdout.")
    ] = ReportFormat.TABLE,
    source: Annotated[
        str,
        typer.Option(
            help="auto: hourly rollups where they cover the window; raw: ledger rows (exact percentiles); "
            "rollup: rollups only."
        ),
    ] = "auto",
    chart: Annotated[
        Path | None, typer.Option(help="Also draw cost per day as a PNG here (needs switchboard[charts]).")
    ] = None,
    chart_by: Annotated[str, typer.Option(help="Stack the chart's bars by team or backend.")] = "team",
    savings: Annotated[
        bool,
        typer.Option(
            help="Report what self-hosted serving, edge nodes and the cache saved against "
            "reports.reference_model."
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Usage and cost from the SQL ledger, grouped and filtered; optionally savings or a cost chart."""
    from gateway.errors import GatewayError
    from gateway.reports import parse_query, savings_report, usage_report
    from gateway.reports.chart import (
        ChartBy,
        ChartUnavailable,
        chart_query,
        draw_cost_chart,
        require_matplotlib,
    )
    from gateway.reports.render import to_csv, to_json, to_table

    cfg = load(config)
    if chart_by not in set(ChartBy):
        fail_usage(f"--chart-by: `{chart_by}` is not one of {', '.join(ChartBy)}")
    by = ChartBy(chart_by)
    try:
        query = parse_query(
            group_by, since, until, team=team, model=model, source=source, endpoint=endpoint, batch=batch
        )
        if chart is not None:
            require_matplotlib()  # before the query, not after it
        engine = sql_engine(cfg)
        with _progress_bar() as progress:
            result = (
                savings_report(engine, cfg, query)
                if savings
                else usage_report(engine, query, progress=progress)
            )
            chart_rows = None if chart is None else usage_report(engine, chart_query(query, by)).rows
    except GatewayError as exc:
        fail_usage(_cli_message(exc))
    except ChartUnavailable as exc:
        fail_usage(f"--chart: {exc}")
    if fmt is ReportFormat.JSON:
        sys.stdout.write(to_json(result).decode() + "\n")
    elif fmt is ReportFormat.CSV:
        sys.stdout.write(to_csv(result))
    else:
        (console if console.is_terminal else Console(width=PIPED_TABLE_WIDTH)).print(to_table(result))
    if chart is not None and chart_rows is not None:
        draw_cost_chart(chart_rows, by=by, path=chart)
        err_console.print(f"chart: cost per day by {by} written to {chart}")


def _cli_message(exc: GatewayError) -> str:
    """The error as the CLI's options name it: `--group-by: ...` rather than `group_by: ...`."""
    if not exc.param:
        return exc.message
    message = exc.message.removeprefix(f"{exc.param}: ")
    return f"--{exc.param.replace('_', '-')}: {message}"


def rollup(config: ConfigOpt = None) -> None:
    """Fold new ledger rows into the hourly rollups once (the gateway also does this every
    reports.rollup_interval_s)."""
    from gateway.store.rollups import Rollup

    console.print(_rollup_text(Rollup(sql_engine(load(config))).run_once()))


def _rollup_text(done: RollupResult) -> str:
    if done.skipped:
        return "rollup skipped: another process (a gateway replica?) is running it right now"
    text = f"rollup: recomputed {done.hours_recomputed} hours"
    if done.rows_added_late:
        text += f", added {done.rows_added_late} late rows to pruned hours"
    written = "" if done.watermark is None else done.watermark.isoformat(timespec="seconds")
    return text + f" in {done.elapsed_s:.2f} s; rollups hold every row written before {written}"


def prune(
    retention_days: Annotated[
        int | None,
        typer.Option(
            min=1, help="Delete ledger rows older than this many days (default: reports.retention_days)."
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Delete raw ledger rows past retention, after rolling them up; reports keep working from rollups."""
    from gateway.store.rollups import Rollup

    cfg = load(config)
    days = retention_days or cfg.reports.retention_days
    if days is None:
        fail_usage("nothing to prune: pass --retention-days N, or set reports.retention_days in the config")
    deleted = Rollup(sql_engine(cfg)).prune(days)
    console.print(
        f"pruned {deleted} ledger rows created more than {days} days ago (their hourly rollups stay)"
    )
