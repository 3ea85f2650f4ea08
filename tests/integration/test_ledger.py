"""LedgerWriter on SQLite and PostgreSQL: exact rows, batching, idempotency, spill and replay, close."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.records import RequestStatus
from gateway.store.db import make_engine, migrate, usage
from gateway.store.ledger import LedgerWriter, insert_usage_rows, usage_row
from tests.support.db import QueryLog
from tests.support.usage import count_usage, make_record, read_usage


def make_writer(
    engine: Engine,
    tmp_path: Path,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    **overrides: float,
) -> LedgerWriter:
    settings: dict[str, float] = {
        "queue_max": 1000,
        "batch_max": 100,
        "flush_interval_s": 0.01,
        "replay_interval_s": 0.05,
    }
    settings.update(overrides)
    return LedgerWriter(
        engine,
        spill_path=str(tmp_path / "ledger.spill.jsonl"),
        queue_max=int(settings["queue_max"]),
        batch_max=int(settings["batch_max"]),
        flush_interval_s=settings["flush_interval_s"],
        replay_interval_s=settings["replay_interval_s"],
        clock=clock,
    )


async def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_rows_are_written_field_by_field(engine: Engine, tmp_path: Path) -> None:
    full = make_record(
        1,
        created_at=dt.datetime(2030, 1, 2, 5, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        cost_micro_usd=9_876_543_210_123,  # beyond 32 bits
        latency_ms=1234.5678,
        status=RequestStatus.CLIENT_CLOSED,
        http_status=499,
        error_type="client_closed",
        stream=True,
        cache_hit=True,
        cost_saved_micro_usd=5_000_000_000_017,  # beyond 32 bits too
        privacy_class="internal",
        route_reason="lowest latency: local 12ms < cloud 340ms",
    )
    sparse = make_record(
        2,
        key_id=None,
        backend=None,
        served_model=None,
        ttft_ms=None,
        status=RequestStatus.ERROR,
        http_status=503,
        error_type="upstream_unavailable",
    )
    writer = make_writer(engine, tmp_path)
    writer.start()
    writer.record(full)
    writer.record(sparse)
    await writer.aclose()
    rows = read_usage(engine)
    assert rows == [full, sparse]
    for row in rows:
        assert row.created_at.tzinfo == dt.UTC
    assert rows[0].created_at.hour == 3  # stored as UTC
    assert writer.written == 2 and writer.spilled == 0 and writer.queued == 0


async def test_batches_are_one_statement_each(engine: Engine, tmp_path: Path) -> None:
    writer = make_writer(engine, tmp_path, batch_max=10)
    for i in range(35):
        writer.record(make_record(i))
    assert writer.queued == 35
    log = QueryLog().attach(engine)
    writer.start()
    await wait_for(lambda: writer.written == 35)
    inserts = [n for s, n in zip(log.statements, log.row_counts, strict=True) if "INSERT INTO usage" in s]
    assert inserts == [10, 10, 10, 5]
    await writer.aclose()
    assert count_usage(engine) == (35, 35)


async def test_inserts_are_idempotent_on_request_id(engine: Engine, tmp_path: Path) -> None:
    first = make_record(7)
    insert_usage_rows(engine, [usage_row(first), usage_row(dataclasses.replace(first, prompt_tokens=1))])
    insert_usage_rows(engine, [usage_row(first)])
    writer = make_writer(engine, tmp_path)
    writer.start()
    writer.record(dataclasses.replace(first, cost_micro_usd=5))
    writer.record(make_record(8))
    writer.record(make_record(8))
    await writer.aclose()
    assert read_usage(engine) == [first, make_record(8)]


async def test_full_queue_spills_and_is_replayed(engine: Engine, tmp_path: Path) -> None:
    writer = make_writer(engine, tmp_path, queue_max=5)
    for i in range(12):
        writer.record(make_record(i))  # not started: the queue fills, the rest spills
    assert (writer.queued, writer.spilled) == (5, 7)
    spill = tmp_path / "ledger.spill.jsonl"
    lines = spill.read_bytes().splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == [f"req-{i:06d}" for i in range(5, 12)]
    writer.start()
    await wait_for(lambda: writer.written == 5 and writer.replayed == 7)
    await writer.aclose()
    assert read_usage(engine) == [make_record(i) for i in range(12)]
    assert list(tmp_path.glob("ledger.spill*")) == []


async def test_cost_saved_survives_spill_and_replay(engine: Engine, tmp_path: Path) -> None:
    hit = make_record(1, cache_hit=True, cost_micro_usd=0, cost_saved_micro_usd=4321)
    writer = make_writer(engine, tmp_path, queue_max=1)
    writer.record(make_record(0))
    writer.record(hit)  # the queue is full: spilled
    assert orjson.loads((tmp_path / "ledger.spill.jsonl").read_bytes())["cost_saved_micro_usd"] == 4321
    writer.start()
    await wait_for(lambda: writer.replayed == 1)
    await writer.aclose()
    assert read_usage(engine) == [make_record(0), hit]


async def test_spill_lines_from_older_versions_replay_with_defaults(
    engine: Engine,
    tmp_path: Path,
) -> None:
    before_0003 = usage_row(make_record(1, cache_hit=True))
    del before_0003["cost_saved_micro_usd"]
    before_0002 = usage_row(make_record(2))
    del before_0002["cost_saved_micro_usd"], before_0002["attempts"], before_0002["route_candidates"]
    for row in (before_0003, before_0002):
        del row["endpoint"]
    before_0006 = usage_row(make_record(4, endpoint="embeddings"))
    del before_0006["endpoint"]  # only chat completions were recorded then
    current = usage_row(make_record(3, cost_saved_micro_usd=77, endpoint="embeddings"))
    spill = tmp_path / "ledger.spill.jsonl"
    lines = [before_0003, before_0002, before_0006, current]
    spill.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in lines))
    writer = make_writer(engine, tmp_path)
    writer.start()
    await wait_for(lambda: writer.replayed == 4)
    await writer.aclose()
    rows = {r.request_id: r for r in read_usage(engine)}
    assert rows["req-000001"] == make_record(1, cache_hit=True, cost_saved_micro_usd=0)
    assert rows["req-000002"] == make_record(2, cost_saved_micro_usd=0, attempts=0, route_candidates=None)
    assert rows["req-000003"] == make_record(3, cost_saved_micro_usd=77, endpoint="embeddings")
    assert rows["req-000004"] == make_record(4, endpoint="chat.completions")
    assert writer.rejected == 0 and not spill.exists()


async def test_written_at_is_the_insert_time_also_for_replayed_rows(
    engine: Engine,
    tmp_path: Path,
) -> None:
    now = [dt.datetime(2031, 1, 1, 9, 30, tzinfo=dt.UTC)]
    writer = make_writer(engine, tmp_path, clock=lambda: now[0], queue_max=1)
    writer.record(make_record(0))
    writer.record(make_record(1))  # the queue is full: spilled
    spilled = orjson.loads((tmp_path / "ledger.spill.jsonl").read_bytes())
    assert "written_at" not in spilled  # a replay stamps its own time
    writer.start()
    await wait_for(lambda: writer.written == 1 and writer.replayed == 1)
    now[0] += dt.timedelta(minutes=5)
    writer.record(make_record(2))
    await writer.aclose()
    with engine.connect() as conn:
        stamps = dict(conn.execute(sa.select(usage.c.request_id, usage.c.written_at)).all())
    assert stamps == {
        "req-000000": dt.datetime(2031, 1, 1, 9, 30, tzinfo=dt.UTC),
        "req-000001": dt.datetime(2031, 1, 1, 9, 30, tzinfo=dt.UTC),  # old created_at, written now
        "req-000002": dt.datetime(2031, 1, 1, 9, 35, tzinfo=dt.UTC),
    }
    assert read_usage(engine) == [make_record(i) for i in range(3)]


async def test_aclose_flushes_what_is_queued(engine: Engine, tmp_path: Path) -> None:
    writer = make_writer(engine, tmp_path, flush_interval_s=30.0, batch_max=1000)
    writer.start()
    for i in range(3):
        writer.record(make_record(i))
    await asyncio.sleep(0.05)
    assert count_usage(engine) == (0, 0)  # still gathering a batch
    await asyncio.wait_for(writer.aclose(), 5.0)
    assert count_usage(engine) == (3, 3)
    writer.record(make_record(99))  # after close: spilled for the next start, not lost
    assert writer.spilled == 1


async def test_missing_table_spills_until_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"
    late_engine = make_engine(url)  # not migrated: inserts fail with OperationalError, like an outage
    try:
        writer = make_writer(late_engine, tmp_path)
        writer.start()
        for i in range(20):
            writer.record(make_record(i))
        await wait_for(lambda: writer.spilled == 20)
        assert writer.db_down
        assert await writer.ping()  # the server answers; only the table is missing
        migrate(url)
        await wait_for(lambda: writer.replayed == 20)
        writer.record(make_record(20))
        await writer.aclose()
        assert count_usage(late_engine) == (21, 21)
        assert not writer.db_down
    finally:
        late_engine.dispose()


async def test_bad_rows_are_set_aside_not_retried(engine: Engine, tmp_path: Path) -> None:
    writer = make_writer(engine, tmp_path)
    writer.start()
    writer.record(make_record(1))
    writer.record(make_record(2, team=None))  # violates NOT NULL: bad data, not an outage
    writer.record(make_record(3))
    await writer.aclose()
    assert [r.request_id for r in read_usage(engine)] == ["req-000001", "req-000003"]
    assert writer.rejected == 1 and not writer.db_down
    rejected = (tmp_path / "ledger.spill.jsonl.rejected").read_bytes().splitlines()
    assert [orjson.loads(line)["request_id"] for line in rejected] == ["req-000002"]


async def test_ping(engine: Engine, tmp_path: Path) -> None:
    assert await make_writer(engine, tmp_path).ping()
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    try:
        assert not await make_writer(down, tmp_path).ping()
    finally:
        down.dispose()
