"""The usage ledger writer: one row per request, written off the hot path, never dropped.

`record()` only enqueues (or, when the queue is full or the writer is closed, appends to the spill file).
A writer task inserts batches with `ON CONFLICT (request_id) DO NOTHING`, so every insert is idempotent and a
record may safely be written twice. When the database is unreachable, batches go to the spill file (JSON
lines, fsynced) and a replay task inserts them once it is back: it first renames the spill file to
`<spill>.replaying`, inserts it, then deletes it; a crash at any step leaves a file that the next start
replays. Rows the database refuses as bad data (not an outage) go to `<spill>.rejected` for a human.
Each insert stamps `written_at` (the batch's UTC time, also for replayed rows); spill lines never carry it.
Spill lines written by an older version lack newer fields; they replay with the `UsageRecord` defaults
(and the endpoint `LEGACY_ENDPOINT`: only chat completions were recorded before the field existed).
With a `Journal` (gateway/store/journal.py), `record()` first appends the row there, before the response is
sent; the row is released from it once inserted, spilled or rejected, and journals left by a killed process
are replayed like the spill file. All methods must be called from the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from gateway.records import LEGACY_ENDPOINT, RequestStatus, UsageRecord
from gateway.store.db import usage
from gateway.store.journal import Journal, Segment

log = logging.getLogger(__name__)

Row = dict[str, Any]
_POLL_S = 0.25  # how soon an idle writer notices aclose()
_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
# A record on its way: its row, the row's JSON line and the journal segment holding it (None: not journaled).
Entry = tuple[Row, bytes, Segment | None]


def usage_row(rec: UsageRecord) -> Row:
    """The `usage` table row for a record (also the spill file's JSON object)."""
    row = {name: getattr(rec, name) for name in _FIELDS}
    row["status"] = str(rec.status)
    return row


def _row_from_json(line: bytes) -> Row:
    """Parse and validate one spill line; raises ValueError/TypeError/KeyError on a malformed one."""
    obj = orjson.loads(line)
    obj["created_at"] = dt.datetime.fromisoformat(obj["created_at"])
    obj["status"] = RequestStatus(obj["status"])
    obj.setdefault("endpoint", LEGACY_ENDPOINT)
    return usage_row(UsageRecord(**obj))


def _is_outage(exc: DBAPIError) -> bool:
    """Connection trouble (retry later) as opposed to the database refusing the data."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def insert_usage_rows(engine: Engine, rows: list[Row], *, written_at: dt.datetime | None = None) -> None:
    """One idempotent executemany insert; rows whose request_id exists are skipped. Every row is stamped
    `written_at` (default: now), which tells the rollups it is new even when its created_at is old."""
    name = engine.dialect.name
    if name == "postgresql":
        stmt: Any = postgresql.insert(usage).on_conflict_do_nothing(index_elements=["request_id"])
    elif name == "sqlite":
        stmt = sqlite.insert(usage).on_conflict_do_nothing(index_elements=["request_id"])
    else:
        raise ValueError(f"the ledger supports sqlite and postgresql, not {name} (config: database.url)")
    stamp = written_at or _utc_now()
    with engine.begin() as conn:
        conn.execute(stmt, [{**row, "written_at": stamp} for row in rows])


class LedgerWriter:
    """Batches usage records into SQL; see the module docstring for the no-loss protocol."""

    def __init__(
        self,
        engine: Engine,
        *,
        spill_path: str,
        queue_max: int,
        batch_max: int,
        flush_interval_s: float,
        replay_interval_s: float,
        close_timeout_s: float = 10.0,
        clock: Callable[[], dt.datetime] = _utc_now,
        journal: Journal | None = None,
    ) -> None:
        self._engine = engine
        self._journal = journal
        self._clock = clock  # stamps usage.written_at
        self._spill_path = Path(spill_path)
        self._replaying_path = Path(spill_path + ".replaying")
        self._rejected_path = Path(spill_path + ".rejected")
        self._batch_max = batch_max
        self._flush_interval_s = flush_interval_s
        self._replay_interval_s = replay_interval_s
        self._close_timeout_s = close_timeout_s
        self._queue: asyncio.Queue[Entry] = asyncio.Queue(maxsize=queue_max)
        self._replay_lock = asyncio.Lock()
        self._rejected_lock = threading.Lock()  # rejected rows are written from worker threads
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: list[Entry] = []
        self._closing = False
        self._closed = False
        self._db_down = False
        self.written = 0  # rows inserted by the writer
        self.spilled = 0  # records appended to the spill file
        self.replayed = 0  # spilled rows inserted (or found already present) by the replay task
        self.rejected = 0  # rows the database refused as bad data, kept in <spill>.rejected
        self.lost = 0  # records neither inserted nor spilled (the spill file could not be written)
        self.recovered = 0  # rows replayed from journals of killed processes (inserted or already present)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def journal_failed(self) -> int:
        return self._journal.failed if self._journal is not None else 0

    @property
    def db_down(self) -> bool:
        """True after a failed insert until a replay (or ping) succeeds; records go to the spill file."""
        return self._db_down

    def start(self) -> None:
        """Start the writer and replay tasks; replays any spill file left by a previous run at once."""
        if self._tasks:
            raise RuntimeError("LedgerWriter.start() was called twice")
        self._spill_path.parent.mkdir(parents=True, exist_ok=True)
        if self._journal is not None:
            self._journal.start()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="ledger-writer"),
            asyncio.create_task(self._replay_loop(), name="ledger-replay"),
        ]

    def record(self, rec: UsageRecord) -> None:
        """Journal and queue one record; never blocks, never raises."""
        row = usage_row(rec)
        line = orjson.dumps(row)
        entry = (row, line, None if self._journal is None or self._closed else self._journal.append(line))
        if self._closed:
            self._spill([entry])
            return
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self._spill([entry])

    async def aclose(self) -> None:
        """Write (or spill) everything queued, try one last replay, then stop the tasks."""
        if not self._tasks or self._closing:
            self._closed = True
            return
        self._closing = True
        self._stop.set()
        writer, replayer = self._tasks
        try:
            await asyncio.wait_for(asyncio.shield(writer), self._close_timeout_s)
        except TimeoutError:
            # A hung insert: spill what it held too; ON CONFLICT absorbs it if the insert lands after all.
            leftover = list(self._inflight)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            while not self._queue.empty():
                leftover.append(self._queue.get_nowait())
            self._spill(leftover)
        self._closed = True
        await asyncio.gather(replayer, return_exceptions=True)
        try:
            await asyncio.wait_for(self._replay_once(), self._close_timeout_s)
        except (DBAPIError, TimeoutError) as exc:
            log.warning(
                "usage ledger: spilled records stay in %s for the next start (%s)", self._spill_path, exc
            )
        if self._journal is not None:
            await self._journal.aclose(self._close_timeout_s)

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """Readiness: can the database answer `SELECT 1` within `timeout_s`?"""
        try:
            await asyncio.wait_for(asyncio.to_thread(self._select_one), timeout_s)
        except (DBAPIError, TimeoutError):
            return False
        return True

    def _select_one(self) -> None:
        with self._engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    async def _write_loop(self) -> None:
        while not (self._closing and self._queue.empty()):
            try:
                # A timed get, so that aclose() is noticed while idle. `asyncio.timeout`, not `wait_for`: on
                # Python 3.11 wait_for wraps the get in a task of its own, so the loop's task count would
                # flicker (bench/soak and the task gauge read it as a leak).
                async with asyncio.timeout(min(self._flush_interval_s, _POLL_S)):
                    first = await self._queue.get()
            except TimeoutError:
                continue
            if self._queue.qsize() + 1 < self._batch_max:
                await self._pause(self._flush_interval_s)  # let a batch gather
            batch = [first]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when aclose() is called."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: no task of its own (see _write_loop)
                await self._stop.wait()

    async def _write(self, batch: list[Entry]) -> None:
        if self._db_down:
            self._spill(batch)
            return
        self._inflight = batch
        try:
            accepted = await asyncio.to_thread(self._insert_or_reject, [row for row, _, _ in batch])
        except DBAPIError as exc:
            log.warning("usage ledger: database unreachable, spilling to %s (%s)", self._spill_path, exc)
            self._db_down = True
            self._spill(batch)
        else:
            self.written += accepted
            self._release(batch)  # inserted, already present, or kept in the rejected file
        self._inflight = []

    def _release(self, entries: list[Entry]) -> None:
        if self._journal is not None:
            for _, _, seg in entries:
                if seg is not None:
                    self._journal.release(seg)

    def _insert_or_reject(self, rows: list[Row]) -> int:
        """Insert rows; rows the database refuses one by one go to the rejected file. Returns how many
        were accepted (inserted or already present). Raises DBAPIError on an outage."""
        written_at = self._clock()
        try:
            insert_usage_rows(self._engine, rows, written_at=written_at)
            return len(rows)
        except DBAPIError as exc:
            if _is_outage(exc):
                raise
            log.error(
                "usage ledger: a batch of %d rows was refused (%s); retrying row by row", len(rows), exc
            )
        refused: list[Row] = []
        for row in rows:
            try:
                insert_usage_rows(self._engine, [row], written_at=written_at)
            except DBAPIError as exc:
                if _is_outage(exc):
                    raise
                refused.append(row)
        self._reject([orjson.dumps(row) for row in refused])
        return len(rows) - len(refused)

    def _reject(self, lines: list[bytes]) -> None:
        if not lines:
            return
        with self._rejected_lock:
            self.rejected += len(lines)
            log.error(
                "usage ledger: %d rows kept in %s; fix and re-import them", len(lines), self._rejected_path
            )
            _append_lines(self._rejected_path, lines)

    def _spill(self, entries: list[Entry]) -> None:
        if not entries:
            return
        try:
            _append_lines(self._spill_path, [line for _, line, _ in entries])
        except OSError as exc:
            self.lost += len(entries)  # unless journaled: its segment is kept and replayed at the next start
            log.error(
                "usage ledger: LOST %d records, cannot write %s: %s", len(entries), self._spill_path, exc
            )
            return
        self.spilled += len(entries)
        self._release(entries)

    async def _replay_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self._replay_once()
            except DBAPIError as exc:
                log.debug("usage ledger: replay failed, will retry (%s)", exc)
            await self._pause(self._replay_interval_s)

    async def _replay_once(self) -> None:
        """Insert `.replaying`, then the spill file (renamed to `.replaying` first). Raises DBAPIError
        when the database is still unreachable; the files then stay for the next try."""
        async with self._replay_lock:
            if self._journal is not None:
                self.recovered += await asyncio.to_thread(self._journal.replay, self._replay_journal)
            for _ in range(2):
                if not self._replaying_path.exists():
                    if not _has_data(self._spill_path):
                        break
                    # Safe against concurrent spills: they run on this thread and reopen the path each time.
                    os.replace(self._spill_path, self._replaying_path)
                count = await asyncio.to_thread(self._replay_file, self._replaying_path)
                self._replaying_path.unlink()
                self.replayed += count
                if self._db_down:
                    log.warning("usage ledger: database is back; replayed %d spilled rows", count)
                self._db_down = False
            if self._db_down and await self.ping():
                self._db_down = False

    def _replay_journal(self, path: Path) -> int:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if data[end:].strip(b"\0"):  # the process died mid-write, so that row's response was never sent
            log.warning("usage ledger: skipped a line cut short at the end of %s", path)
        return self._replay_file(path, data[:end])

    def _replay_file(self, path: Path, data: bytes | None = None) -> int:
        """Insert the file's rows `batch_max` at a time as they are read: a long outage's spill file is
        never held whole, nor all its rows at once (the replay's working set, which the process's RSS
        keeps as high-water, does not grow with the outage). Bad lines go to the rejected file."""
        rows: list[Row] = []
        bad: list[bytes] = []
        accepted = 0
        with path.open("rb") if data is None else io.BytesIO(data) as lines:
            for line in lines:
                if not line.strip(b" \t\r\n\0"):  # NULs: a file's unwritten tail after a machine crash
                    continue
                try:
                    rows.append(_row_from_json(line))
                except (ValueError, TypeError, KeyError):
                    bad.append(line.rstrip(b"\r\n"))  # e.g. a line cut short by a crash mid-write
                if len(rows) == self._batch_max:
                    accepted += self._insert_or_reject(rows)
                    rows = []
        self._reject(bad)
        if rows:
            accepted += self._insert_or_reject(rows)
        return accepted


def _has_data(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _append_lines(path: Path, lines: list[bytes]) -> None:
    """Append whole lines and fsync (and the directory, for a new file): a spilled record survives a crash."""
    is_new = not path.exists()
    with open(path, "ab") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    if is_new:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
