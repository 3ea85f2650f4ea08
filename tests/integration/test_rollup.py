"""Rollup on SQLite and PostgreSQL: hourly sums and histograms equal the raw rows', idempotent reruns, late
rows (spill replays), busy-time unions, pruning, the advisory lock, migrations 0003 -> 0004 and 0005 -> 0006.

The expected figures are computed here in Python from the generated records, independently of the SQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine

from gateway.live.histogram import EDGES_MS, LATENCY_PREFIX, TTFT_PREFIX, bucket_of, column_names
from gateway.records import LEGACY_ENDPOINT, RequestStatus, UsageRecord
from gateway.store import db
from gateway.store.db import backend_busy_hourly, rollup_state, usage, usage_hourly
from gateway.store.ledger import LedgerWriter, insert_usage_rows, usage_row
from gateway.store.rollups import Rollup
from tests.support.db import DbTarget

START = dt.datetime(2030, 3, 1, tzinfo=dt.UTC)  # ledger rows fall in [START, START + HOURS)
HOURS = 30
NOW = START + dt.timedelta(days=3)  # the clock when the rollups first run
HOUR = dt.timedelta(hours=1)
LONG_MODEL = "m" * 250  # longer than usage_hourly.model: cut to 200 characters
KEYS = ("hour", "team", "key_id", "model", "backend", "privacy", "endpoint", "batch_id")
KEYS_0005 = KEYS[:6]  # usage_hourly's key before migration 0006 (endpoint) and 0011 (batch_id)
BATCHES = ("batch_a", "batch_b")
ENDPOINTS = ("chat.completions", "embeddings", "responses")


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def generate(n: int, seed: int = 1, start: dt.datetime = START, hours: int = HOURS) -> list[UsageRecord]:
    rng = random.Random(seed)
    edges = [*EDGES_MS[:12], *EDGES_MS[-3:]]  # histogram edges and their float neighbours hit the SQL
    records = []
    for i in range(n):
        offset = dt.timedelta(microseconds=rng.randrange(hours * 3_600_000_000))
        if i % 50 == 0:
            offset = rng.randrange(hours) * HOUR  # exactly on an hour
        status = rng.choice([RequestStatus.OK] * 6 + [RequestStatus.ERROR, RequestStatus.CLIENT_CLOSED])
        cache_hit = status is RequestStatus.OK and rng.random() < 0.1
        if i % 7 == 0:
            edge = rng.choice(edges)
            latency = rng.choice((edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf)))
        else:
            latency = rng.choice((0.0, rng.lognormvariate(6.0, 1.5), rng.uniform(0, 5_000)))
        ttft = None if rng.random() < 0.4 else rng.choice((latency * rng.random(), rng.choice(edges)))
        records.append(
            UsageRecord(
                request_id=f"g{seed}-{i:06d}",
                created_at=start + offset,
                team=rng.choice(("research", "support", "ops")),
                key_id=rng.choice((None, "k1", "k2", "k3")),
                requested_model=rng.choice(("smollm2", "gpt-4o-mini", LONG_MODEL)),
                backend=rng.choice((None, "", "gpu0", "cloud", "edge1")),
                served_model=None,
                prompt_tokens=rng.randrange(4_000),
                completion_tokens=rng.randrange(1_500),
                cost_micro_usd=0 if cache_hit else rng.randrange(10**10),
                latency_ms=latency,
                ttft_ms=ttft,
                status=status,
                http_status=200,
                error_type=None,
                stream=ttft is not None,
                endpoint=rng.choice(ENDPOINTS),
                cache_hit=cache_hit,
                cost_saved_micro_usd=rng.randrange(10**6) if cache_hit else 0,
                privacy_class=rng.choice((None, "", "internal", "internal:email", "external:phone,email")),
                attempts=rng.choice((0, 1, 1, 2, 3)),
                batch_id=None if i % 3 else BATCHES[i % 2],
            )
        )
    return records


def insert(engine: Engine, records: list[UsageRecord], written_at: dt.datetime | None) -> None:
    rows = [usage_row(r) for r in records]
    insert_usage_rows(engine, rows, written_at=written_at or NOW)
    if written_at is None:  # as written before migration 0004
        with engine.begin() as conn:
            ids = [r.request_id for r in records]
            conn.execute(sa.update(usage).where(usage.c.request_id.in_(ids)).values(written_at=None))


def floor_hour(at: dt.datetime) -> dt.datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def expected_hourly(records: list[UsageRecord]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    lat, ttft = column_names(LATENCY_PREFIX), column_names(TTFT_PREFIX)
    for r in records:
        tier = (r.privacy_class or "").partition(":")[0]
        key = (
            floor_hour(r.created_at),
            r.team,
            r.key_id or "",
            r.requested_model[:200],
            r.backend or "",
            tier,
            r.endpoint,
            r.batch_id or "",
        )
        acc = out.setdefault(key, defaultdict(int))
        acc["requests"] += 1
        acc["errors"] += r.status == "error"
        acc["client_closed"] += r.status == "client_closed"
        acc["prompt_tokens"] += r.prompt_tokens
        acc["completion_tokens"] += r.completion_tokens
        acc["cost_micro_usd"] += r.cost_micro_usd
        acc["cache_hits"] += r.cache_hit
        acc["cost_saved_micro_usd"] += r.cost_saved_micro_usd
        acc["fallbacks"] += r.attempts > 1
        acc["owned_micro_usd"] += r.owned_micro_usd
        if r.cache_hit:  # migration 0014
            acc["cache_prompt_tokens"] += r.prompt_tokens
            acc["cache_completion_tokens"] += r.completion_tokens
            acc["cache_cost_micro_usd"] += r.cost_micro_usd
            acc["cache_owned_micro_usd"] += r.owned_micro_usd
        acc["latency_sum_ms"] += r.latency_ms
        acc[lat[bucket_of(r.latency_ms)]] += 1
        if r.ttft_ms is not None:
            acc["ttft_count"] += 1
            acc["ttft_sum_ms"] += r.ttft_ms
            acc[ttft[bucket_of(r.ttft_ms)]] += 1
    measures = [c.name for c in usage_hourly.columns if c.name not in KEYS]
    return {key: {m: acc[m] for m in measures} for key, acc in out.items()}


def ms_since_start(at: dt.datetime) -> float:
    return (at - START) / dt.timedelta(milliseconds=1)  # exact enough: a float of a few days in ms


def expected_busy(records: list[UsageRecord]) -> dict[tuple[dt.datetime, str], tuple[float, int]]:
    """Per hour and backend: merge the served intervals clipped to the hour; count requests started in it."""
    intervals: dict[tuple[dt.datetime, str], list[tuple[float, float]]] = defaultdict(list)
    started: dict[tuple[dt.datetime, str], int] = defaultdict(int)
    for r in records:
        if not r.backend or r.cache_hit:
            continue
        started[(floor_hour(r.created_at), r.backend)] += 1
        begin = ms_since_start(r.created_at)
        end = begin + r.latency_ms
        hour = floor_hour(r.created_at)
        while ms_since_start(hour) < end:
            h_ms = ms_since_start(hour)
            lo, hi = max(begin, h_ms), min(end, h_ms + 3_600_000)
            if hi > lo:
                intervals[(hour, r.backend)].append((lo, hi))
            hour += HOUR
    out = {}
    for key in set(intervals) | set(started):
        total, reach = 0.0, -math.inf
        for lo, hi in sorted(intervals.get(key, [])):
            lo = max(lo, reach)
            total += max(0.0, hi - lo)
            reach = max(reach, hi)
        out[key] = (total, started.get(key, 0))
    return out


def read_hourly(engine: Engine) -> dict[tuple[Any, ...], dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage_hourly)).mappings().all()
    return {tuple(r[k] for k in KEYS): {k: v for k, v in r.items() if k not in KEYS} for r in rows}


def read_busy(engine: Engine) -> dict[tuple[dt.datetime, str], tuple[float, int]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(backend_busy_hourly)).all()
    return {(r.hour, r.backend): (r.busy_ms, r.requests) for r in rows}


def assert_matches(engine: Engine, records: list[UsageRecord]) -> None:
    assert_hourly_matches(engine, records)
    busy, want_busy = read_busy(engine), expected_busy(records)
    assert set(busy) == set(want_busy)
    for key, (busy_ms, requests) in want_busy.items():
        assert busy[key][1] == requests, key
        assert busy[key][0] == pytest.approx(busy_ms, rel=1e-9, abs=1e-6), key


def assert_hourly_matches(engine: Engine, records: list[UsageRecord]) -> None:
    got, want = read_hourly(engine), expected_hourly(records)
    assert_daily_sums_hourly(engine, got)
    assert set(got) == set(want)
    for key, measures in want.items():
        for name, value in measures.items():
            if isinstance(value, float) or name.endswith("_sum_ms"):
                assert got[key][name] == pytest.approx(value, rel=1e-12, abs=1e-9), (key, name)
            else:
                assert got[key][name] == value, (key, name)


def assert_daily_sums_hourly(engine: Engine, hourly: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    """usage_daily (migration 0013; absent at older revisions) holds each day's hourly rows summed, and the
    coarse copies (0014) the hourly and daily rows summed over key_id, privacy and batch_id."""
    tables = sa.inspect(engine).get_table_names()
    if "usage_daily" not in tables:
        return
    day_of = {key: (key[0].replace(hour=0), *key[1:]) for key in hourly}
    assert_sums(engine, db.usage_daily, KEYS, summed(hourly, day_of))
    if "usage_hourly_coarse" not in tables:
        return
    coarse = [KEYS.index(k) for k in db.COARSE_KEYS]
    assert_sums(
        engine, db.usage_hourly_coarse, db.COARSE_KEYS, summed(hourly, {k: key_at(k, coarse) for k in hourly})
    )
    daily_coarse = {k: key_at(day, coarse) for k, day in day_of.items()}
    assert_sums(engine, db.usage_daily_coarse, db.COARSE_KEYS, summed(hourly, daily_coarse))


def key_at(key: tuple[Any, ...], positions: list[int]) -> tuple[Any, ...]:
    return tuple(key[i] for i in positions)


def summed(
    rows: dict[tuple[Any, ...], dict[str, Any]], into: dict[tuple[Any, ...], tuple[Any, ...]]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """`rows`' measures summed per `into[key]`."""
    want: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, measures in rows.items():
        have = want.setdefault(into[key], dict.fromkeys(measures, 0))
        for name, value in measures.items():
            have[name] += value
    return want


