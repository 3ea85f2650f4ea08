"""The scheduler fed made-up outputs: no model, no torch, no clock.

A fake "model" samples token `1000 + position`, so a sequence's tokens do not depend on how its steps were
batched, chunked or recomputed, and a test can check every chunk against the sequence it came from.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.local.engine.kv_cache import BlockAllocator
from backends.local.engine.scheduler import (
    SHORT_SCAN_LIMIT,
    FinishCause,
    Priority,
    RequestTooLarge,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    Seq,
    SeqStatus,
)
from backends.local.engine.types import StepPlan

EOS = 7


def make(
    num_blocks: int = 64,
    *,
    block_size: int = 4,
    max_batch: int = 8,
    budget: int = 64,
    spec: int = 0,
    caching: bool = True,
    short: int = 128,
) -> tuple[Scheduler, BlockAllocator]:
    blocks = BlockAllocator(num_blocks)
    config = SchedulerConfig(
        max_batch=max_batch,
        max_prefill_tokens=budget,
        block_size=block_size,
        num_spec_tokens=spec,
        prefix_caching=caching,
        short_prefill_tokens=short,
    )
    return Scheduler(config, blocks), blocks


def token_at(position: int) -> int:
    return 1000 + position


def teacher_forced(plan: StepPlan) -> dict[int, list[int]]:
    """What a model that always predicts `token_at` samples for each chunk: drafts accepted up to the first
    wrong one, then the model's own token."""
    sampled = {}
    for c in plan.chunks:
        if c.num_logits == 0:
            continue
        first = c.start_pos + len(c.token_ids) - c.num_logits  # logits row r predicts position first + r + 1
        targets = [token_at(first + r + 1) for r in range(c.num_logits)]
        accepted = []
        for draft, target in zip(c.token_ids[len(c.token_ids) - c.num_logits + 1 :], targets, strict=False):
            accepted.append(target)
            if draft != target:
                break
        else:
            accepted.append(targets[-1])
        sampled[c.seq_id] = accepted
    return sampled


