"""The ledger's journal on a SQLite ledger: rows on disk as soon as they are recorded, segments rotated and
deleted once committed, a killed process's journal replayed (torn last line skipped, rows already present
not doubled), slots locked per live process and adopted once their process is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy.engine import Engine

from gateway.store.journal import Journal
from gateway.store.ledger import LedgerWriter, insert_usage_rows, usage_row
from tests.support.db import migrated_copy
from tests.support.usage import count_usage, make_record, read_usage

ROOT = Path(__file__).resolve().parents[2]
TAG = "testdb"


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    target = next(migrated_copy(request, "sqlite", tmp_path))
    eng = target.make_engine()
    yield eng
    eng.dispose()


def make_writer(engine: Engine, tmp_path: Path, **kw: float) -> tuple[LedgerWriter, Journal]:
    journal = Journal(
        str(tmp_path / "journal"),
        tag=TAG,
        segment_bytes=int(kw.get("segment_bytes", 1 << 20)),
        fsync_interval_s=kw.get("fsync_interval_s", 0.02),
    )
    writer = LedgerWriter(
        engine,
        spill_path=str(tmp_path / "ledger.spill.jsonl"),
        queue_max=1000,
        batch_max=int(kw.get("batch_max", 100)),
        flush_interval_s=kw.get("flush_interval_s", 0.01),
        replay_interval_s=kw.get("replay_interval_s", 0.05),
        journal=journal,
    )
    return writer, journal


def segments(slot: Path) -> list[Path]:
    return sorted(slot.glob("*.jsonl"))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_row_is_on_disk_when_record_returns_and_gone_once_committed(
    engine: Engine, tmp_path: Path
) -> None:
    writer, journal = make_writer(engine, tmp_path, flush_interval_s=30.0, batch_max=1000)
    writer.start()
    try:
        for i in range(5):
            writer.record(make_record(i))
        assert journal.slot == tmp_path / "journal" / f"{TAG}-0"
        (seg,) = segments(journal.slot)
        assert [orjson.loads(line)["request_id"] for line in lines(seg)] == [f"req-{i:06d}" for i in range(5)]
        assert count_usage(engine) == (0, 0)  # still in the writer's queue: only the journal holds them
    finally:
        await writer.aclose()
    assert read_usage(engine) == [make_record(i) for i in range(5)]
    assert segments(journal.slot) == []  # committed: nothing left to replay
    assert writer.recovered == 0 and journal.failed == 0


async def test_segments_rotate_and_are_deleted_once_their_rows_are_committed(
    engine: Engine, tmp_path: Path
) -> None:
    writer, journal = make_writer(engine, tmp_path, segment_bytes=4096, flush_interval_s=0.05)
    writer.start()
    try:
        per_segment = -(-4096 // (len(orjson.dumps(usage_row(make_record(0)))) + 1))  # ~500 bytes a line
        n = 4 * per_segment + per_segment // 2  # four full segments and one being filled
        for i in range(n):
            writer.record(make_record(i))
        assert journal.slot is not None
        first = segments(journal.slot)
        assert len(first) == 5
        assert all(p.stat().st_size >= 4096 for p in first[:-1])
        assert sum(len(lines(p)) for p in first) == n
        await wait_for(lambda: count_usage(engine) == (n, n))
        # Deleted by the journal's next sync; what remains is the empty segment new rows go to.
        await wait_for(lambda: all(p.stat().st_size == 0 for p in segments(journal.slot)))  # type: ignore[arg-type]
        assert len(segments(journal.slot)) == 1 and not set(first) & set(segments(journal.slot))
    finally:
        await writer.aclose()
    assert segments(journal.slot) == []


async def test_a_killed_process_journal_is_replayed_once_skipping_its_torn_last_line(
    engine: Engine, tmp_path: Path
) -> None:
    slot = tmp_path / "journal" / f"{TAG}-0"
    slot.mkdir(parents=True)
    # What a killed process leaves: two segments, the last one cut mid-line; one row was inserted before
    # the kill, and one of them was also spilled (a row may be in both: replay is idempotent).
    insert_usage_rows(engine, [usage_row(make_record(0))])
    first = b"".join(orjson.dumps(usage_row(make_record(i))) + b"\n" for i in range(4))
    (slot / "0000000000000006.jsonl").write_bytes(first)
    second = b"".join(orjson.dumps(usage_row(make_record(i))) + b"\n" for i in range(4, 7))
    (slot / "0000000000000007.jsonl").write_bytes(second + orjson.dumps(usage_row(make_record(7)))[:40])
    (tmp_path / "ledger.spill.jsonl").write_bytes(orjson.dumps(usage_row(make_record(5))) + b"\n")
    writer, journal = make_writer(engine, tmp_path, replay_interval_s=30.0)
    writer.start()
    try:
        await wait_for(lambda: writer.recovered == 7)  # at start, not after the replay interval
        assert journal.slot == slot  # the dead process's slot was free
        assert [p.name for p in segments(slot)] == ["0000000000000008.jsonl"]  # fresh numbers
        await wait_for(lambda: writer.replayed == 1)
    finally:
        await writer.aclose()
    assert read_usage(engine) == [make_record(i) for i in range(7)]  # row 7's response was never sent
    assert writer.rejected == 0  # a torn tail is expected after a kill: skipped, not set aside
    assert segments(slot) == []


CHILD = """
import asyncio, sys, orjson
from gateway.store.journal import Journal
from gateway.store.ledger import usage_row
from tests.support.usage import make_record

