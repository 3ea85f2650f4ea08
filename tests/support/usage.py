"""Builders for `UsageRecord`s in tests, and a reader of the `usage` table back into records."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.records import RequestStatus, UsageRecord
from gateway.store.db import usage

BASE_TIME = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def make_record(i: int = 0, **overrides: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "request_id": f"req-{i:06d}",
        "created_at": BASE_TIME + dt.timedelta(milliseconds=i),
        "team": "research",
        "key_id": "k1",
        "requested_model": "smollm2",
        "backend": "local",
        "served_model": "smollm2-135m",
        "prompt_tokens": 10 + i,
        "completion_tokens": 20 + i,
        "cost_micro_usd": 1000 + i,
        "latency_ms": 12.5 + i,
        "ttft_ms": 3.25,
        "status": RequestStatus.OK,
        "http_status": 200,
        "error_type": None,
        "stream": False,
        "endpoint": "chat.completions",
    }
    fields.update(overrides)
    return UsageRecord(**fields)


def read_usage(engine: Engine) -> list[UsageRecord]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage).order_by(usage.c.request_id)).mappings().all()
    names = {f.name for f in dataclasses.fields(UsageRecord)}
    return [
        UsageRecord(**{**{k: v for k, v in r.items() if k in names}, "status": RequestStatus(r["status"])})
        for r in rows
    ]


def count_usage(engine: Engine) -> tuple[int, int]:
    """(rows, distinct request ids)."""
    with engine.connect() as conn:
        total, distinct = conn.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(usage.c.request_id)))
        ).one()
    return int(total), int(distinct)


def wait_for_usage_row(engine: Engine, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The ledger row for a request, once the writer has flushed it (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as conn:
            row = conn.execute(sa.select(usage).where(usage.c.request_id == request_id)).mappings().first()
        if row is not None:
            return dict(row)
        if time.monotonic() > deadline:
            raise AssertionError(f"no ledger row for request {request_id} after {timeout_s} s")
        time.sleep(0.02)