def assert_sums(
    engine: Engine, table: sa.Table, keys: tuple[str, ...], want: dict[Any, dict[str, Any]]
) -> None:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table)).mappings().all()
    got = {tuple(r[k] for k in keys): {k: v for k, v in r.items() if k not in keys} for r in rows}
    assert got.keys() == want.keys(), table.name
    for key, measures in want.items():
        assert got[key] == pytest.approx(measures, rel=1e-12, abs=1e-9), (table.name, key)


def assert_same(got: dict[Any, Any], want: dict[Any, Any]) -> None:
    """Equal, up to float rounding in sums the database may add up in another order."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def raw_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(usage.c.request_id)).scalars())


@pytest.mark.slow  # thousands of generated rows: 5-6 s a database
def test_rollup_equals_raw_sums_and_a_rerun_changes_nothing(engine: Engine) -> None:
    records = generate(3_000)
    insert(engine, records[:1_000], written_at=None)  # from before migration 0004
    insert(engine, records[1_000:], written_at=NOW - dt.timedelta(days=1))
    clock = Clock(NOW)
    rollup = Rollup(engine, clock=clock, chunk_hours=7)
    first = rollup.run_once()
    assert not first.skipped and first.rows_added_late == 0 and first.watermark == NOW
    assert HOURS <= first.hours_recomputed <= HOURS + 2  # long requests run into the next hours
    assert_matches(engine, records)
    clock.now += dt.timedelta(minutes=1)
    assert rollup.run_once().hours_recomputed == 0  # nothing written since
    # An older gateway still running (no written_at): its new rows count by created_at.
    recent = [
        dataclasses.replace(r, created_at=clock.now - dt.timedelta(minutes=2))
        for r in generate(30, seed=5, start=clock.now)
    ]
    insert(engine, recent, written_at=None)
    clock.now += dt.timedelta(minutes=1)
    assert rollup.run_once().hours_recomputed >= 1
    records += recent
    assert_matches(engine, records)
    hourly, busy = read_hourly(engine), read_busy(engine)
    clock.now += dt.timedelta(hours=1)
    assert Rollup(engine, clock=clock, margin_s=10 * 86_400).run_once().hours_recomputed >= HOURS
    assert_same(read_hourly(engine), hourly)  # recomputed, not added
    assert_same(read_busy(engine), busy)
    with engine.connect() as conn:
        state = conn.execute(sa.select(rollup_state)).one()
    assert (state.name, state.watermark, state.pruned_before) == ("usage", clock.now, None)


async def test_late_rows_from_a_spill_replay_are_rolled_up(engine: Engine, tmp_path: Path) -> None:
    records = generate(2_000)
    insert(engine, records, written_at=NOW - dt.timedelta(hours=1))
    clock = Clock(NOW)
    rollup = Rollup(engine, clock=clock)
    rollup.run_once()
    late = generate(300, seed=2, start=START + 5 * HOUR, hours=3)  # old created_at, replayed now
    spill = tmp_path / "ledger.spill.jsonl"
    spill.write_bytes(b"".join(orjson.dumps(usage_row(r)) + b"\n" for r in late))
    clock.now += dt.timedelta(minutes=10)
    writer = LedgerWriter(
        engine,
        spill_path=str(spill),
        queue_max=10,
        batch_max=100,
        flush_interval_s=0.01,
        replay_interval_s=0.05,
        clock=clock,
    )
    writer.start()
    deadline = asyncio.get_running_loop().time() + 10
    while writer.replayed < len(late):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    await writer.aclose()
    with engine.connect() as conn:
        stamps = set(
            conn.execute(sa.select(usage.c.written_at).where(usage.c.request_id.like("g2-%"))).scalars()
        )
    assert stamps == {clock.now}  # replayed rows carry the replay time, not their created_at
    clock.now += dt.timedelta(minutes=1)
    result = rollup.run_once()
    assert 3 <= result.hours_recomputed <= 5  # the three late hours (and what their requests ran into)
    assert_matches(engine, records + late)


def test_busy_time_is_the_union_of_intervals_clipped_to_hours(engine: Engine) -> None:
    h0 = START + 10 * HOUR

    def rec(
        i: int, at: dt.timedelta, latency_ms: float, backend: str | None = "gpu0", **kw: Any
    ) -> UsageRecord:
        return UsageRecord(
            request_id=f"b{i}",
            created_at=h0 + at,
            team="t",
            key_id=None,
            requested_model="m",
            backend=backend,
            served_model=None,
            prompt_tokens=1,
            completion_tokens=1,
            cost_micro_usd=0,
            latency_ms=latency_ms,
            ttft_ms=None,
            status=RequestStatus.OK,
            http_status=200,
            error_type=None,
            stream=False,
            endpoint="chat.completions",
            **kw,
        )

    s = dt.timedelta(seconds=1)
    records = [
        rec(1, 10 * s, 5_000),  # [10, 15] s
        rec(2, 12 * s, 1_000),  # nested: [12, 13]
        rec(3, 14 * s, 4_000),  # overlaps the end: union [10, 18]
        rec(4, 100 * s, 2_000),  # disjoint: [100, 102]
        rec(5, 102 * s, 1_000),  # touching: union [100, 103]
        rec(6, 200 * s, 9_000, cache_hit=True),  # cache hits keep no backend busy
        rec(7, 300 * s, 9_000, backend=None),  # refused: no backend
        rec(8, 3_590 * s, 30_000),  # crosses into the next hour: 10 s here, 20 s there
        rec(9, -5 * s, 7_000),  # started in the previous hour: 5 s there, 2 s here
        rec(10, 3_595 * s, 3_600_000 + 15_000),  # runs 5 s here, all of hour 1, 10 s of hour 2
        rec(11, 50 * s, 1_000, backend="cloud"),  # another backend
        rec(12, 7_200 * s + 3 * s, 4_000),  # hour 2: [3, 7] s, inside rec 10's [0, 10] s
    ]
    insert(engine, records, written_at=NOW)
    Rollup(engine, clock=Clock(NOW)).run_once()
    busy = read_busy(engine)
    assert busy == {
        (h0 - HOUR, "gpu0"): (pytest.approx(5_000.0), 1),
        (h0, "gpu0"): (pytest.approx(2_000 + 8_000 + 3_000 + 10_000), 7),
        (h0, "cloud"): (pytest.approx(1_000.0), 1),
        (h0 + HOUR, "gpu0"): (pytest.approx(3_600_000.0), 0),
        (h0 + 2 * HOUR, "gpu0"): (pytest.approx(10_000.0), 1),
    }
    assert_matches(engine, records)


@pytest.mark.slow  # thousands of generated rows: 5-6 s a database
def test_prune_keeps_rollups_and_late_rows_for_pruned_hours_are_added(engine: Engine) -> None:
    records = generate(2_000)
    insert(engine, records, written_at=NOW - dt.timedelta(days=1))
    clock = Clock(START + 12 * HOUR + dt.timedelta(days=1, minutes=30))  # retention 1 day: cut at 12:00
    rollup = Rollup(engine, clock=clock)
    rollup.run_once()
    before_hourly, before_busy = read_hourly(engine), read_busy(engine)
    cutoff = START + 12 * HOUR
    new = generate(50, seed=3, start=cutoff - 3 * HOUR, hours=6)  # not rolled up yet: prune rolls them up
    insert(engine, new, written_at=clock.now)
    clock.now += dt.timedelta(seconds=1)
    deleted = rollup.prune(retention_days=1)
    kept = {r.request_id for r in records + new if r.created_at >= cutoff}
    assert raw_ids(engine) == kept
    assert deleted == len(records) + len(new) - len(kept)
    with engine.connect() as conn:
        assert conn.execute(sa.select(rollup_state.c.pruned_before)).scalar_one() == cutoff
    assert_matches(engine, records + new)  # nothing lost: every pruned row is in the rollups
    assert before_hourly != read_hourly(engine)  # (the new rows did change them)

    # A late row for a pruned hour is added to that hour's rollup row, never recomputed away.
    late = generate(20, seed=4, start=START + 2 * HOUR, hours=2)
    clock.now += dt.timedelta(minutes=5)
    insert(engine, late, written_at=clock.now)
    clock.now += dt.timedelta(seconds=1)
    result = rollup.run_once()
    assert result.rows_added_late == len(late) and raw_ids(engine) == kept  # added, then deleted
    assert_hourly_matches(engine, records + new + late)
    got = read_hourly(engine)
    # Busy time of late rows is added per row (their union with pruned rows is unknown): at least as much.
    busy = read_busy(engine)
    for key, (busy_ms, requests) in expected_busy(records + new + late).items():
        if key[0] < START + 4 * HOUR:
            assert busy[key][1] == requests and busy[key][0] >= busy_ms - 1e-6
    clock.now += dt.timedelta(hours=1)
    again = rollup.run_once()
    assert again.rows_added_late == 0  # added exactly once
    assert_same(read_hourly(engine), got)
    assert before_busy.keys() <= busy.keys()


def test_prune_before_any_run_rolls_up_first(engine: Engine) -> None:
    records = generate(500)
    insert(engine, records, written_at=None)
    assert Rollup(engine, clock=Clock(NOW)).prune(retention_days=1) == 500  # NOW is 3 days after START
    assert raw_ids(engine) == set()
    assert_matches(engine, records)


def test_a_run_is_skipped_while_another_holds_the_lock(migrated_pg_target: DbTarget) -> None:
    eng = migrated_pg_target.make_engine()
    try:
        insert(eng, generate(10), written_at=NOW)
        lock = sa.text("SELECT pg_advisory_lock(:k, hashtext(current_schema()))")
        with eng.connect() as holder:
            holder.execute(lock, {"k": 0x53425255})
            result = Rollup(eng, clock=Clock(NOW)).run_once()
            assert result.skipped and result.hours_recomputed == 0 and read_hourly(eng) == {}
            holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))
        assert not Rollup(eng, clock=Clock(NOW)).run_once().skipped
        assert read_hourly(eng) != {}
    finally:
        eng.dispose()


def test_replicas_running_at_once_never_double_count(engine: Engine) -> None:
    records = generate(1_500)
    insert(engine, records, written_at=NOW)
    clocks = [Clock(NOW + dt.timedelta(seconds=i)) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:  # PostgreSQL: the others skip; SQLite: they take turns
        results = list(pool.map(lambda c: Rollup(engine, clock=c).run_once(), clocks))
    assert any(not r.skipped for r in results)
    assert_matches(engine, records)


def test_migration_0003_to_0004_and_back(db_target: DbTarget) -> None:
    if db_target.schema is not None:
        admin = db.make_engine(db_target.url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{db_target.schema}"')
        admin.dispose()
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.upgrade(cfg, "0003")
    eng = db_target.make_engine()
    try:
        old = [dataclasses.replace(r, endpoint=LEGACY_ENDPOINT, batch_id=None) for r in generate(40)]
        with eng.begin() as conn:  # the 0003 columns only, as an older gateway writes them
            names = [c["name"] for c in sa.inspect(eng).get_columns("usage")]
            assert "written_at" not in names
            conn.execute(
                sa.table("usage", *(sa.column(n) for n in names)).insert(),
                [{k: v for k, v in usage_row(r).items() if k in names} for r in old],
            )
        db.migrate(db_target.url, db_target.schema)
        inspector = sa.inspect(eng)
        assert {"usage_hourly", "backend_busy_hourly", "rollup_state"} <= set(inspector.get_table_names())
        assert "ix_usage_written_at" in {ix["name"] for ix in inspector.get_indexes("usage")}
        with eng.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).where(usage.c.written_at.is_(None))).scalar() == 40
        Rollup(eng, clock=Clock(NOW)).run_once()
        assert_matches(eng, old)
        command.downgrade(cfg, "0003")
        inspector = sa.inspect(eng)
        assert not {"usage_hourly", "backend_busy_hourly", "rollup_state"} & set(inspector.get_table_names())
        assert "written_at" not in [c["name"] for c in inspector.get_columns("usage")]
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one() == 40
        db.migrate(db_target.url, db_target.schema)
        assert "written_at" in [c["name"] for c in sa.inspect(eng).get_columns("usage")]
    finally:
        eng.dispose()


CACHE_MEASURES = db.CACHE_MEASURES  # usage_hourly columns added by revision 0014
LATER_MEASURES = ("owned_micro_usd", *CACHE_MEASURES)  # usage_hourly columns added after revision 0006


def before_later(hourly: dict[tuple[Any, ...], dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Rollup rows as a revision before the LATER_MEASURES holds them."""
    return {k: {m: v for m, v in ms.items() if m not in LATER_MEASURES} for k, ms in hourly.items()}


