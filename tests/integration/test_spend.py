"""`spent_micro_usd` on SQLite and PostgreSQL: exactly one scope's rows within [start, end) of a period."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store.ledger import insert_usage_rows, usage_row
from gateway.store.spend import spent_micro_usd
from tests.support.db import QueryLog
from tests.support.usage import make_record

US = dt.timedelta(microseconds=1)
FEB = dt.datetime(2030, 2, 1, tzinfo=dt.UTC)
MAR = dt.datetime(2030, 3, 1, tzinfo=dt.UTC)
PLUS_2H = dt.timezone(dt.timedelta(hours=2))


def insert(engine: Engine, rows: list[tuple[dt.datetime, str, str | None, int]]) -> None:
    records = [
        make_record(i, created_at=at, team=team, key_id=key_id, cost_micro_usd=cost)
        for i, (at, team, key_id, cost) in enumerate(rows)
    ]
    insert_usage_rows(engine, [usage_row(r) for r in records])


def test_month_sums_exactly_the_rows_inside(engine: Engine) -> None:
    insert(
        engine,
        [
            (FEB, "research", "k1", 1),  # the period's first instant counts
            (FEB - US, "research", "k1", 10),  # January
            (MAR, "research", "k1", 100),  # the period's end belongs to March
            (MAR - US, "research", "k1", 1_000),
            (dt.datetime(2030, 2, 15, 12, tzinfo=dt.UTC), "research", "k2", 10_000),
            (dt.datetime(2030, 2, 10, tzinfo=dt.UTC), "ops", "k3", 100_000),  # another team and key
            (dt.datetime(2030, 2, 10, tzinfo=dt.UTC), "research", None, 1_000_000),  # no key (e.g. refused)
            # 00:30 on Mar 1 at +02:00 is 22:30 UTC on Feb 28: February, whatever the writer's zone.
            (dt.datetime(2030, 3, 1, 0, 30, tzinfo=PLUS_2H), "research", "k1", 10_000_000),
            (dt.datetime(2030, 2, 20, tzinfo=dt.UTC), "research", "k1", 9_000_000_000_000),  # beyond 32 bits
        ],
    )
    assert spent_micro_usd(engine, "team:research", "2030-02") == 9_000_011_011_001
    assert spent_micro_usd(engine, "key:k1", "2030-02") == 9_000_010_001_001
    assert spent_micro_usd(engine, "key:k2", "2030-02") == 10_000
    assert spent_micro_usd(engine, "team:ops", "2030-02") == 100_000
    assert spent_micro_usd(engine, "key:k3", "2030-02") == 100_000
    assert spent_micro_usd(engine, "team:research", "2030-01") == 10
    assert spent_micro_usd(engine, "team:research", "2030-03") == 100
    assert spent_micro_usd(engine, "team:nobody", "2030-02") == 0
    assert spent_micro_usd(engine, "key:research", "2030-02") == 0  # a key id, not a team name


def test_day_boundaries_and_year_end(engine: Engine) -> None:
    day = dt.datetime(2030, 12, 31, tzinfo=dt.UTC)
    next_year = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
    insert(
        engine,
        [
            (day, "t", "k", 1),
            (day - US, "t", "k", 10),
            (next_year - US, "t", "k", 100),
            (next_year, "t", "k", 1_000),
        ],
    )
    assert spent_micro_usd(engine, "team:t", "2030-12-31") == 101
    assert spent_micro_usd(engine, "key:k", "2030-12-30") == 10
    assert spent_micro_usd(engine, "key:k", "2031-01-01") == 1_000
    assert spent_micro_usd(engine, "team:t", "2030-12") == 111
    assert spent_micro_usd(engine, "team:t", "2031-01") == 1_000


@pytest.mark.parametrize("scope", ["team:research", "key:k1"])
def test_one_query_on_the_scope_index(engine: Engine, scope: str) -> None:
    insert(engine, [(FEB + dt.timedelta(hours=i), "research", "k1", 5) for i in range(50)])
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    log = QueryLog().attach(engine)
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        assert spent_micro_usd(engine, scope, "2030-02") == 250
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
        log.detach(engine)
    assert len(log.statements) == 1
    [(statement, params)] = seen
    index = "ix_usage_team_created_at" if scope.startswith("team:") else "ix_usage_key_id_created_at"
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = " ".join(
                str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            )
        else:
            conn.exec_driver_sql(
                "SET enable_seqscan = off"
            )  # 50 rows: make the planner show its index choice
            plan = " ".join(str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + statement, params))
    assert index in plan, plan


def test_bad_scope_or_period(engine: Engine) -> None:
    for scope in ["research", "team:", "user:x", ""]:
        with pytest.raises(ValueError, match="neither team:<name> nor key:<key id>"):
            spent_micro_usd(engine, scope, "2030-02")
    with pytest.raises(ValueError, match="period key"):
        spent_micro_usd(engine, "team:t", "2030-02-30")
