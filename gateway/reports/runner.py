"""Reports off the request path: their own bounded thread pool, a time limit, and cancellation.

A report is synchronous SQL. Run on the default executor, a few long ones starved everything else that
uses it (key lookups among them), and kept running after their clients left. Here each report runs on a
pool of `reports.max_concurrent` threads that nothing else uses; at most `reports.max_queued` more wait,
and the rest are refused at once (429). A `Guard` stops a report at its deadline (`reports.timeout_s`) or
when its client goes away: between statements through the progress callback, and inside a statement
through the database (PostgreSQL `statement_timeout`, SQLite's progress handler).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from gateway.errors import GatewayError, RateLimited, ReportTimedOut

T = TypeVar("T")


class ReportCancelled(Exception):
    """Raised inside a report's thread when its guard trips."""


class Guard:
    """Stops one report: cancelled by the event loop, or past its deadline (monotonic seconds)."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.deadline = clock() + timeout_s
        self._clock = clock
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def tripped(self) -> bool:
        return self._cancelled.is_set() or self._clock() >= self.deadline

    def check(self, _done: int = 0, _total: int = 0) -> None:
        """A progress callback: raises between statements once tripped."""
        if self.tripped:
            raise ReportCancelled

    def arm(self, conn: Connection) -> None:
        """Bound the statements of `conn` too: one long statement must not outlive the guard."""
        if conn.dialect.name == "postgresql":
            remaining_ms = max(1, int((self.deadline - self._clock()) * 1000))
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {remaining_ms}")
        elif conn.dialect.name == "sqlite":
            raw: Any = conn.connection.dbapi_connection
            raw.set_progress_handler(lambda: 1 if self.tripped else 0, 10_000)

    @staticmethod
    def disarm(conn: Connection) -> None:
        if conn.dialect.name == "sqlite":
            raw: Any = conn.connection.dbapi_connection
            raw.set_progress_handler(None, 0)


class ReportRunner:
    """Owned by `Services`; `run` is called from the event loop."""

    def __init__(self, *, max_concurrent: int, max_queued: int, timeout_s: float) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="report")
        self._slots = max_concurrent + max_queued
        self._taken = 0
        self.timeout_s = timeout_s
        self._running: set[Guard] = set()

    async def run(self, work: Callable[[Guard], T], *, until_gone: asyncio.Future[Any] | None = None) -> T:
        """`work(guard)` on the report pool. `until_gone` resolves when the client leaves: the report is
        then cancelled. Raises RateLimited when the pool and its queue are full."""
        if self._taken >= self._slots:
            raise RateLimited(
                "too many reports are running or waiting; retry shortly (config: reports.max_concurrent, "
                "reports.max_queued)",
                retry_after_s=5.0,
            )
        self._taken += 1
        guard = Guard(self.timeout_s)
        self._running.add(guard)
        try:
            job = asyncio.get_running_loop().run_in_executor(self._pool, _guarded, work, guard)
            waiting: set[asyncio.Future[Any]] = {job} if until_gone is None else {job, until_gone}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not job.done():
                    guard.cancel()  # the client left, or this task was cancelled (shutdown)
            if not job.done():
                raise asyncio.CancelledError
            return job.result()
        finally:
            self._running.discard(guard)
            self._taken -= 1

    async def aclose(self) -> None:
        """Stop every running report and let their threads finish (shutdown must not wait on SQL)."""
        for guard in list(self._running):
            guard.cancel()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


def _guarded(work: Callable[[Guard], T], guard: Guard) -> T:
    try:
        return work(guard)
    except Exception as exc:
        if guard.tripped and not isinstance(exc, GatewayError):
            raise ReportTimedOut(
                f"the report did not finish within {guard.timeout_s:g} s; narrow `since`/`until` or the "
                "filters, or raise the limit (config: reports.timeout_s)"
            ) from None
        raise
