"""A batch's files: its input read line by line into items, and its output and error files written at the end.

Invariants: the input file is streamed, never held whole; every non-blank line becomes one item, a bad
line (gateway/files/batch_lines.py) an item that already has its error-file entry, so a bad line never
fails the batch. Items are inserted idempotently, so a validator that died midway is simply run again.
Output and error files get ids derived from the batch id, and writing them is idempotent too: a finalizer
that died midway is run again by another worker and produces the same files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.files.batch_lines import LineChecker, LineError
from gateway.files.service import FileService
from gateway.store.batches import BatchStore, StoredBatch

INSERT_ROWS = 500  # items inserted per statement
READ_RESULTS = 1000  # results read per query when writing a file


async def lines_of(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """(1-based line number, text) of each non-blank line."""
    pending = b""
    number = 0
    async for chunk in chunks:
        pending += chunk
        *whole, pending = pending.split(b"\n")
        for line in whole:
            number += 1
            if line.strip():
                yield number, line
    if pending.strip():
        yield number + 1, pending


def item_row(batch_id: str, checked: Any) -> dict[str, Any]:
    if isinstance(checked, LineError):
        entry = checked.error_entry("batch_req_" + uuid.uuid4().hex)
        return {
            "batch_id": batch_id,
            "line": checked.line,
            "custom_id": checked.custom_id,
            "state": "failed",
            "body": None,
            "result": entry,
        }
    return {
        "batch_id": batch_id,
        "line": checked.line,
        "custom_id": checked.custom_id,
        "state": "queued",
        "body": dict(checked.body),
        "result": None,
    }


async def read_input(store: BatchStore, files: FileService, batch: StoredBatch) -> None:
    """Turn the input file into items (the batch stays `validating` until this returns)."""
    checker = LineChecker(batch.endpoint)
    _, chunks = await files.content(batch.input_file_id, batch.team)
    rows: list[dict[str, Any]] = []
    async for number, text in lines_of(chunks):
        rows.append(item_row(batch.id, checker.check(number, text)))
        if len(rows) >= INSERT_ROWS:
            await store.run(store.add_items, rows)
            rows = []
    await store.run(store.add_items, rows)


def derived_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


async def _results(store: BatchStore, batch_id: str, state: str) -> AsyncIterator[bytes]:
    after = 0
    while True:
        page = await store.run(store.results, batch_id, state, after, READ_RESULTS)
        if not page:
            return
        yield b"".join(orjson.dumps(result) + b"\n" for _, result in page)
        after = page[-1][0]


async def write_results(
    store: BatchStore, files: FileService, batch: StoredBatch, *, has_output: bool, has_errors: bool
) -> tuple[str | None, str | None]:
    """The output file (answered items) and the error file (failed ones); None where there is nothing."""
    now = dt.datetime.now(dt.UTC)
    ids: list[str | None] = []
    for kind, state, wanted in (("output", "done", has_output), ("error", "failed", has_errors)):
        if not wanted:
            ids.append(None)
            continue
        file_id = derived_file_id(batch.id, kind)
        chunks = _results(store, batch.id, state)
        name = f"{batch.id}_{kind}.jsonl"
        await files.write(file_id, chunks, team=batch.team, filename=name, purpose="batch_output", now=now)
        ids.append(file_id)
    return ids[0], ids[1]