async def main() -> None:
    journal = Journal(sys.argv[1], tag=sys.argv[2], segment_bytes=1 << 20, fsync_interval_s=0)
    journal.start()
    for i in range(int(sys.argv[3])):
        journal.append(orjson.dumps(usage_row(make_record(1000 + i))))
    print(journal.slot, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_a_live_slot_is_left_alone_and_a_dead_ones_is_adopted(engine: Engine, tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", CHILD, str(directory), TAG, "25"]
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child_slot = Path((await asyncio.to_thread(child.stdout.readline)).strip())
        assert child_slot == directory / f"{TAG}-0"
        writer, journal = make_writer(engine, tmp_path, replay_interval_s=0.05)
        writer.start()
        try:
            assert journal.slot == directory / f"{TAG}-1"  # slot 0 is locked by the live child
            await asyncio.sleep(0.3)  # several replay rounds
            assert writer.recovered == 0 and len(lines(segments(child_slot)[0])) == 25
            child.send_signal(signal.SIGKILL)
            await asyncio.to_thread(child.wait)
            await wait_for(lambda: writer.recovered == 25)
            assert segments(child_slot) == []
        finally:
            await writer.aclose()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert read_usage(engine) == [make_record(1000 + i) for i in range(25)]


async def test_an_idle_writer_and_journal_hold_a_steady_task_count(engine: Engine, tmp_path: Path) -> None:
    """The task gauge bench/soak watches for leaks: an idle ledger's loops wake on their timers without
    spawning a task per wait (asyncio.wait_for does on Python 3.11), so every reading shows the same count."""
    writer, _ = make_writer(
        engine, tmp_path, fsync_interval_s=0.01, flush_interval_s=0.01, replay_interval_s=0.01
    )
    writer.start()
    try:
        writer.record(make_record(0))
        await wait_for(lambda: count_usage(engine)[0] == 1)
        counts = set()
        for _ in range(300):  # 1.5 s: many of each loop's waits, syncs and replay passes
            counts.add(len(asyncio.all_tasks()))
            await asyncio.sleep(0.005)
        assert counts == {len(asyncio.all_tasks())}, sorted(
            repr(t.get_coro())[:60] for t in asyncio.all_tasks()
        )
    finally:
        await writer.aclose()
