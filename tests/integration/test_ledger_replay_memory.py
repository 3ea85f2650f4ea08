"""A spill file is replayed `batch_max` rows at a time: the replay never holds the whole file or all its
rows, so its working set (kept by the process as RSS high-water) does not grow with the outage that wrote
it. Memory here is what tracemalloc traces, not timing."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import orjson
from sqlalchemy.engine import Engine

from gateway.store.ledger import LedgerWriter, usage_row
from tests.support.usage import count_usage, make_record

BATCH_MAX = 50
LINES = 40 * BATCH_MAX


async def test_replaying_a_long_outages_spill_file_holds_one_batch_at_a_time(
    engine: Engine, tmp_path: Path
) -> None:
    spill = tmp_path / "ledger.spill.jsonl"
    lines = [orjson.dumps(usage_row(make_record(i))) for i in range(LINES)]
    spill.write_bytes(b"".join(line + b"\n" for line in lines))
    writer = LedgerWriter(
        engine,
        spill_path=str(spill),
        queue_max=100,
        batch_max=BATCH_MAX,
        flush_interval_s=0.01,
        replay_interval_s=0.05,
    )
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        writer.start()
        while writer.replayed < LINES:
            await asyncio.sleep(0.01)
        replay_peak = tracemalloc.get_traced_memory()[1] - base
        await writer.aclose()
        # For scale: the file's bytes and its rows, held at once.
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        held_rows = [orjson.loads(line) for line in b"\n".join(lines).splitlines()]
        held = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(held_rows) == LINES
    assert count_usage(engine) == (LINES, LINES) and not spill.exists()
    assert replay_peak < held / 3, (replay_peak, held)