def check_plan(scheduler: Scheduler, plan: StepPlan) -> None:
    """Every chunk continues its sequence and fits its blocks; the blocks it writes are its alone."""
    bs = scheduler.config.block_size
    written: set[int] = set()
    for chunk in plan.chunks:
        seq = scheduler.get(chunk.seq_id)
        assert seq is not None and seq.status is SeqStatus.RUNNING
        assert chunk.start_pos == seq.num_computed
        assert list(chunk.token_ids[:1]) == seq.tokens[chunk.start_pos : chunk.start_pos + 1]
        end = chunk.start_pos + len(chunk.token_ids)
        assert end <= len(chunk.block_table) * bs
        mine = set(chunk.block_table[chunk.start_pos // bs : -(-end // bs)])
        assert all(scheduler.allocator.ref_count(b) == 1 for b in mine)
        assert not written & mine
        written |= mine


def step(scheduler: Scheduler, *, wrong_draft: int = 1) -> tuple[StepPlan, list[Seq]]:
    """One step of the fake model; decodes with draft room get drafts, all right but the `wrong_draft`-th."""
    plan = scheduler.schedule()
    drafts = {}
    for chunk in plan.chunks:
        room = scheduler.draft_rooms().get(chunk.seq_id, 0)
        drafts[chunk.seq_id] = [
            token_at(chunk.start_pos + 1 + i) if i != wrong_draft else -1 for i in range(room)
        ]
    plan = scheduler.with_drafts(plan, drafts)
    check_plan(scheduler, plan)
    return plan, scheduler.update(plan, teacher_forced(plan))


def run_all(scheduler: Scheduler, max_steps: int = 10_000) -> dict[int, Seq]:
    done: dict[int, Seq] = {}
    for _ in range(max_steps):
        if not scheduler.has_work:
            return done
        _, finished = step(scheduler)
        done.update((s.seq_id, s) for s in finished)
    raise AssertionError("the scheduler made no progress")


def params(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def prompt(n: int, salt: int) -> list[int]:
    """Prompts with different salts share no block; with the same salt, one is a prefix of the other."""
    return [salt * 100_000 + token_at(p) for p in range(n)]


def expected_output(prompt_len: int, max_tokens: int) -> list[int]:
    return [token_at(prompt_len + i) for i in range(max_tokens)]


def test_a_new_request_joins_the_running_batch_at_the_next_step() -> None:
    scheduler, _ = make()
    scheduler.add(1, prompt(5, 1), params(10))
    step(scheduler)
    plan = scheduler.schedule()
    assert [c.seq_id for c in plan.chunks] == [1]
    scheduler.update(plan, {1: [token_at(6)]})
    scheduler.add(2, prompt(3, 2), params(10))
    plan = scheduler.schedule()
    assert {c.seq_id: len(c.token_ids) for c in plan.chunks} == {1: 1, 2: 3}


def test_a_finished_request_leaves_at_once_and_frees_its_blocks() -> None:
    scheduler, blocks = make()
    scheduler.add(1, prompt(5, 1), params(2))
    scheduler.add(2, prompt(5, 2), params(10))
    step(scheduler)
    _, finished = step(scheduler)
    assert [s.seq_id for s in finished] == [1]
    assert finished[0].finish_cause is FinishCause.LENGTH and finished[0].status is SeqStatus.FINISHED
    assert scheduler.get(1) is None and scheduler.num_running == 1
    assert blocks.num_free == 64 - len(scheduler.get(2).block_table)  # type: ignore[union-attr]
    assert [c.seq_id for c in scheduler.schedule().chunks] == [2]


def test_a_stop_token_finishes_with_stop() -> None:
    scheduler, blocks = make()
    scheduler.add(1, prompt(5, 1), params(10), stop_token_ids=[EOS])
    plan = scheduler.schedule()
    [seq] = scheduler.update(plan, {1: [EOS]})
    assert seq.finish_cause is FinishCause.STOP and seq.output_ids == [EOS]
    assert blocks.num_free == 64


def test_long_prompt_is_chunked_and_interleaves_with_decodes() -> None:
    scheduler, _ = make(budget=8)
    scheduler.add(1, prompt(4, 1), params(50))
    step(scheduler)
    scheduler.add(2, prompt(30, 2), params(3))
    chunk_sizes = []
    for _ in range(4):
        plan, _ = step(scheduler)
        by_seq = {c.seq_id: c for c in plan.chunks}
        assert len(by_seq[1].token_ids) == 1  # the decode runs every step
        chunk_sizes.append((len(by_seq[2].token_ids), by_seq[2].num_logits))
    assert chunk_sizes == [(8, 0), (8, 0), (8, 0), (6, 1)]  # logits only for the prompt's last token
    assert scheduler.get(2).output_ids == [token_at(30)]  # type: ignore[union-attr]


def first_token_steps(scheduler: Scheduler, steps: int) -> dict[int, int]:
    """seq_id -> the step (from 1) whose plan computed its last prompt token."""
    firsts: dict[int, int] = {}
    for i in range(1, steps + 1):
        plan, _ = step(scheduler)
        for c in plan.chunks:
            seq = scheduler.get(c.seq_id)
            if c.num_logits and seq is not None and len(seq.output_ids) == 1:
                firsts.setdefault(c.seq_id, i)
    return firsts


@pytest.mark.parametrize(("short", "step_of_short"), [(128, 1), (0, 4)])
def test_a_short_prompt_goes_ahead_of_a_long_prompts_remaining_chunks(short: int, step_of_short: int) -> None:
    # Budget 16: a 64-token prompt takes four steps. A 6-token prompt arriving after its first chunk computes
    # whole in the next step, beside the long prompt's chunk; oldest first (short=0) it waits out all three.
    scheduler, _ = make(budget=16, short=short)
    scheduler.add(1, prompt(64, 1), params(2))
    step(scheduler)
    scheduler.add(2, prompt(6, 2), params(2))
    firsts = first_token_steps(scheduler, 5)
    assert firsts[2] == step_of_short
    assert firsts[1] == (4 if short else 3)  # what it costs the long prompt: its 6 tokens, a step here


def test_short_prompts_take_at_most_half_a_step_and_the_long_prompt_every_other_step() -> None:
    # Six 4-token questions behind a 64-token prompt, budget 16: two questions fit in half a step. They run
    # alone in one step, and the next carries the long prompt's chunk (at least half the budget) beside
    # the next two, so however many short ones arrive the long prompt waits at most every other step.
    scheduler, _ = make(budget=16)
    scheduler.add(1, prompt(64, 1), params(2))
    step(scheduler)
    for seq_id in range(2, 8):
        scheduler.add(seq_id, prompt(4, seq_id), params(8))
    long_chunks = []
    for _ in range(6):
        plan, _ = step(scheduler)
        chunks = {c.seq_id: len(c.token_ids) for c in plan.chunks}
        assert sum(n for seq_id, n in chunks.items() if seq_id != 1 and n > 1) <= 8
        long_chunks.append(chunks.get(1, 0))
    assert long_chunks == [0, 8, 0, 16, 16, 8]  # two alone, two beside it, the last two alone, then its own
    assert scheduler.num_short_steps == 2


def test_an_agent_turn_is_short_by_what_its_cached_history_leaves_to_compute() -> None:
    # Turn 1 (40 tokens) finishes and stays cached; turn 2 repeats it and its answer and adds 5 tokens: 48
    # tokens of prompt, 8 of them to compute, so it goes ahead of a long prompt already prefilling.
    scheduler, _ = make(budget=16)
    scheduler.add(1, prompt(40, 1), params(4))
    done = run_all(scheduler)
    scheduler.add(2, prompt(64, 2), params(2))
    step(scheduler)
    turn2 = [*prompt(40, 1), *done[1].output_ids[:3], 7_000_001, 7_000_002, 7_000_003, 7_000_004, 7_000_005]
    scheduler.add(3, turn2, params(2))
    plan, _ = step(scheduler)
    chunks = {c.seq_id: c for c in plan.chunks}
    assert chunks[3].start_pos == 40 and chunks[3].num_logits == 1  # cached 40, computes the last 8
    assert 2 not in chunks  # alone: the long prompt's next chunk waits for the next step
    plan, _ = step(scheduler)
    assert {c.seq_id: len(c.token_ids) for c in plan.chunks}[2] == 16


@pytest.mark.parametrize(("ahead", "jumps"), [(SHORT_SCAN_LIMIT - 1, True), (SHORT_SCAN_LIMIT, False)])
def test_the_short_pass_looks_only_so_far_down_the_waiting_queue(ahead: int, jumps: bool) -> None:
    # A question behind `ahead` waiting long prompts goes first only if the short pass reaches it; past the
    # limit it waits its turn (oldest first), so an overloaded queue is not prefix-matched whole every step.
    scheduler, _ = make(num_blocks=400, budget=16, max_batch=3)
    scheduler.add(1, prompt(64, 1), params(2))
    step(scheduler)
    for seq_id in range(2, 2 + ahead):
        scheduler.add(seq_id, prompt(64, seq_id), params(2))
    question = 2 + ahead
    scheduler.add(question, prompt(6, question), params(2))
    plan, _ = step(scheduler)
    planned = {c.seq_id for c in plan.chunks}
    assert (question in planned) is jumps
    assert (1 in planned) is not jumps  # a question that jumps runs alone; else the long prompt's chunk


def test_prefill_tokens_per_step_stay_within_the_budget_and_batch() -> None:
    scheduler, _ = make(num_blocks=400, budget=10, max_batch=3)
    for seq_id in range(6):
        scheduler.add(seq_id, prompt(7, seq_id), params(5))
    for _ in range(30):
        if not scheduler.has_work:
            break
        plan, _ = step(scheduler)
        prefill = sum(len(c.token_ids) for c in plan.chunks if len(c.token_ids) > 1 or c.num_logits == 0)
        assert prefill <= 10 and len(plan.chunks) <= 3 and scheduler.num_running <= 3
    assert not scheduler.has_work


def test_waiting_requests_are_admitted_in_arrival_order() -> None:
    scheduler, _ = make(max_batch=1)
    for seq_id in (5, 3, 9):
        scheduler.add(seq_id, prompt(2, seq_id), params(1))
    order = [step(scheduler)[1][0].seq_id for _ in range(3)]
    assert order == [5, 3, 9]


def batch(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, priority=Priority.BATCH)


class Clock:
    """The scheduler's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def due_in(
    ms: float | None, max_tokens: int = 1, priority: Priority = Priority.INTERACTIVE
) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, priority=priority, deadline_ms=ms)


def finish_order(scheduler: Scheduler) -> list[int]:
    """Step until idle; the ids in the order their sequences finished."""
    done = []
    while scheduler.has_work:
        done += [s.seq_id for s in step(scheduler)[1]]
    return done


def timed(clock: Clock, **kwargs: int) -> Scheduler:
    scheduler, blocks = make(**kwargs)
    return Scheduler(scheduler.config, blocks, clock=clock)


def test_waiting_requests_are_admitted_earliest_deadline_first() -> None:
    scheduler = timed(Clock(), max_batch=1)
    scheduler.add(1, prompt(2, 1), due_in(None))  # the default: 10 s
    scheduler.add(2, prompt(2, 2), due_in(4000))
    scheduler.add(3, prompt(2, 3), due_in(2500))
    scheduler.add(4, prompt(2, 4), due_in(4000))  # same deadline as 2: arrival order between them
    order = [step(scheduler)[1][0].seq_id for _ in range(4)]
    assert order == [3, 2, 4, 1]


def test_a_request_without_a_deadline_is_overtaken_only_by_those_due_before_it() -> None:
    clock = Clock()
    scheduler = timed(clock, max_batch=1)
    scheduler.add(1, prompt(2, 1), due_in(None, max_tokens=3))
    step(scheduler)  # 1 runs: the others wait
    scheduler.add(2, prompt(2, 2), due_in(None))  # due at 110 s
    clock.now += 9
    scheduler.add(3, prompt(2, 3), due_in(2500))  # due at 111.5 s: after 2
    clock.now -= 4
    scheduler.add(4, prompt(2, 4), due_in(2500))  # due at 107.5 s: before 2
    assert finish_order(scheduler) == [1, 4, 2, 3]


def test_the_earliest_due_prompt_gets_the_steps_prefill_budget() -> None:
    scheduler = timed(Clock(), budget=8, short=0)
    scheduler.add(1, prompt(32, 1), due_in(None))
    scheduler.add(2, prompt(32, 2), due_in(2500, max_tokens=4))
    for _ in range(4):  # 2 is computed whole before 1 gets a token
        plan, _ = step(scheduler)
        assert [(c.seq_id, len(c.token_ids)) for c in plan.chunks] == [(2, 8)]
    plan, _ = step(scheduler)
    assert [c.seq_id for c in plan.chunks] == [2, 1]  # 2 decodes, 1 prefills


def test_a_deadline_does_not_lift_batch_work_above_interactive_work() -> None:
    scheduler = timed(Clock(), max_batch=1)
    scheduler.add(1, prompt(2, 1), due_in(1, priority=Priority.BATCH))
    scheduler.add(2, prompt(2, 2), due_in(None))
    order = [step(scheduler)[1][0].seq_id for _ in range(2)]
    assert order == [2, 1]


def test_the_latest_due_running_request_is_preempted_first() -> None:
    # As test_the_youngest_is_preempted_..., but the younger request is due sooner: the older one yields.
    scheduler = timed(Clock(), num_blocks=6, caching=False)
    scheduler.add(1, prompt(8, 1), due_in(None, max_tokens=8))
    scheduler.add(2, prompt(8, 2), due_in(1000, max_tokens=8))
    while scheduler.num_preemptions == 0:
        step(scheduler)
    assert scheduler.get(1).status is SeqStatus.PREEMPTED  # type: ignore[union-attr]
    assert scheduler.get(2).status is SeqStatus.RUNNING  # type: ignore[union-attr]
    done = run_all(scheduler)
    assert done[1].output_ids == expected_output(8, 8) and done[2].output_ids == expected_output(8, 8)


def test_a_request_that_missed_its_deadline_waits_behind_those_still_on_time() -> None:
    clock = Clock()
    scheduler = timed(clock, max_batch=1)
    scheduler.add(1, prompt(2, 1), due_in(None, max_tokens=3))
    step(scheduler)  # 1 runs: the others wait
    scheduler.add(2, prompt(2, 2), due_in(100))  # due at 100.1 s
    scheduler.add(3, prompt(2, 3), due_in(2000))  # due at 102 s
    clock.now += 0.5  # 2 can no longer be on time; 3 still can
    assert finish_order(scheduler) == [1, 3, 2]
    assert scheduler.num_requeued_late == 1


def test_a_late_request_is_re_queued_as_one_without_a_deadline_arriving_then() -> None:
    # Missed at 100.1 s, 2 is ordered as if due 110.1 s: behind a request without a deadline that arrived
    # before it missed (due 110.05 s), ahead of one that arrived after (due 110.2 s): never starved.
    clock = Clock()
    scheduler = timed(clock, max_batch=1)
    scheduler.add(1, prompt(2, 1), due_in(None, max_tokens=3))
    step(scheduler)
    scheduler.add(2, prompt(2, 2), due_in(100))
    clock.now += 0.05
    scheduler.add(3, prompt(2, 3), due_in(None))
    clock.now += 0.15
    scheduler.add(4, prompt(2, 4), due_in(None))
    assert finish_order(scheduler) == [1, 3, 2, 4]


def test_requests_without_a_deadline_keep_arrival_order_however_long_they_wait() -> None:
    clock = Clock()
    scheduler = timed(clock, max_batch=1)
    scheduler.add(1, prompt(2, 1), due_in(None, max_tokens=3))
    step(scheduler)
    scheduler.add(2, prompt(2, 2), due_in(None))
    clock.now += 30  # 2 is long past its default deadline
    scheduler.add(3, prompt(2, 3), due_in(None))
    assert finish_order(scheduler) == [1, 2, 3]
    assert scheduler.num_requeued_late == 0


def test_a_late_prompt_yields_the_steps_prefill_budget_to_an_on_time_one() -> None:
    clock = Clock()
    scheduler = timed(clock, budget=8, short=0)
    scheduler.add(1, prompt(32, 1), due_in(100))
    scheduler.add(2, prompt(32, 2), due_in(5000, max_tokens=4))
    clock.now += 1  # 1 missed its deadline before its first step
    for _ in range(4):  # 2 is computed whole before 1 gets a token
        plan, _ = step(scheduler)
        assert [(c.seq_id, len(c.token_ids)) for c in plan.chunks] == [(2, 8)]
    done = run_all(scheduler)
    assert done[1].output_ids == expected_output(32, 1) and done[2].output_ids == expected_output(32, 4)


def test_a_request_past_its_deadline_after_its_first_token_keeps_its_place() -> None:
    # Re-queueing is for the first token only: one already decoding is not pushed back (nor counted).
    clock = Clock()
    scheduler = timed(clock, num_blocks=6, caching=False)
    scheduler.add(1, prompt(8, 1), due_in(100, max_tokens=8))
    scheduler.add(2, prompt(8, 2), due_in(1000, max_tokens=8))
    step(scheduler)  # both prefill and get a first token on time
    clock.now += 5
    while scheduler.num_preemptions == 0:
        step(scheduler)
    assert scheduler.get(2).status is SeqStatus.PREEMPTED  # type: ignore[union-attr]
    assert scheduler.num_requeued_late == 0


@pytest.mark.parametrize("ms", [0.0, -1.0, float("inf"), float("nan")])
def test_a_default_deadline_must_be_positive_and_finite(ms: float) -> None:
    with pytest.raises(ValueError, match="default_deadline_ms"):
        SchedulerConfig(default_deadline_ms=ms)


def test_interactive_requests_are_admitted_ahead_of_earlier_batch_ones() -> None:
    scheduler, _ = make(max_batch=1)
    scheduler.add(1, prompt(2, 1), batch(1))
    scheduler.add(2, prompt(2, 2), batch(1))
    scheduler.add(3, prompt(2, 3), params(1))  # arrives last, runs first
    order = [step(scheduler)[1][0].seq_id for _ in range(3)]
    assert order == [3, 1, 2]


def test_an_interactive_request_preempts_batch_work_for_its_blocks_and_slot() -> None:
    # 8 blocks of 4 slots; two batch requests hold 4 blocks each once prefilled and decoding.
    scheduler, blocks = make(num_blocks=8, max_batch=2, budget=64)
    scheduler.add(1, prompt(12, 1), batch(4))
    scheduler.add(2, prompt(12, 2), batch(4))
    step(scheduler)
    assert scheduler.num_running == 2
    scheduler.add(3, prompt(8, 3), params(4))
    plan, _ = step(scheduler)
    assert 3 in [c.seq_id for c in plan.chunks]  # admitted at once, not behind the batch
    assert scheduler.get(2).status is SeqStatus.PREEMPTED  # type: ignore[union-attr]  # the youngest batch
    done = run_all(scheduler)
    assert done[2].output_ids == expected_output(12, 4) and done[2].num_preemptions >= 1  # recomputed
    assert done[3].num_preemptions == 0 and blocks.num_free == 8


def test_batch_work_never_preempts_interactive_work() -> None:
    scheduler, _ = make(num_blocks=8, max_batch=2, budget=64)
    scheduler.add(1, prompt(12, 1), params(4))
    scheduler.add(2, prompt(12, 2), params(4))
    step(scheduler)
    scheduler.add(3, prompt(8, 3), batch(4))
    plan, _ = step(scheduler)
    assert 3 not in [c.seq_id for c in plan.chunks] and scheduler.num_preemptions == 0
    done = run_all(scheduler)
    assert done[1].num_preemptions == done[2].num_preemptions == 0 and done[3].output_ids == expected_output(
        8, 4
    )


def test_the_youngest_is_preempted_and_recomputed_with_its_outputs() -> None:
    # 6 blocks of 4 slots. Each request needs 8 + 8 - 1 = 15 slots (4 blocks) to finish. Without prefix
    # caching its blocks are gone (with it, see test_prefix_cache: it resumes from those still cached).
    scheduler, blocks = make(num_blocks=6, budget=64, caching=False)
    scheduler.add(1, prompt(8, 1), params(8))
    scheduler.add(2, prompt(8, 2), params(8))
    step(scheduler)  # both prefill: 2 + 2 blocks
    preempted_at = None
    for i in range(20):
        plan, _ = step(scheduler)
        seq2 = scheduler.get(2)
        if preempted_at is None and seq2 is not None and seq2.status is SeqStatus.PREEMPTED:
            preempted_at = i
            assert [c.seq_id for c in plan.chunks] == [1]  # the older one keeps running
            assert seq2.block_table == [] and seq2.num_computed == 0 and seq2.num_preemptions == 1
            kept_outputs = list(seq2.output_ids)
            assert kept_outputs  # it had produced tokens, which it keeps
        if preempted_at is not None and seq2 is not None and seq2.status is SeqStatus.RUNNING:
            recompute = next(c for c in plan.chunks if c.seq_id == 2)
            assert recompute.start_pos == 0 and list(recompute.token_ids) == prompt(8, 2) + kept_outputs
            break
    assert preempted_at is not None, "the cache never filled"
    done = run_all(scheduler)
    assert done[2].output_ids == expected_output(8, 8) and blocks.num_free == 6
    assert scheduler.num_preemptions >= 1


def test_a_preempted_request_is_readmitted_before_newer_ones() -> None:
    scheduler, _ = make(num_blocks=6, caching=False)  # readmissions start at position 0
    scheduler.add(1, prompt(8, 1), params(8))
    scheduler.add(2, prompt(8, 2), params(8))
    step(scheduler)
    while scheduler.get(2).status is not SeqStatus.PREEMPTED:  # type: ignore[union-attr]
        step(scheduler)
    scheduler.add(3, prompt(2, 3), params(2))
    admitted = []
    while scheduler.has_work:
        plan, _ = step(scheduler)
        admitted += [c.seq_id for c in plan.chunks if c.start_pos == 0 and c.seq_id not in admitted]
    assert admitted.index(2) < admitted.index(3)


def test_abort_frees_blocks_whether_running_or_waiting() -> None:
    scheduler, blocks = make(max_batch=1)
    scheduler.add(1, prompt(9, 1), params(20))
    scheduler.add(2, prompt(9, 2), params(20))
    step(scheduler)
    assert blocks.num_free < 64
    running = scheduler.abort(1)
    assert running is not None and running.finish_cause is FinishCause.ABORT
    assert blocks.num_free == 64 and scheduler.num_running == 0
    assert scheduler.abort(2) is not None and scheduler.num_waiting == 0
    assert scheduler.abort(2) is None and not scheduler.has_work


def test_tokens_sampled_for_an_aborted_sequence_are_ignored() -> None:
    scheduler, blocks = make()
    scheduler.add(1, prompt(3, 1), params(5))
    plan = scheduler.schedule()
    scheduler.abort(1)
    assert scheduler.update(plan, {1: [token_at(3)]}) == [] and blocks.num_free == 64


def test_a_request_that_can_never_fit_is_refused_with_a_hint() -> None:
    scheduler, _ = make(num_blocks=4)  # 16 slots
    scheduler.add(1, prompt(10, 1), params(7))  # 10 + 7 - 1 = 16 slots: fits exactly
    with pytest.raises(RequestTooLarge, match="lower max_tokens to at most 7"):
        scheduler.add(2, prompt(10, 2), params(8))
    with pytest.raises(RequestTooLarge, match="shorten the prompt"):
        scheduler.add(3, prompt(17, 3), params(1))


def test_a_request_needing_the_whole_cache_still_runs_behind_others() -> None:
    scheduler, blocks = make(num_blocks=4, max_batch=4)
    scheduler.add(1, prompt(3, 1), params(6))
    scheduler.add(2, prompt(10, 2), params(7))  # needs all 4 blocks
    scheduler.add(3, prompt(3, 3), params(6))
    done = run_all(scheduler)
    assert {s: len(d.output_ids) for s, d in done.items()} == {1: 6, 2: 7, 3: 6}
    assert blocks.num_free == 4


def test_draft_slots_are_reserved_and_partial_acceptance_keeps_positions_right() -> None:
    scheduler, _ = make(spec=3)
    scheduler.add(1, prompt(4, 1), params(10))
    step(scheduler)
    plan = scheduler.schedule()
    assert scheduler.draft_rooms() == {1: 3}
    plan = scheduler.with_drafts(plan, {1: [55, 56, 57]})
    [chunk] = plan.chunks
    assert chunk.token_ids == (token_at(4), 55, 56, 57) and chunk.num_logits == 4
    assert len(chunk.block_table) * 4 >= chunk.start_pos + 4
    scheduler.update(plan, {1: [55, 99]})  # one draft accepted, then the target's own token
    seq = scheduler.get(1)
    assert seq is not None and seq.output_ids == [token_at(4), 55, 99] and seq.num_computed == 6
    with pytest.raises(ValueError, match="room for 3"):
        scheduler.with_drafts(scheduler.schedule(), {1: [1, 2, 3, 4]})


def test_draft_room_never_exceeds_the_tokens_left() -> None:
    scheduler, _ = make(spec=4)
    scheduler.add(1, prompt(4, 1), params(3))
    step(scheduler)
    scheduler.schedule()
    assert scheduler.draft_rooms() == {1: 1}  # one token so far, max 3: one draft plus the bonus token


def test_without_prefix_caching_identical_prefixes_share_blocks_until_the_last_holder_leaves() -> None:
    scheduler, blocks = make(block_size=4, caching=False)
    scheduler.add(1, prompt(12, 0), params(4))
    step(scheduler)  # seq 1's 12 prompt tokens fill blocks 0..2
    scheduler.add(2, prompt(15, 0), params(4))  # same 12 tokens, then 3 more
    plan, _ = step(scheduler)
    seq1, seq2 = scheduler.get(1), scheduler.get(2)
    assert seq1 is not None and seq2 is not None
    chunk = next(c for c in plan.chunks if c.seq_id == 2)
    assert chunk.start_pos == 12 and chunk.token_ids == tuple(prompt(15, 0)[12:])
    assert seq2.block_table[:3] == seq1.block_table[:3]
    assert [blocks.ref_count(b) for b in seq2.block_table[:3]] == [2, 2, 2]
    assert scheduler.num_prefix_hit_tokens == 12
    done = run_all(scheduler)
    assert done[2].output_ids == expected_output(15, 4) and blocks.num_free == 64
    scheduler.add(3, prompt(15, 0), params(1))  # every holder left: nothing is indexed any more
    step(scheduler)
    assert scheduler.num_prefix_hit_tokens == 12


def test_the_last_prompt_token_is_always_computed() -> None:
    scheduler, _ = make(block_size=4)
    scheduler.add(1, prompt(8, 0), params(4))
    step(scheduler)
    scheduler.add(2, prompt(8, 0), params(4))  # the very same prompt: share one block, compute 4 tokens
    plan, _ = step(scheduler)
    chunk = next(c for c in plan.chunks if c.seq_id == 2)
    assert chunk.start_pos == 4 and chunk.num_logits == 1


def test_prefix_sharing_can_be_turned_off() -> None:
    blocks = BlockAllocator(64)
    scheduler = Scheduler(SchedulerConfig(block_size=4, prefix_sharing=False), blocks)
    scheduler.add(1, prompt(12, 0), params(4))
    step(scheduler)
    scheduler.add(2, prompt(12, 0), params(4))
    plan, _ = step(scheduler)
    assert next(c for c in plan.chunks if c.seq_id == 2).start_pos == 0


@settings(max_examples=80, deadline=None)
@given(
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_batch=st.integers(1, 6),
    budget=st.integers(1, 20),
    spec=st.integers(0, 3),
    requests=st.lists(
        st.tuples(
            st.integers(1, 12),
            st.integers(1, 10),
            st.integers(0, 5),
            st.integers(0, 2),
            st.sampled_from([None, 50.0, 300.0, 2000.0]),
        ),
        max_size=12,
    ),
)
def test_any_load_completes_within_the_blocks(
    num_blocks: int,
    block_size: int,
    max_batch: int,
    budget: int,
    spec: int,
    requests: list[tuple[int, int, int, int, float | None]],
) -> None:
    """Random prompts (some sharing prefixes), lengths, arrival steps, draft slots, priority classes and
    deadlines (a step is 100 ms, so some are missed and stepped back): every request that fits finishes with
    the right tokens, no written block is shared, and every block comes back."""
    made, blocks = make(num_blocks, block_size=block_size, max_batch=max_batch, budget=budget, spec=spec)
    clock = Clock()
    scheduler = Scheduler(made.config, blocks, clock=clock)
    pending = sorted(enumerate(requests), key=lambda r: r[1][2])
    accepted: dict[int, tuple[int, int]] = {}
    done: dict[int, Seq] = {}
    for now in range(5000):
        while pending and pending[0][1][2] <= now:
            seq_id, (prompt_len, max_tokens, _, salt, ms) = pending.pop(0)
            try:
                kind = batch(max_tokens) if seq_id % 3 == 1 else params(max_tokens)  # a mix of both classes
                kind = dataclasses.replace(kind, deadline_ms=ms)
                scheduler.add(seq_id, prompt(prompt_len, salt), kind)
            except RequestTooLarge:
                assert prompt_len + max_tokens - 1 > num_blocks * block_size
                continue
            accepted[seq_id] = (prompt_len, max_tokens)
        if not pending and not scheduler.has_work:
            break
        _, finished = step(scheduler)
        clock.now += 0.1
        done.update((s.seq_id, s) for s in finished)
        held = {b for i in accepted if (seq := scheduler.get(i)) is not None for b in seq.block_table}
        assert len(held) + blocks.num_free == num_blocks
    assert set(done) == set(accepted)
    for seq_id, (prompt_len, max_tokens) in accepted.items():
        assert done[seq_id].output_ids == expected_output(prompt_len, max_tokens)
    assert blocks.num_free == num_blocks


def capped(cap: int, **kw: int) -> tuple[Scheduler, BlockAllocator]:
    blocks = BlockAllocator(kw.pop("num_blocks", 200))
    config = SchedulerConfig(block_size=4, max_prefill_tokens=64, batch_rows_beside_interactive=cap, **kw)
    return Scheduler(config, blocks), blocks


def test_beside_interactive_work_only_capped_batch_rows_compute_and_the_rest_keep_their_blocks() -> None:
    scheduler, _ = capped(2, max_batch=8)
    for seq_id in range(5):
        scheduler.add(seq_id, prompt(6, seq_id), batch(20))
    step(scheduler)  # no interactive work: all five batch sequences run
    assert scheduler.num_running == 5
    held = {i: list(scheduler.get(i).block_table) for i in range(5)}  # type: ignore[union-attr]
    scheduler.add(9, prompt(6, 9), params(3))
    for _ in range(3):
        plan, _ = step(scheduler)
        ids = [c.seq_id for c in plan.chunks]
        assert 9 in ids and len([i for i in ids if i != 9]) == 2  # the interactive one and two batch rows
        assert {0, 1} <= set(ids)  # the oldest batch rows go on
    assert scheduler.get(9) is None  # finished after its 3 tokens
    for i in (2, 3, 4):  # sat out: still running, same blocks, nothing recomputed
        seq = scheduler.get(i)
        assert seq is not None and seq.status is SeqStatus.RUNNING and seq.num_preemptions == 0
        assert seq.block_table == held[i]
    plan, _ = step(scheduler)
    assert len(plan.chunks) == 5  # interactive work gone: every batch row runs again
    done = run_all(scheduler)
    assert all(done[i].output_ids == expected_output(6, 20) for i in range(5))
    assert scheduler.num_preemptions == 0


def test_batch_requests_wait_behind_capped_rows_and_a_cap_of_zero_pauses_batch_work() -> None:
    scheduler, _ = capped(1, max_batch=8)
    scheduler.add(1, prompt(4, 1), params(6))
    scheduler.add(2, prompt(4, 2), batch(2))
    scheduler.add(3, prompt(4, 3), batch(2))
    plan, _ = step(scheduler)
    assert sorted(c.seq_id for c in plan.chunks) == [1, 2]  # one batch row beside the interactive one
    paused, _ = capped(0, max_batch=8)
    paused.add(1, prompt(4, 1), params(3))
    paused.add(2, prompt(4, 2), batch(2))
    order: list[int] = []
    while paused.has_work:
        plan, finished = step(paused)
        assert not (1 in {c.seq_id for c in plan.chunks} and 2 in {c.seq_id for c in plan.chunks})
        order += [s.seq_id for s in finished]
    assert order == [1, 2]


def test_a_negative_batch_row_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_rows_beside_interactive"):
        SchedulerConfig(batch_rows_beside_interactive=-1)
