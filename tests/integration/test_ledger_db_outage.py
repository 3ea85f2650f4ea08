"""The ledger through a PostgreSQL outage (a TCP proxy that is cut and restored), and replay at start of a
spill left by a previous run: afterwards the table holds exactly one row per request id."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from gateway.store.ledger import LedgerWriter, insert_usage_rows, usage_row
from tests.support.db import DbTarget
from tests.support.tcp_proxy import TcpProxy
from tests.support.usage import count_usage, make_record, read_usage

N_RECORDS = 300
N_PRODUCERS = 10


def _writer(engine: sa.Engine, spill: Path, **kw: float) -> LedgerWriter:
    return LedgerWriter(
        engine,
        spill_path=str(spill),
        queue_max=int(kw.get("queue_max", 50)),
        batch_max=int(kw.get("batch_max", 20)),
        flush_interval_s=kw.get("flush_interval_s", 0.02),
        replay_interval_s=kw.get("replay_interval_s", 0.2),
    )


@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_outage_loses_nothing_and_duplicates_nothing(
    migrated_pg_target: DbTarget, tmp_path: Path
) -> None:
    pg_target = migrated_pg_target
    target = sa.make_url(pg_target.url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    engine = pg_target.make_engine(proxied)
    direct = pg_target.make_engine()
    writer = _writer(engine, tmp_path / "outage.spill.jsonl")
    writer.start()
    try:

        async def produce(worker: int) -> None:
            for j in range(N_RECORDS // N_PRODUCERS):
                writer.record(make_record(worker * 1000 + j))
                await asyncio.sleep(0.01)

        async def outage() -> None:
            await asyncio.sleep(0.1)
            await proxy.cut()
            await asyncio.sleep(1.5)
            await proxy.restore()

        await asyncio.gather(outage(), *(produce(w) for w in range(N_PRODUCERS)))
        await writer.aclose()
    finally:
        await proxy.aclose()
        engine.dispose()
    try:
        expected = sorted(make_record(w * 1000 + j).request_id for w in range(10) for j in range(30))
        assert [r.request_id for r in read_usage(direct)] == expected
        assert count_usage(direct) == (N_RECORDS, N_RECORDS)
        assert writer.spilled > 0 and writer.replayed > 0 and writer.lost == 0 and writer.rejected == 0
        assert writer.written + writer.replayed >= N_RECORDS
        assert list(tmp_path.glob("outage.spill*")) == []
    finally:
        direct.dispose()


async def test_spill_from_a_previous_run_is_replayed_at_start(
    migrated_target: DbTarget, tmp_path: Path
) -> None:
    engine = migrated_target.make_engine()
    spill = tmp_path / "prev.spill.jsonl"
    # The previous run crashed mid-replay: `.replaying` holds rows, one of them already inserted; the spill
    # file got more rows afterwards, and its last line was cut short by the crash.
    insert_usage_rows(engine, [usage_row(make_record(0))])
    replaying = b"".join(orjson.dumps(usage_row(make_record(i))) + b"\n" for i in range(0, 3))
    Path(f"{spill}.replaying").write_bytes(replaying)
    spilled = b"".join(orjson.dumps(usage_row(make_record(i))) + b"\n" for i in range(3, 8))
    spill.write_bytes(spilled + b'{"request_id": "req-cut')
    writer = _writer(engine, spill, replay_interval_s=30.0)
    try:
        writer.start()
        for _ in range(500):
            if writer.replayed == 8:
                break
            await asyncio.sleep(0.01)
        assert (
            writer.replayed == 8
        )  # all 8 lines (one row already present); before the first replay interval has passed
        await writer.aclose()
        assert read_usage(engine) == [make_record(i) for i in range(8)]
        assert writer.rejected == 1  # the cut-short line, kept for a human
        assert not os.path.exists(spill) and not os.path.exists(f"{spill}.replaying")
    finally:
        engine.dispose()
