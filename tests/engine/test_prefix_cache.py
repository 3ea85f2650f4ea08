"""Automatic prefix caching without a model: the allocator's evictable pool, the prefix index, the scheduler.

The property test keeps a shadow of the KV cache: each slot remembers the tokens whose K/V it holds (the
whole context up to its position, since K/V depend on all of it). Before every step, each chunk's cached
positions must hold exactly its sequence's context, so a block evicted, reused or written while another
sequence still reads it would show up as a mismatch, whatever the fake model samples.
"""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from backends.local.engine.kv_cache import BlockAllocator
from backends.local.engine.prefix_cache import PrefixIndex
from backends.local.engine.scheduler import RequestTooLarge, SamplingParams, Scheduler, SchedulerConfig, Seq
from backends.local.engine.types import StepPlan
from tests.engine.test_scheduler import teacher_forced, token_at


def prompt(n: int, salt: int, shared: int = 0) -> list[int]:
    """The first `shared` tokens are common to every salt; the rest are the salt's own."""
    return [token_at(p) if p < shared else salt * 100_000 + token_at(p) for p in range(n)]


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def make(num_blocks: int = 64, *, block_size: int = 4, budget: int = 64, max_batch: int = 8, spec: int = 0,
         caching: bool = True) -> tuple[Scheduler, BlockAllocator]:  # fmt: skip
    blocks = BlockAllocator(num_blocks)
    config = SchedulerConfig(
        max_batch=max_batch,
        max_prefill_tokens=budget,
        block_size=block_size,
        num_spec_tokens=spec,
        prefix_caching=caching,
    )
    return Scheduler(config, blocks), blocks


