"""`switchboard teams ...` and `switchboard keys ...`: teams and per-team API keys in the SQL store.

A key is printed once at creation and stored only as a hash; listings show display prefixes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from gateway.cli.common import (
    PIPED_TABLE_WIDTH,
    ConfigOpt,
    console,
    err_console,
    fail_usage,
    load,
    sql_engine,
)
from gateway.config import Config
from gateway.limits.base import BudgetPeriod

if TYPE_CHECKING:
    from gateway.records import KeyBudget

teams_app = typer.Typer(help="Manage teams (stored in SQL).", no_args_is_help=True)
keys_app = typer.Typer(help="Manage per-team API keys (stored in SQL as hashes).", no_args_is_help=True)


@teams_app.command("create")
def teams_create(
    name: str,
    models: Annotated[str | None, typer.Option(help="Comma-separated model names (default: all).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create a team (or update its model list)."""
    from gateway.store import keys

    model_list = _split(models)
    _check_models(load(config), model_list, "--models")
    engine = sql_engine(load(config))
    keys.create_team(
        engine,
        name,
        model_list,
        audited=_audited("team.create", lambda t: t.name, lambda t: {"models": model_list}),
    )
    console.print(f"team [bold]{name}[/bold] ready; models: {', '.join(model_list) if model_list else 'all'}")


@teams_app.command("list")
def teams_list(config: ConfigOpt = None) -> None:
    """List teams."""
    from gateway.store import keys

    t = Table("team", "models", "created")
    for team in keys.list_teams(sql_engine(load(config))):
        models = getattr(team, "models", None)
        t.add_row(team.name, ", ".join(models) if models else "all", str(getattr(team, "created_at", "")))
    console.print(t)


def _audited(action: str, target: Callable[[Any], str], detail: Callable[[Any], Any] | None = None) -> Any:
    """The audit row of a write made through the CLI, written in the write's transaction."""
    from gateway.store import audit

    return audit.writer(audit.cli_actor(), action, target, detail)


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
            fail_usage("--budget-period and --soft-budget-usd need --budget-usd")
        return None
    limit = _usd_option(usd, "--budget-usd")
    soft = None if soft_usd is None else _usd_option(soft_usd, "--soft-budget-usd")
    if soft is not None and soft > limit:
        fail_usage(f"--soft-budget-usd ({soft_usd}) must not exceed --budget-usd ({usd})")
    return KeyBudget(str(period or BudgetPeriod.MONTH), limit, soft)


def _usd_option(value: str, flag: str) -> int:
    from gateway.store.spend import usd_to_micro

    try:
        micro = usd_to_micro(value)
    except ValueError as exc:
        fail_usage(f"{flag}: {exc}")
    if micro <= 0:
        fail_usage(f"{flag} must be more than 0 USD, not {value}")
    return micro


def _limits_text(limit_requests: int | None, limit_tokens: int | None) -> str:
    parts = [f"{n} {unit}" for n, unit in ((limit_requests, "req"), (limit_tokens, "tok")) if n is not None]
    return ", ".join(parts) or "team's"


def _budget_text(budget: KeyBudget | None) -> str:
    from gateway.store.spend import micro_to_usd_text

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
    from gateway.errors import GatewayError
    from gateway.store import keys

    cfg = load(config)
    model_list = _split(models)
    _check_models(cfg, model_list, "--models")
    budget = _key_budget(budget_usd, budget_period, soft_budget_usd)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days) if expires_in_days else None
    engine = sql_engine(cfg)
    detail: dict[str, object] = {
        "team": team,
        "name": name,
        "models": model_list,
        "budget": _budget_text(budget),
        "limits": {"requests": requests, "tokens": tokens},
    }
    try:
        created = keys.create_key(
            engine,
            team,
            name=name,
            models=model_list,
            expires_at=expires,
            limit_requests=requests,
            limit_tokens=tokens,
            budget=budget,
            audited=_audited("key.create", lambda c: c.key_id, lambda c: detail),
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
    from gateway.store import keys

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
    for k in keys.list_keys(sql_engine(load(config)), team):
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
    from gateway.store import keys

    engine = sql_engine(load(config))
    if not keys.revoke_key(engine, key, audited=_audited("key.revoke", lambda key_id: key_id)):
        err_console.print(f"[red]no key with id or prefix {key}; see `switchboard keys list`[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {key}")
