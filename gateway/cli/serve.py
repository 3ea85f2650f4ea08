"""`switchboard serve`, `migrate`, `check-config` and `up`: running the gateway and checking its config.

`serve --workers N` (N > 1) hands over to gateway/cli/workers.py; one worker runs uvicorn in this process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from backends.edge.wire import CONNECT_PATH
from gateway.cli.common import ConfigOpt, console, err_console, fail_usage, load, load_for_serving
from gateway.config import (
    BackendConfig,
    CloudBackendConfig,
    ConfigError,
    DeploymentConfig,
    EdgeBackendConfig,
    OpenAIBackendConfig,
)


def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: server.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: server.port).")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Gateway processes sharing the port (SO_REUSEPORT, Linux). More than 1 needs redis.url, "
            "so that limits, budgets, cache and routing state are shared.",
        ),
    ] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request line.")] = False,
) -> None:
    """Run the gateway (applies migrations itself on SQLite)."""
    cfg = load_for_serving(config)
    bind_host, bind_port = host or cfg.server.host, port or cfg.server.port
    if workers > 1:
        from gateway.cli.workers import refusal, run_workers

        problem = refusal(cfg, workers)
        if problem is not None:
            fail_usage(problem)
        sys.exit(run_workers(cfg, bind_host, bind_port, workers, access_log=access_log))

    from gateway.http.app import create_app
    from gateway.http.server import run_server

    try:
        run_server(create_app(cfg), cfg, host=bind_host, port=bind_port, access_log=access_log)
    except ConfigError as exc:  # the TLS files named in [server]
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def migrate(config: ConfigOpt = None) -> None:
    """Apply database migrations (alembic upgrade head) to database.url."""
    from gateway.store.db import migrate as run_migrations

    cfg = load(config)
    run_migrations(cfg.database.url, cfg.database.schema_name)
    console.print(f"database at {_safe_url(cfg.database.url)} is up to date")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_config(path: Annotated[Path, typer.Argument(help="TOML config file to validate.")]) -> None:
    """Validate a config file and print its backends, models and teams."""
    cfg = load(path)
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


def up(
    config: ConfigOpt = None,
    engine_port: Annotated[int, typer.Option(help="Port for the bundled engine.")] = 8081,
    with_engine: Annotated[bool, typer.Option(help="Start the bundled engine too.")] = True,
) -> None:
    """Quickstart: start the bundled engine, create a demo key, print how to call it, and serve."""
    from gateway.cli.up import run_quickstart

    sys.exit(run_quickstart(load_for_serving(config), engine_port=engine_port, with_engine=with_engine))