def collapse_endpoints(
    hourly: dict[tuple[Any, ...], dict[str, Any]],
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Rollup rows as they are without the endpoint and batch key columns: each group's endpoints and
    batches summed."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, measures in hourly.items():
        acc = out.setdefault(key[: len(KEYS_0005)], dict.fromkeys(measures, 0))
        for name, value in measures.items():
            acc[name] += value
    return out


def assert_hourly_equal(got: dict[Any, dict[str, Any]], want: dict[Any, dict[str, Any]]) -> None:
    assert set(got) == set(want)
    for key, measures in want.items():
        assert got[key] == {m: pytest.approx(v, rel=1e-12, abs=1e-9) for m, v in measures.items()}, key


def test_migration_0005_to_0006_keeps_rollups_and_back(db_target: DbTarget) -> None:
    """Rows and rollups an older gateway wrote become chat.completions; downgrade sums the endpoints."""
    if db_target.schema is not None:
        admin = db.make_engine(db_target.url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{db_target.schema}"')
        admin.dispose()
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.upgrade(cfg, "0005")
    eng = db_target.make_engine()
    try:
        old = [dataclasses.replace(r, endpoint=LEGACY_ENDPOINT, batch_id=None) for r in generate(120, seed=6)]
        old_hourly = expected_hourly(old)
        inspector = sa.inspect(eng)
        names = [c["name"] for c in inspector.get_columns("usage")]
        assert "endpoint" not in names
        assert inspector.get_pk_constraint("usage_hourly")["constrained_columns"] == list(KEYS_0005)
        with eng.begin() as conn:  # as a 0005 gateway wrote them: its usage columns and rollup rows
            typed = [sa.column(n, usage.c[n].type) for n in names]
            conn.execute(
                sa.table("usage", *typed).insert(),
                [{k: v for k, v in usage_row(r).items() if k in names} | {"written_at": NOW} for r in old],
            )
            later = ("endpoint", "batch_id", *LATER_MEASURES)
            hourly_names = [c.name for c in usage_hourly.columns if c.name not in later]
            hourly = sa.table("usage_hourly", *(sa.column(n, usage_hourly.c[n].type) for n in hourly_names))
            conn.execute(
                hourly.insert(),
                [
                    dict(zip(KEYS_0005, key, strict=True)) | m
                    for key, m in before_later(collapse_endpoints(old_hourly)).items()
                ],
            )
        db.migrate(db_target.url, db_target.schema)  # 0005 -> 0006 (and on to head)
        pk = sa.inspect(eng).get_pk_constraint("usage_hourly")
        assert pk["constrained_columns"] == list(KEYS)
        if db_target.kind == "postgresql":
            assert pk["name"] == "usage_hourly_pkey"
        assert_hourly_equal(read_hourly(eng), old_hourly)  # every old rollup row, now chat.completions
        with eng.connect() as conn:
            endpoints = conn.execute(sa.select(usage.c.endpoint).distinct()).scalars().all()
        assert endpoints == [LEGACY_ENDPOINT]

        new = generate(80, seed=7)  # several endpoints, as a 0006 gateway writes them
        insert(eng, new, written_at=NOW)
        Rollup(eng, clock=Clock(NOW)).run_once()
        assert {k[-2] for k in read_hourly(eng)} == set(ENDPOINTS)
        assert_matches(eng, old + new)

        command.downgrade(cfg, "0005")
        inspector = sa.inspect(eng)
        assert "endpoint" not in [c["name"] for c in inspector.get_columns("usage")]
        assert inspector.get_pk_constraint("usage_hourly")["constrained_columns"] == list(KEYS_0005)
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one() == len(old + new)
            rows = conn.execute(sa.text("SELECT * FROM usage_hourly")).mappings().all()
        down = {tuple(r[k] for k in KEYS_0005): {k: v for k, v in r.items() if k not in KEYS} for r in rows}
        if db_target.kind == "sqlite":  # raw text: the keys read back as UTCDateTime writes them
            down = {
                (dt.datetime.fromisoformat(k[0]).replace(tzinfo=dt.UTC), *k[1:]): v for k, v in down.items()
            }
        assert_hourly_equal(down, before_later(collapse_endpoints(expected_hourly(old + new))))

        db.migrate(db_target.url, db_target.schema)  # and up again: the sums are chat.completions now
        want = {
            (*key, LEGACY_ENDPOINT, ""): m
            for key, m in collapse_endpoints(expected_hourly(old + new)).items()
        }
        assert_hourly_equal(read_hourly(eng), want)
    finally:
        eng.dispose()


def test_migration_0010_to_0011_splits_batches_out_of_existing_rollups_and_back(db_target: DbTarget) -> None:
    """Rollups a 0010 gateway wrote (no batch key) hold batch rows under batch ''; after the upgrade the
    next run recomputes the hours whose raw rows remain, so each batch gets its own rollup rows."""
    if db_target.schema is not None:
        admin = db.make_engine(db_target.url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{db_target.schema}"')
        admin.dispose()
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.upgrade(cfg, "0010")
    eng = db_target.make_engine()
    keys_0010 = KEYS[:-1]
    try:
        records = generate(150, seed=9)
        assert {r.batch_id for r in records} == {None, *BATCHES}
        insert(eng, records, written_at=NOW - dt.timedelta(days=1))  # long before the 0010 rollup's watermark
        without_batch: dict[tuple[Any, ...], dict[str, Any]] = {}
        for key, measures in expected_hourly(records).items():
            acc = without_batch.setdefault(key[:-1], dict.fromkeys(measures, 0))
            for name, value in measures.items():
                acc[name] += value
        without_batch = {
            k: {m: v for m, v in ms.items() if m not in CACHE_MEASURES} for k, ms in without_batch.items()
        }
        hourly_names = [
            c.name for c in usage_hourly.columns if c.name != "batch_id" and c.name not in CACHE_MEASURES
        ]
        with eng.begin() as conn:  # as a 0010 gateway's rollup left them
            hourly = sa.table("usage_hourly", *(sa.column(n, usage_hourly.c[n].type) for n in hourly_names))
            conn.execute(
                hourly.insert(), [dict(zip(keys_0010, k, strict=True)) | m for k, m in without_batch.items()]
            )
            conn.execute(
                sa.insert(rollup_state).values(
                    name="usage", watermark=NOW, pruned_before=None, updated_at=NOW
                )
            )
        db.migrate(db_target.url, db_target.schema)
        pk = sa.inspect(eng).get_pk_constraint("usage_hourly")
        assert pk["constrained_columns"] == list(KEYS)
        if db_target.kind == "postgresql":
            assert pk["name"] == "usage_hourly_pkey"
        # 0014 fills the cache columns of rows whose whole key (batch too) its raw rows match: compared after
        # the next run below, which recomputes every hour
        no_cache = {
            k: {m: v for m, v in ms.items() if m not in CACHE_MEASURES} for k, ms in read_hourly(eng).items()
        }
        assert_hourly_equal(no_cache, {(*k, ""): m for k, m in without_batch.items()})
        later = NOW + dt.timedelta(hours=1)
        Rollup(eng, clock=Clock(later)).run_once()
        assert {k[-1] for k in read_hourly(eng)} == {"", *BATCHES}
        assert_matches(eng, records)

        command.downgrade(cfg, "0010")
        assert sa.inspect(eng).get_pk_constraint("usage_hourly")["constrained_columns"] == list(keys_0010)
        with eng.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM usage_hourly")).mappings().all()
        down = {tuple(r[k] for k in keys_0010): {k: v for k, v in r.items() if k not in KEYS} for r in rows}
        if db_target.kind == "sqlite":  # raw text: the keys read back as UTCDateTime writes them
            down = {
                (dt.datetime.fromisoformat(k[0]).replace(tzinfo=dt.UTC), *k[1:]): v for k, v in down.items()
            }
        assert_hourly_equal(down, without_batch)
    finally:
        eng.dispose()
