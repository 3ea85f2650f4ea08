"""The `switchboard` command, assembled from one module per command group.

serve.py: serve, migrate, check-config, up (workers.py: `serve --workers N`); teams_keys.py: teams, keys;
engine.py: engine serve; reports.py: report, rollup, prune; batches.py: batches; gateway/edge/cli.py: edge.
Every command reads the same TOML config (`--config` or $SWITCHBOARD_CONFIG; none means embedded defaults)
and reports a config mistake as `path: what to change`, with exit status 2 (common.py).
"""

from __future__ import annotations

import typer

from gateway.cli import reports, serve
from gateway.cli.batches import batches_app
from gateway.cli.engine import engine_app
from gateway.cli.teams_keys import keys_app, teams_app
from gateway.edge.cli import edge_app

app = typer.Typer(
    help="Switchboard: one OpenAI-compatible endpoint for cloud, self-hosted and edge models.",
    no_args_is_help=True,
)
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
