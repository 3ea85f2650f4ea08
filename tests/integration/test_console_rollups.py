"""The console's long windows from rollups equal the raw ledger (SQLite and PostgreSQL): the overview's
per-day pass over the coarse rollups, the savings report's cache hits from the rollups' cache columns, and
migration 0014's backfill of both from a 0013 database.

Raw-ledger answers come from `Source.RAW` reports and from the generated rows in Python.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections import defaultdict
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine

from gateway.config import Config, parse_config
from gateway.console.overview import overview
from gateway.live import histogram
from gateway.reports import (
    Dimension,
    ReportQuery,
    ServedBy,
    Source,
    parse_query,
    savings_report,
    sql,
    usage_report,
)
from gateway.reports.runner import Guard
from gateway.store import db, rollups
from gateway.store.rollups import Rollup
from tests.support.db import DbTarget
from tests.support.ledger_gen import LedgerSpec, Row, generate_rows, insert_rows

pytestmark = pytest.mark.slow  # thousands of generated rows and a rollup, on each database

SPEC = LedgerSpec(rows=2_500, hours=5 * 24 + 7)  # crosses five UTC midnights
H = dt.timedelta(hours=1)
# A window that opens and closes mid-hour and mid-day: hourly rollups at both ends, daily ones between,
# raw rows for the partial hours.
SINCE = SPEC.start + dt.timedelta(hours=5, minutes=17)
UNTIL = SPEC.start + dt.timedelta(days=4, hours=20, minutes=41)


def rolled_up(engine: Engine) -> list[Row]:
    rows = list(generate_rows(SPEC))
    insert_rows(engine, rows)
    Rollup(engine, clock=lambda: SPEC.start + dt.timedelta(days=30)).run_once()
    return rows


def config() -> Config:
    return parse_config(
        {
            "backends": {
                "gpu0": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "usd_per_hour": "3.6"},
                "cloud": {"kind": "cloud", "provider": "openai"},
            },
            "models": {
                "gpt-4o-mini": {"backend": "cloud", "input_usd_per_mtok": 1, "output_usd_per_mtok": 4}
            },
            "reports": {"reference_input_usd_per_mtok": "2.5", "reference_output_usd_per_mtok": "10"},
        }
    )


@pytest.mark.parametrize("group_by", ["", "team"])
@pytest.mark.parametrize("model", [None, "gpt-4o-mini"])
def test_savings_from_rollups_equal_the_raw_ledger(engine: Engine, group_by: str, model: str | None) -> None:
    """Rollup and AUTO savings (cache hits from the rollups' cache columns) equal the raw report row for row,
    and the cache rows equal the generated cache hits summed in Python."""
    rows = rolled_up(engine)
    cfg = config()

    def report(source: str) -> Any:
        query = parse_query(group_by, SINCE.isoformat(), UNTIL.isoformat(), model=model, source=source)
        return savings_report(engine, cfg, query)

    raw, rollup, auto = report("raw"), report("rollup"), report("auto")
    assert rollup.source == "rollup" and raw.source == "raw"
    for got in (rollup, auto):
        assert got.rows == raw.rows and got.totals == raw.totals and got.owned == raw.owned
    since, until = SINCE.replace(minute=0), UNTIL.replace(minute=0) + H  # savings read whole hours
    want: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        if (
            row["cache_hit"]
            and since <= row["created_at"] < until
            and model in (None, row["requested_model"])
        ):
            key = (row["team"], row["backend"]) if group_by else (row["backend"],)
            have = want[tuple(v or None for v in key)]
            have[0], have[1], have[2] = (
                have[0] + 1,
                have[1] + row["prompt_tokens"],
                have[2] + row["completion_tokens"],
            )
    cache = {
        r.group: [r.requests, r.prompt_tokens, r.completion_tokens]
        for r in rollup.rows
        if r.served_by is ServedBy.CACHE
    }
    assert cache == dict(want) and sum(n for n, _, _ in want.values()) > 20


SUMS = ("requests", "errors", "prompt_tokens", "cost_micro_usd", "cache_hits", "owned_micro_usd")


def sums(report_rows: Any) -> dict[Any, tuple[int, ...]]:
    return {r.group: tuple(getattr(r, f) for f in SUMS) for r in report_rows}


@pytest.mark.parametrize("team", [None, SPEC.teams[1]])
def test_overview_per_day_from_coarse_rollups_equals_the_raw_ledger(engine: Engine, team: str | None) -> None:
    """A window past 3 days: one pass grouped by (day, team, backend) over usage_daily_coarse,
    usage_hourly_coarse and raw rows; its totals, teams, backends and days equal raw reports."""
    rolled_up(engine)
    view = overview(engine, SINCE, UNTIL, team, Guard(60))
    assert view.source == "rollup" and view.series_unit == "day"

    def raw(*dims: Dimension) -> Any:
        return usage_report(engine, ReportQuery(dims, SINCE, UNTIL, team=team, source=Source.RAW))

    by_team = raw(Dimension.TEAM)
    assert sums([view.totals]) == sums([by_team.totals])
    assert sums(view.by_team) == sums(by_team.rows)
    assert sums(view.by_backend) == sums(raw(Dimension.BACKEND).rows)
    per_day = raw(Dimension.DAY).rows
    assert list(view.series) == [(r.group[0], r.requests, r.errors) for r in per_day] and len(per_day) == 5
    costs = [r.cost_micro_usd for r in view.by_team]
    assert costs == sorted(costs, reverse=True) and (
        team is None or [r.group for r in view.by_team] == [(team,)]
    )


def test_migration_0013_to_0014_fills_cache_columns_and_coarse_rollups(db_target: DbTarget) -> None:
    """A 0013 database's rollups gain the cache columns (from raw rows; hours already pruned keep 0) and the
    coarse copies; the next rollup run keeps them equal to the ledger; the downgrade removes them."""
    if db_target.schema is not None:
        admin = db.make_engine(db_target.url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{db_target.schema}"')
        admin.dispose()
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.upgrade(cfg, "0013")
    eng = db_target.make_engine()
    spec = dataclasses.replace(SPEC, rows=800, hours=50)
    rows = list(generate_rows(spec))
    pruned_before = spec.start + dt.timedelta(hours=10)
    try:
        insert_rows(eng, rows)
        _roll_up_as_0013(eng, pruned_before)
        command.upgrade(cfg, "0014")
        hourly = _read(
            eng,
            db.usage_hourly,
            ("hour", "team", "key_id", "model", "backend", "privacy", "endpoint", "batch_id"),
        )
        want = _cache_sums(rows, pruned_before)
        got = {
            k: tuple(m[c] for c in db.CACHE_MEASURES)
            for k, m in hourly.items()
            if any(m[c] for c in db.CACHE_MEASURES)
        }
        assert got == want and len(want) > 10
        _assert_derived(eng)
        Rollup(eng, clock=lambda: spec.start + dt.timedelta(days=30)).run_once()
        _assert_derived(eng)
        command.downgrade(cfg, "0013")
        tables = sa.inspect(eng).get_table_names()
        assert "usage_hourly_coarse" not in tables and "usage_daily_coarse" not in tables
        assert "cache_prompt_tokens" not in {c["name"] for c in sa.inspect(eng).get_columns("usage_hourly")}
    finally:
        eng.dispose()


def _roll_up_as_0013(eng: Engine, pruned_before: dt.datetime) -> None:
    """usage_hourly and usage_daily as a 0013 gateway's rollup and prune left them (no cache columns)."""
    hourly = sa.table(
        "usage_hourly",
        *(sa.column(c.name) for c in db.usage_hourly.columns if c.name not in db.CACHE_MEASURES),
    )
    keys = [c.name for c in db.usage_hourly.primary_key.columns]
    measures = [
        c.name for c in db.usage_hourly.columns if not c.primary_key and c.name not in db.CACHE_MEASURES
    ]
    grouped = rollups._group_select(eng.dialect.name == "postgresql").subquery()  # 0014's columns last
    select = sa.select(*list(grouped.c)[: len(keys) + len(measures)])
    with eng.begin() as conn:
        conn.execute(sa.insert(hourly).from_select([*keys, *measures], select))
        conn.execute(sa.delete(db.usage).where(db.usage.c.created_at < pruned_before))
        conn.execute(
            sa.insert(db.rollup_state).values(
                name="usage",
                watermark=pruned_before + dt.timedelta(days=30),
                pruned_before=pruned_before,
                updated_at=pruned_before,
            )
        )
        day = (
            "date_trunc('day', hour, 'UTC')"
            if eng.dialect.name == "postgresql"
            else "substr(hour, 1, 10) || ' 00:00:00.000000'"
        )
        names = ", ".join(keys[1:])
        conn.exec_driver_sql(
            f"INSERT INTO usage_daily (hour, {names}, {', '.join(measures)}) SELECT {day}, {names}, "
            f"{', '.join(f'sum({m})' for m in measures)} FROM usage_hourly GROUP BY {day}, {names}"
        )


def _cache_sums(rows: list[Row], pruned_before: dt.datetime) -> dict[tuple[Any, ...], tuple[int, ...]]:
    out: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in rows:
        if not r["cache_hit"] or r["created_at"] < pruned_before:
            continue
        key = (
            r["created_at"].replace(minute=0, second=0, microsecond=0), r["team"], r["key_id"] or "",
            r["requested_model"][:200], r["backend"] or "", (r["privacy_class"] or "").partition(":")[0],
            r["endpoint"], r["batch_id"] or "",
        )  # fmt: skip
        have = out[key]
        for i, name in enumerate(("prompt_tokens", "completion_tokens", "cost_micro_usd", "owned_micro_usd")):
            have[i] += r.get(name, 0)
    return {k: tuple(v) for k, v in out.items() if any(v)}


def _read(eng: Engine, table: sa.Table, keys: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]]:
    with eng.connect() as conn:
        found = conn.execute(sa.select(table)).mappings().all()
    return {tuple(r[k] for k in keys): {k: v for k, v in r.items() if k not in keys} for r in found}


