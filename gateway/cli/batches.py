"""`switchboard batches list|show|cancel`: the operator's view of `/v1/batches`, straight from SQL.

Any team's batches (the operator's scope). `show --watch` draws a progress bar until the batch ends.
Cancelling is the same state change the API makes: every replica's worker acts on it.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli.common import PIPED_TABLE_WIDTH, ConfigOpt, console, fail_usage, load, sql_engine

if TYPE_CHECKING:
    from gateway.store.batches import BatchStore

batches_app = typer.Typer(help="Inspect and cancel batches (/v1/batches).", no_args_is_help=True)
FINAL = ("completed", "failed", "expired", "cancelled")


def _store(config: ConfigOpt) -> BatchStore:
    from gateway.store.batches import BatchStore

    return BatchStore(sql_engine(load(config)))


def _out() -> Console:
    """Piped into a script or a file: one line per row rather than a table squeezed into 80 columns."""
    return console if console.is_terminal else Console(width=PIPED_TABLE_WIDTH)


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


@batches_app.command("list")
def batches_list(
    team: Annotated[str | None, typer.Option(help="Only this team's batches.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    config: ConfigOpt = None,
) -> None:
    """List batches, newest first."""
    store = _store(config)
    found, more = store.page(team, limit, None)
    counts = store.counts([b.id for b in found])
    table = Table("batch", "team", "endpoint", "status", "done", "failed", "total", "created")
    for b in found:
        c = counts[b.id]
        table.add_row(b.id, b.team, b.endpoint, b.status, str(c.completed), str(c.failed), str(c.total),
                      _when(b.created_at))  # fmt: skip
    _out().print(table)
    if more:
        console.print(f"(more than {limit}; use --limit)")


@batches_app.command("show")
def batches_show(
    batch_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="Follow its progress until it ends.")] = False,
    config: ConfigOpt = None,
) -> None:
    """One batch: its state, counts and files (with --watch, a progress bar until it ends)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    store = _store(config)
    batch = store.get(batch_id, None)
    if batch is None:
        fail_usage(f"no batch `{batch_id}` (see `switchboard batches list`)")
    if watch:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(batch.status, total=None)
            while True:
                batch = store.get(batch_id, None) or batch
                c = store.counts([batch_id])[batch_id]
                progress.update(
                    task, description=batch.status, completed=c.completed + c.failed, total=c.total
                )
                if batch.status in FINAL:
                    break
                time.sleep(0.5)
    c = store.counts([batch_id])[batch_id]
    table = Table(show_header=False)
    rows = [
        ("batch", batch.id), ("team", batch.team), ("endpoint", batch.endpoint), ("status", batch.status),
        ("input file", batch.input_file_id), ("output file", batch.output_file_id or ""),
        ("error file", batch.error_file_id or ""),
        ("items", f"{c.completed} done, {c.failed} failed, {c.queued} queued, {c.running} running"),
        ("total", str(c.total)),
        ("created", _when(batch.created_at)), ("window ends", _when(batch.expires_at)),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    _out().print(table)


@batches_app.command("cancel")
def batches_cancel(batch_id: str, config: ConfigOpt = None) -> None:
    """Cancel a batch: running items finish, the rest never run; its partial output is kept."""
    store = _store(config)
    batch = store.get(batch_id, None)
    if batch is None:
        fail_usage(f"no batch `{batch_id}` (see `switchboard batches list`)")
    values = {"status": "cancelling", "cancelling_at": dt.datetime.now(dt.UTC)}
    if store.update(batch_id, ["validating", "in_progress"], values):
        console.print(f"batch {batch_id}: cancelling (the workers stop it)")
    elif batch.status in ("cancelling", "cancelled"):
        console.print(f"batch {batch_id}: already {batch.status}")
    else:
        fail_usage(
            f"batch `{batch_id}` is {batch.status}; only a validating or in-progress batch can be cancelled"
        )
