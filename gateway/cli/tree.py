"""The `switchboard` command tree: every command group, for `main` (gateway/cli/__init__.py)."""

from __future__ import annotations

import typer

from gateway.cli import HELP, reports, serve
from gateway.cli.batches import batches_app
from gateway.cli.engine import engine_app
from gateway.cli.teams_keys import keys_app, teams_app
from gateway.edge.cli import edge_app

app = typer.Typer(help=HELP, no_args_is_help=True)
app.add_typer(teams_app, name="teams")
app.add_typer(keys_app, name="keys")
app.add_typer(engine_app, name="engine")
app.add_typer(edge_app, name="edge")
app.add_typer(batches_app, name="batches")
app.command()(serve.serve)
app.command()(serve.migrate)
app.command("check-config")(serve.check_config)
app.command()(reports.report)
app.command()(reports.rollup)
app.command()(reports.prune)
app.command()(serve.up)