def _assert_derived(eng: Engine) -> None:
    """usage_daily and the coarse copies hold usage_hourly's measures summed per day and coarse key."""
    full = ("hour", "team", "key_id", "model", "backend", "privacy", "endpoint", "batch_id")
    hourly = _read(eng, db.usage_hourly, full)
    coarse = [full.index(k) for k in db.COARSE_KEYS]

    def summed(key_of: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
        out: dict[tuple[Any, ...], dict[str, Any]] = {}
        for key, measures in hourly.items():
            have = out.setdefault(key_of(key), dict.fromkeys(measures, 0))
            for name, value in measures.items():
                have[name] += value
        return out

    def day(key: tuple[Any, ...]) -> tuple[Any, ...]:
        return (key[0].replace(hour=0), *key[1:])

    for table, keys, want in (
        (db.usage_daily, full, summed(day)),
        (db.usage_hourly_coarse, db.COARSE_KEYS, summed(lambda k: tuple(k[i] for i in coarse))),
        (db.usage_daily_coarse, db.COARSE_KEYS, summed(lambda k: tuple(day(k)[i] for i in coarse))),
    ):
        got = _read(eng, table, keys)
        assert got.keys() == want.keys(), table.name
        for key, measures in want.items():
            assert got[key] == pytest.approx(measures, rel=1e-12, abs=1e-9), (table.name, key)


@pytest.mark.postgres
def test_pg_histograms_equal_the_case_form(migrated_pg_target: DbTarget) -> None:
    """PostgreSQL's one-pass `width_bucket` histograms of raw rows equal the CASE-per-bucket reference,
    for values exactly on, just below and just above every bucket edge, and NULL TTFTs."""
    eng = migrated_pg_target.make_engine()
    try:
        rows = list(generate_rows(dataclasses.replace(SPEC, rows=600, hours=30)))
        edges = [
            v for e in histogram.EDGES_MS for v in (e, math.nextafter(e, 0.0), math.nextafter(e, math.inf))
        ]
        for i, row in enumerate(rows):
            if i % 2:
                row["latency_ms"] = edges[i % len(edges)]
                row["ttft_ms"] = None if i % 5 == 0 else edges[(3 * i) % len(edges)]
        insert_rows(eng, rows)
        window = sa.and_(db.usage.c.created_at >= SPEC.start, db.usage.c.created_at < SPEC.start + 30 * H)
        groupings: list[tuple[Dimension, ...]] = [
            (),
            (Dimension.TEAM,),
            (Dimension.DAY, Dimension.TEAM, Dimension.BACKEND),
            (Dimension.HOUR, Dimension.MODEL),
        ]
        with eng.connect() as conn:
            for dims in groupings:
                filters = sql.raw_filters(ReportQuery(dims, None, None), window)
                fast, reference = (
                    sql.pg_raw_histograms(conn, dims, filters),
                    sql.case_raw_histograms(conn, dims, filters),
                )
                assert fast == reference and sum(v[0] for v in fast.values()) == len(rows), dims
    finally:
        eng.dispose()
