"""The rollup job's working set does not grow with the hour's rows.

It runs every `reports.rollup_interval_s` over every served row of the current hour. While its busy-time
sweep fetched 20_000 rows at a time, each run's peak grew with the hour's rows and the gateway's RSS kept
that high-water (bench/soak: a step at every run). Memory here is what tracemalloc traces, not timing.
"""

from __future__ import annotations

import datetime as dt
import tracemalloc
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.records import RequestStatus, UsageRecord
from gateway.store.db import usage
from gateway.store.ledger import insert_usage_rows, usage_row
from gateway.store.rollups import SWEEP_BATCH_ROWS, Rollup

HOUR0 = dt.datetime(2030, 5, 1, tzinfo=dt.UTC)
N = 2 * SWEEP_BATCH_ROWS  # rows in the hour at the first measured run; the second sees 4 N


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def add_served_rows(engine: Engine, first: int, n: int, written_at: dt.datetime) -> None:
    rows = [
        usage_row(
            UsageRecord(
                request_id=f"s{i:06d}",
                created_at=HOUR0 + dt.timedelta(milliseconds=100 * i),  # all in HOUR0's hour
                team="t",
                key_id=None,
                requested_model="m",
                backend=("gpu0", "cloud")[i % 2],
                served_model=None,
                prompt_tokens=1,
                completion_tokens=1,
                cost_micro_usd=1,
                latency_ms=150.0,
                ttft_ms=None,
                status=RequestStatus.OK,
                http_status=200,
                error_type=None,
                stream=False,
                endpoint="chat.completions",
            )
        )
        for i in range(first, first + n)
    ]
    insert_usage_rows(engine, rows, written_at=written_at)


def traced_peak(work: Callable[[], object]) -> int:
    """Bytes `work` allocated at its peak above what was traced when it started."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_a_run_over_four_times_the_rows_needs_no_more_memory(engine: Engine) -> None:
    clock = Clock(HOUR0 + dt.timedelta(minutes=50))
    rollup = Rollup(engine, clock=clock)
    add_served_rows(engine, 0, N, written_at=clock.now)
    rollup.run_once()  # the first run compiles and caches its statements
    clock.now += dt.timedelta(minutes=1)
    add_served_rows(engine, N, 1, written_at=clock.now)  # a new row: the hour is recomputed
    small = traced_peak(rollup.run_once)
    clock.now += dt.timedelta(minutes=1)
    add_served_rows(engine, N + 1, 3 * N, written_at=clock.now)
    large = traced_peak(rollup.run_once)

    # What holding the 3 N added rows (as the sweep reads them) takes, for scale:
    query = sa.select(usage.c.backend, usage.c.created_at, usage.c.latency_ms).limit(3 * N)
    with engine.connect() as conn:
        held = traced_peak(lambda: conn.execute(query).all())
    assert held > 3 * N * 50  # the measure sees rows at all
    assert large - small < held / 3, (small, large, held)
    busy = sa.text("SELECT sum(requests) FROM backend_busy_hourly")
    with engine.connect() as conn:
        assert conn.execute(busy).scalar_one() == 4 * N + 1  # and the sweep still saw every row
