"""`switchboard edge ...`: enrollment tokens (`token create|list|revoke`) and the node agent (`serve`).

Token commands read the gateway's config for the database; `serve` needs no config: it runs the local
engine in an edge profile and dials the gateway (`backends.edge.node`). A token's plaintext is printed once,
on stdout alone, so `$(switchboard edge token create ...)`-style scripts can capture it.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from gateway.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

edge_app = typer.Typer(help="Edge nodes: enrollment tokens and the node agent.", no_args_is_help=True)
token_app = typer.Typer(
    help="Enrollment tokens for edge nodes (stored in SQL as hashes).", no_args_is_help=True
)
edge_app.add_typer(token_app, name="token")

console = Console()
err_console = Console(stderr=True)
PIPED_TABLE_WIDTH = 240

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="SWITCHBOARD_CONFIG", help="TOML config file (default: built-in)."),
]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option("--label", help="key=value; repeat for several (e.g. --label site=plant-7)."),
]


def _fail(message: str, status: int = 2) -> NoReturn:
    err_console.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(status)


def _db(path: Path | None) -> Engine:
    from gateway.store.db import make_engine, migrate

    try:
        cfg: Config = load_config(path)
    except ConfigError as exc:
        _fail(str(exc))
    migrate(cfg.database.url, cfg.database.schema_name)
    return make_engine(cfg.database.url, cfg.database.schema_name)


def _audited(action: str, target: Callable[[Any], str], detail: Callable[[Any], Any] | None = None) -> Any:
    """The audit row of a CLI write, written in the write's transaction."""
    from gateway.store import audit

    return audit.writer(audit.cli_actor(), action, target, detail)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="What the token is for, e.g. plant-7-line-2.")],
    label: LabelOpt = None,
    expires_in: Annotated[
        str | None, typer.Option(help="Expire after this long: 30m, 12h, 7d, 2w (default: never).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Create an enrollment token. Its labels override those its nodes report. Printed once, never stored."""
    from gateway.edge import tokens
    from gateway.errors import GatewayError

    now = dt.datetime.now(dt.UTC)
    try:
        labels = tokens.parse_labels(label or [], param="--label")
        expires = (
            None if expires_in is None else now + dt.timedelta(seconds=tokens.parse_duration_s(expires_in))
        )
        engine = _db(config)
        audited = _audited(
            "edge_token.create", lambda c: c.info.token_id, lambda c: {"name": name, "labels": dict(labels)}
        )
        created = tokens.create_token(
            engine, name=name, labels=labels, expires_at=expires, now=now, audited=audited
        )
    except GatewayError as exc:
        _fail(exc.message.replace("expires_in:", "--expires-in:"))
    info = created.info
    until = "never" if info.expires_at is None else info.expires_at.isoformat(timespec="seconds")
    err_console.print(f"edge token {info.token_id} ({name}; expires {until}); shown once, store it now:")
    print(created.plaintext)


@token_app.command("list")
def token_list(config: ConfigOpt = None) -> None:
    """List enrollment tokens (ids, names, labels, expiry; the tokens themselves are never stored)."""
    from gateway.edge import tokens
    from gateway.edge.api import token_view

    now = dt.datetime.now(dt.UTC)
    t = Table(Column("id", no_wrap=True), "name", "labels", "state", "created", "expires", "revoked")
    for info in tokens.list_tokens(_db(config)):
        view = token_view(info, now)
        labels = ", ".join(f"{k}={v}" for k, v in info.labels.items()) or "-"
        t.add_row(
            info.token_id,
            info.name,
            labels,
            str(view["state"]),
            str(view["created_at"]),
            str(view["expires_at"] or "-"),
            str(view["revoked_at"] or "-"),
        )
    (console if console.is_terminal else Console(width=PIPED_TABLE_WIDTH)).print(t)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (et_...).")], config: ConfigOpt = None
) -> None:
    """Revoke a token. Gateways disconnect its nodes within edge.token_check_s (default 2 s)."""
    from gateway.edge import tokens

    engine = _db(config)
    if (
        tokens.revoke_token(engine, token_id, audited=_audited("edge_token.revoke", lambda i: i.token_id))
        is None
    ):
        _fail(f"no edge token with id {token_id}; see `switchboard edge token list`", status=1)
    console.print(f"revoked {token_id}; its nodes are disconnected within edge.token_check_s")


@edge_app.command("serve")
def serve(
    gateway: Annotated[str, typer.Option(help="The gateway's URL, e.g. https://gw.example.com.")],
    token: Annotated[
        str,
        typer.Option(envvar="SWITCHBOARD_EDGE_TOKEN", help="Enrollment token (sbe_...).", show_default=False),
    ],
    node_id: Annotated[
        str | None, typer.Option(help="Stable node id (default: hostname + a random suffix).")
    ] = None,
    label: LabelOpt = None,
    usd_per_hour: Annotated[
        float, typer.Option(min=0, help="What this device costs per hour (routing).")
    ] = 0.0,
    model: Annotated[str | None, typer.Option(help="GGUF file, HF directory or pkg:PACKAGE/FILE.")] = None,
    served_name: Annotated[str, typer.Option(help="The model name the gateway routes to.")] = "smollm2",
    quant: Annotated[
        str, typer.Option(help="Weight quantization: auto (timed, cached) | none | int8 | int4.")
    ] = "auto",
    kv_cache_mb: Annotated[float, typer.Option(min=1, help="KV-cache budget in MiB.")] = 64.0,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded at once.")] = 8,
    max_pending: Annotated[
        int | None, typer.Option(min=1, help="Requests held at once (default: 4 x --max-batch).")
    ] = None,
    max_tokens_default: Annotated[
        int, typer.Option(min=1, help="Completion cap for requests without max_tokens.")
    ] = 512,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="PEM CA that signed the gateway's certificate (https/wss); default: system CAs."),
    ] = None,
) -> None:
    """Run an edge node: the local engine (int4, small KV cache) serves what the gateway sends over one
    outbound WebSocket.

    It reconnects with backoff after a drop, and stops (exit 2) if the gateway refuses the token."""
    from backends.edge.node import main_node
    from backends.edge.options import NodeOptions, default_node_id
    from backends.local.loader import DEFAULT_MODEL_SPEC
    from gateway.edge.tokens import parse_labels
    from gateway.errors import GatewayError

    try:
        labels = parse_labels(label or [], param="--label")
        options = NodeOptions(
            gateway_url=gateway,
            token=token,
            node_id=node_id or default_node_id(),
            labels=labels,
            usd_per_hour=usd_per_hour,
            served_name=served_name,
            quant=quant,
            kv_cache_mb=kv_cache_mb,
            threads=threads,
            max_batch=max_batch,
            max_pending=max_pending,
            max_tokens_default=max_tokens_default,
            model=model or DEFAULT_MODEL_SPEC,
            ca_file=None if ca_file is None else str(ca_file),
        )
    except GatewayError as exc:
        _fail(exc.message)
    except ValueError as exc:
        _fail(str(exc))
    sys.exit(main_node(options))
