"""The report pool: its own threads (the default executor stays free), a bounded queue, time limits, and
cancellation when the client goes away. Real threads, no I/O."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.errors import RateLimited, ReportTimedOut
from gateway.reports.runner import Guard, ReportCancelled, ReportRunner


def _blocking(release: threading.Event, started: threading.Event | None = None):  # noqa: ANN202
    def work(guard: Guard) -> str:
        if started is not None:
            started.set()
        while not release.wait(0.01):
            guard.check()
        return "done"

    return work


async def test_busy_reports_leave_the_default_executor_free() -> None:
    # Security finding: six long reports filled the default pool that key lookups also use.
    runner = ReportRunner(max_concurrent=2, max_queued=8, timeout_s=30)
    release = threading.Event()
    reports = [asyncio.ensure_future(runner.run(_blocking(release))) for _ in range(6)]
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        assert await asyncio.to_thread(lambda: "key lookup") == "key lookup"
    release.set()
    assert await asyncio.gather(*reports) == ["done"] * 6
    await runner.aclose()


async def test_a_full_queue_is_refused_at_once() -> None:
    runner = ReportRunner(max_concurrent=1, max_queued=1, timeout_s=30)
    release = threading.Event()
    held = [asyncio.ensure_future(runner.run(_blocking(release))) for _ in range(2)]
    await asyncio.sleep(0.02)
    with pytest.raises(RateLimited) as info:
        await runner.run(_blocking(release))
    assert "reports.max_concurrent" in info.value.message
    release.set()
    await asyncio.gather(*held)
    await runner.aclose()


async def test_a_client_that_leaves_stops_its_report() -> None:
    runner = ReportRunner(max_concurrent=1, max_queued=0, timeout_s=30)
    started, stopped = threading.Event(), threading.Event()

    def work(guard: Guard) -> str:
        started.set()
        try:
            while True:
                guard.check()
                threading.Event().wait(0.01)
        except ReportCancelled:
            stopped.set()
            raise

    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    job = asyncio.ensure_future(runner.run(work, until_gone=gone))
    await asyncio.to_thread(started.wait, 5)
    gone.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await job
    assert await asyncio.to_thread(stopped.wait, 5)
    # The slot is free again: the next report runs.
    assert await runner.run(lambda guard: "next") == "next"
    await runner.aclose()


async def test_a_report_past_its_time_limit_is_stopped_with_a_clear_error() -> None:
    runner = ReportRunner(max_concurrent=1, max_queued=0, timeout_s=0.05)
    with pytest.raises(ReportTimedOut) as info:
        await runner.run(_blocking(threading.Event()))
    assert info.value.status_code == 503 and "reports.timeout_s" in info.value.message
    await runner.aclose()


async def test_shutdown_stops_running_reports() -> None:
    runner = ReportRunner(max_concurrent=1, max_queued=0, timeout_s=300)
    started = threading.Event()
    job = asyncio.ensure_future(runner.run(_blocking(threading.Event(), started)))
    await asyncio.to_thread(started.wait, 5)
    async with asyncio.timeout(5):
        await runner.aclose()
    with pytest.raises(ReportTimedOut):
        await job
