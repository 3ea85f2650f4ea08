"""The scheduler's side of a suspended step (`hold` / `unhold`), fed made-up tokens: no model, no torch.

While a step is suspended mid-forward its sequences' blocks are still being written, so the steps run in
between must neither plan, preempt nor free them, and give batch work no rows.
"""

from __future__ import annotations

import pytest

from backends.local.engine.kv_cache import BlockAllocator
from backends.local.engine.scheduler import (
    Priority,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SeqStatus,
)


def params(priority: Priority) -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=0, priority=priority)


def test_held_sequences_sit_out_the_steps_run_inside_theirs_and_come_back_after() -> None:
    blocks = BlockAllocator(10)
    scheduler = Scheduler(SchedulerConfig(max_batch=2, max_prefill_tokens=64, block_size=4), blocks)
    for seq_id in (1, 2):
        scheduler.add(seq_id, [seq_id] * 8, params(Priority.BATCH))
    prefill = scheduler.schedule()
    scheduler.update(prefill, {1: [11], 2: [12]})
    in_flight = scheduler.schedule()  # the two batch decodes: the step that gets suspended
    assert sorted(c.seq_id for c in in_flight.chunks) == [1, 2]
    held_blocks = {b for c in in_flight.chunks for b in c.block_table}

    scheduler.hold({1, 2})
    scheduler.add(3, [3] * 6, params(Priority.INTERACTIVE))
    scheduler.add(4, [4] * 4, params(Priority.BATCH))
    inner = scheduler.schedule()
    # Only the interactive arrival, though max_batch sequences run: the held ones cannot be displaced.
    assert [c.seq_id for c in inner.chunks] == [3]
    assert scheduler.num_preemptions == 0 and scheduler.num_running == 3
    assert all(blocks.ref_count(b) == 1 for b in held_blocks)
    assert not held_blocks & set(inner.chunks[0].block_table)
    with pytest.raises(RuntimeError, match="suspended step"):
        scheduler.abort(1)
    scheduler.update(inner, {3: [13]})
    assert [c.seq_id for c in scheduler.schedule().chunks] == [3]  # still held: still no batch rows

    scheduler.unhold()
    scheduler.update(in_flight, {1: [21], 2: [22]})
    after = scheduler.schedule()
    assert [c.seq_id for c in after.chunks] == [3, 1, 2]  # interactive first; 4 waits for a free slot
    assert scheduler.get(4).status is SeqStatus.WAITING  # type: ignore[union-attr]
    assert scheduler.get(1).output_ids == [11, 21]  # type: ignore[union-attr]
    scheduler.abort(1)
    assert blocks.num_free == 10 - sum(len(scheduler.get(s).block_table) for s in (2, 3))  # type: ignore[union-attr]