class Shadow:
    """What each KV slot holds: the context (tokens up to and including its position) whose K/V it has."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[int, tuple[int, ...]] = {}

    def slot(self, table: tuple[int, ...], pos: int) -> int:
        return table[pos // self.bs] * self.bs + pos % self.bs

    def check_and_write(self, scheduler: Scheduler, plan: StepPlan) -> None:
        for chunk in plan.chunks:
            seq = scheduler.get(chunk.seq_id)
            assert seq is not None
            tokens = seq.tokens
            for pos in range(chunk.start_pos):
                assert self.slots.get(self.slot(chunk.block_table, pos)) == tuple(tokens[: pos + 1]), (
                    f"sequence {chunk.seq_id} reads a stale slot at position {pos}"
                )
        for chunk in plan.chunks:  # writes after all reads: chunks of one step run as one forward pass
            seq = scheduler.get(chunk.seq_id)
            assert seq is not None
            context = tuple(seq.tokens[: chunk.start_pos])
            for i, token in enumerate(chunk.token_ids):
                context += (token,)
                self.slots[self.slot(chunk.block_table, chunk.start_pos + i)] = context


def step(
    scheduler: Scheduler, shadow: Shadow | None = None, *, wrong_draft: int = 1
) -> tuple[StepPlan, list[Seq]]:
    """One step of a fake model that samples `token_at(position)`; drafts are right except one."""
    plan = scheduler.schedule()
    drafts = {
        c.seq_id: [
            token_at(c.start_pos + 1 + i) if i != wrong_draft else -1
            for i in range(scheduler.draft_rooms().get(c.seq_id, 0))
        ]
        for c in plan.chunks
    }
    plan = scheduler.with_drafts(plan, drafts)
    if shadow is not None:
        shadow.check_and_write(scheduler, plan)
    return plan, scheduler.update(plan, teacher_forced(plan))


def run_all(scheduler: Scheduler, shadow: Shadow | None = None) -> dict[int, Seq]:
    done: dict[int, Seq] = {}
    for _ in range(10_000):
        if not scheduler.has_work:
            return done
        done.update((s.seq_id, s) for s in step(scheduler, shadow)[1])
    raise AssertionError("the scheduler made no progress")


# -- the allocator ------------------------------------------------------------------------------------------


def test_cached_blocks_are_evictable_and_can_be_taken_back() -> None:
    allocator = BlockAllocator(4)
    blocks = allocator.allocate(3)
    assert blocks == [0, 1, 2]
    allocator.free(reversed(blocks), cached={0, 1})  # block 2 holds nothing worth keeping
    assert allocator.num_free == 4 and allocator.num_evictable == 2
    allocator.share([0])  # a new request reuses block 0: it is held again, no longer evictable
    assert allocator.ref_count(0) == 1 and allocator.num_evictable == 1 and allocator.num_free == 3
    # Free blocks go first (2, then 3), then the least recently freed cached one (1).
    assert allocator.allocate(3) == [2, 3, 1]
    assert allocator.allocate(1) is None and allocator.num_free == 0


def test_eviction_follows_the_order_blocks_were_freed_in() -> None:
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(2), allocator.allocate(2)
    assert a is not None and b is not None
    allocator.free(reversed(a), cached=set(a))  # a's tail first: its head is evicted last
    allocator.free(reversed(b), cached=set(b))
    assert allocator.allocate(4) == [a[1], a[0], b[1], b[0]]


def test_uncache_returns_an_evictable_block_to_the_free_list() -> None:
    allocator = BlockAllocator(2)
    blocks = allocator.allocate(2)
    assert blocks is not None
    allocator.free(blocks, cached=set(blocks))
    allocator.uncache(blocks[0])
    assert allocator.num_evictable == 1 and allocator.num_free == 2
    try:
        allocator.share([blocks[0]])
    except ValueError as exc:
        assert "free" in str(exc)
    else:
        raise AssertionError("a free block was shared")


# -- the index ----------------------------------------------------------------------------------------------


def test_the_index_matches_whole_blocks_of_the_same_leading_tokens() -> None:
    index = PrefixIndex(block_size=2)
    index.add([5, 6, 7], [1, 2, 3, 4, 5, 6], 0, 3)
    assert index.match([1, 2, 3, 4, 5, 6, 9]) == [5, 6, 7]
    assert index.match([1, 2, 3, 4, 5, 6]) == [5, 6]  # the last token is always left to compute
    assert index.match([1, 2, 3, 9, 5, 6, 9]) == [5]  # same tokens later, after a different block: no match
    assert index.match([2, 2, 3, 4]) == []


def test_forgetting_a_block_forgets_everything_indexed_under_it() -> None:
    index = PrefixIndex(block_size=2)
    index.add([5, 6, 7], [1, 2, 3, 4, 5, 6], 0, 3)
    index.add([5, 8], [1, 2, 9, 9], 1, 2)  # a sibling of block 6 under block 5
    assert sorted(index.forget(5)) == [6, 7, 8]
    assert len(index) == 0 and index.match([1, 2, 3, 4, 5, 6, 9]) == []


def test_a_block_is_indexed_only_under_an_indexed_parent() -> None:
    index = PrefixIndex(block_size=2)
    index.add([5], [1, 2], 0, 1)
    index.add([9, 10], [1, 2, 3, 4], 0, 2)  # block 9 duplicates block 5's content: 5 wins, so 10 is skipped
    assert 9 not in index and 10 not in index
    assert index.match([1, 2, 3, 4, 0]) == [5]


# -- the scheduler ------------------------------------------------------------------------------------------


def test_a_finished_requests_blocks_serve_the_next_request_with_its_prefix() -> None:
    scheduler, blocks = make(block_size=4)
    scheduler.add(1, prompt(12, 0), params(4))
    run_all(scheduler)
    assert blocks.num_free == 64 and blocks.num_evictable == 3  # 15 positions: 3 full blocks stay cached
    scheduler.add(2, prompt(15, 0), params(4))  # the same 12 tokens, then 3 more
    plan, _ = step(scheduler)
    chunk = plan.chunks[0]
    assert chunk.start_pos == 12 and chunk.token_ids == tuple(prompt(15, 0)[12:])
    assert scheduler.num_prefix_hit_tokens == 12
    done = run_all(scheduler)
    assert done[2].output_ids == [token_at(15 + i) for i in range(4)]


def test_an_agents_next_turn_reuses_the_previous_turns_prompt_and_output() -> None:
    scheduler, _ = make(block_size=4)
    scheduler.add(1, prompt(10, 3), params(7))
    turn1 = run_all(scheduler)[1]
    history = [*turn1.prompt_ids, *turn1.output_ids]  # 17 tokens; 16 of them have K/V (4 full blocks)
    scheduler.add(2, [*history, 77, 78, 79], params(2))
    plan, _ = step(scheduler)
    assert plan.chunks[0].start_pos == 16 and scheduler.num_prefix_hit_tokens == 16


def test_without_prefix_caching_nothing_outlives_its_request() -> None:
    scheduler, blocks = make(block_size=4, caching=False)
    scheduler.add(1, prompt(12, 0), params(4))
    run_all(scheduler)
    assert blocks.num_evictable == 0
    scheduler.add(2, prompt(15, 0), params(4))
    plan, _ = step(scheduler)
    assert plan.chunks[0].start_pos == 0 and scheduler.num_prefix_hit_tokens == 0


def test_a_full_cache_evicts_the_least_recently_used_prefix_and_the_output_stays_right() -> None:
    scheduler, blocks = make(num_blocks=8, block_size=4)
    shadow = Shadow(4)
    scheduler.add(1, prompt(16, 1), params(1))  # 4 blocks, all cached after it ends
    run_all(scheduler, shadow)
    scheduler.add(2, prompt(16, 2), params(1))  # 4 more: the cache is full of cached blocks
    run_all(scheduler, shadow)
    assert blocks.num_evictable == 8
    scheduler.add(3, prompt(16, 1), params(1))  # salt 1 again: its 3 leading blocks are reused
    run_all(scheduler, shadow)
    assert scheduler.num_prefix_hit_tokens == 12 and scheduler.num_evicted_blocks == 1
    scheduler.add(4, prompt(20, 4), params(1))  # 5 new blocks: salt 2's 4 (least recently used) go first
    done = run_all(scheduler, shadow)
    assert done[4].output_ids == [token_at(20)] and scheduler.num_evicted_blocks == 6
    scheduler.add(5, prompt(17, 1), params(1))  # salt 1's first 3 blocks were used more recently: cached
    plan, _ = step(scheduler, shadow)
    assert plan.chunks[0].start_pos == 12
    run_all(scheduler, shadow)
    scheduler.add(6, prompt(17, 2), params(1))  # salt 2's were evicted
    plan, _ = step(scheduler, shadow)
    assert plan.chunks[0].start_pos == 0
    run_all(scheduler, shadow)
    assert blocks.num_free == 8


def test_a_preempted_sequence_resumes_from_its_blocks_still_cached() -> None:
    scheduler, _ = make(num_blocks=6, budget=64)  # each request needs 4 blocks to finish: one is preempted
    scheduler.add(1, prompt(8, 1), params(8))
    scheduler.add(2, prompt(8, 2), params(8))
    resumed = None
    for _ in range(40):
        plan, _ = step(scheduler)
        seq2 = scheduler.get(2)
        chunk = next((c for c in plan.chunks if c.seq_id == 2), None)
        if seq2 is not None and seq2.num_preemptions and chunk is not None and resumed is None:
            resumed = chunk.start_pos
        if not scheduler.has_work:
            break
    assert resumed is not None and resumed > 0  # not recomputed from position 0
    assert scheduler.num_prefix_hit_tokens == 0  # a readmission is not a prompt served from the cache


@settings(max_examples=100, deadline=None)
@given(
    num_blocks=st.integers(4, 20),
    block_size=st.sampled_from([1, 2, 4]),
    max_batch=st.integers(1, 4),
    budget=st.integers(1, 16),
    spec=st.integers(0, 2),
    requests=st.lists(
        st.tuples(
            st.integers(1, 14), st.integers(1, 8), st.integers(0, 40), st.integers(0, 3), st.integers(0, 12)
        ),
        max_size=14,
    ),  # fmt: skip
)
def test_eviction_under_pressure_never_corrupts_a_running_sequence(
    num_blocks: int,
    block_size: int,
    max_batch: int,
    budget: int,
    spec: int,
    requests: list[tuple[int, int, int, int, int]],
) -> None:
    """Prompts sharing leading tokens arrive over time into a small cache: every chunk reads only slots that
    hold its own context (the shadow), outputs are right, and every block comes back free or evictable."""
    scheduler, blocks = make(num_blocks, block_size=block_size, max_batch=max_batch, budget=budget, spec=spec)
    shadow = Shadow(block_size)
    pending = sorted(enumerate(requests), key=lambda r: r[1][2])
    accepted: dict[int, tuple[list[int], int]] = {}
    done: dict[int, Seq] = {}
    for now in range(5000):
        while pending and pending[0][1][2] <= now:
            seq_id, (prompt_len, max_tokens, _, salt, shared) = pending.pop(0)
            ids = prompt(prompt_len, salt, shared)
            try:
                scheduler.add(seq_id, ids, params(max_tokens))
            except RequestTooLarge:
                continue
            accepted[seq_id] = (ids, max_tokens)
        if not pending and not scheduler.has_work:
            break
        hits, evicted = scheduler.num_prefix_hit_tokens, scheduler.num_evicted_blocks
        _, finished = step(scheduler, shadow)
        if scheduler.num_prefix_hit_tokens > hits:
            event("a prefix hit")
        if scheduler.num_evicted_blocks > evicted:
            event("evicted a cached block")
        done.update((s.seq_id, s) for s in finished)
        held = {b for i in accepted if (seq := scheduler.get(i)) is not None for b in seq.block_table}
        assert len(held) + blocks.num_free == num_blocks
    assert set(done) == set(accepted)
    for seq_id, (ids, max_tokens) in accepted.items():
        assert done[seq_id].output_ids == [token_at(len(ids) + i) for i in range(max_tokens)]
    assert blocks.num_free == num_blocks
