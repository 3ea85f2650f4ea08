"""The `switchboard` command (`main`); its tree is assembled in tree.py, one module per command group.

serve.py: serve, migrate, check-config, up (workers.py: `serve --workers N`); teams_keys.py: teams, keys;
engine.py: engine serve, engine info; reports.py: report, rollup, prune; batches.py: batches;
gateway/edge/cli.py: edge. Every command reads the same TOML config (`--config` or $SWITCHBOARD_CONFIG; none
means embedded defaults) and reports a config mistake as `path: what to change`, with exit status 2
(common.py).

`switchboard engine ...` assembles the engine's group alone: the engine's process then never imports the
gateway's config models, reports and tables (~6 MB resident for its whole life, against its idle-memory goal).
"""

from __future__ import annotations

import sys
from typing import Any

HELP = "Switchboard: one OpenAI-compatible endpoint for cloud, self-hosted and edge models."


def main() -> None:
    """Run the `switchboard` command named by sys.argv."""
    import typer

    if sys.argv[1:2] == ["engine"]:
        from gateway.cli.engine import engine_app

        root = typer.Typer(help=HELP, no_args_is_help=True)
        root.add_typer(engine_app, name="engine")
        root()
    else:
        from gateway.cli.tree import app

        app()


def __getattr__(name: str) -> Any:
    """`gateway.cli.app`: the whole command tree (for tests and callers that invoke it)."""
    if name == "app":
        from gateway.cli.tree import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
