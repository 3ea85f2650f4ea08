"""What every `switchboard` command shares: the consoles, the `--config` option and loading it.

A config mistake is reported as `path: what to change` with exit status 2; so is a bad option value.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from gateway.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

console = Console()
err_console = Console(stderr=True)
PIPED_TABLE_WIDTH = 240  # piped into a script or a file: one line per row rather than 80 squeezed columns

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="SWITCHBOARD_CONFIG", help="TOML config file (default: built-in)."),
]


def load(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def load_for_serving(path: Path | None) -> Config:
    """The config, refused (exit 2) when a secret it names is not in the environment."""
    from gateway.services.backends import missing_secrets

    cfg = load(path)
    problems = missing_secrets(cfg)
    if problems:
        err_console.print(f"[red]{ConfigError(str(path or 'built-in config'), problems)}[/red]")
        raise typer.Exit(2)
    return cfg


def sql_engine(config: Config) -> Engine:
    """The ledger database, migrated first."""
    from gateway.store.db import make_engine, migrate

    migrate(config.database.url, config.database.schema_name)
    return make_engine(config.database.url, config.database.schema_name)


def fail_usage(message: str) -> NoReturn:
    from rich.markup import escape

    # Escaped: messages quote user input and `switchboard[charts]`; soft-wrapped: one line, greppable.
    err_console.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(2)
