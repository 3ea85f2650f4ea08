"""The engine loop on a tiny random Llama: continuous batching under a KV cache far too small for the load.

Each request's greedy tokens are first computed with the request alone in a roomy engine; the overloaded
engine must give exactly the same tokens to every request (preempted and recomputed ones included), fail
none, and end with every KV block free. Sampling, aborts, failing steps and the speculative seam run here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.local.engine.engine import (  # noqa: E402
    DraftQuery,
    Failed,
    Finished,
    StepRunner,
    Tokens,
)
from backends.local.engine.model import Transformer  # noqa: E402
from backends.local.engine.runner import ModelRunner  # noqa: E402
from backends.local.engine.scheduler import (  # noqa: E402
    FinishCause,
    RequestTooLarge,
    SamplingParams,
)
from backends.local.engine.types import StepPlan  # noqa: E402
from backends.local.engine.weights import build_model  # noqa: E402
from tests.support.tiny_engine import (  # noqa: E402
    EOS,
    collect,
    greedy,
    make_engine,
    prompt,
    running,
    solo,
    wait_idle,
)
from tests.support.tiny_models import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    return build_model(tiny_hf_model("llama"), dtype=torch.float32, release_source=False)


# 12 requests of 6..17-token prompts and 10..21 new tokens; each needs up to 10 blocks of 4 positions.
LOAD = [(prompt(i, 6 + i), 10 + i) for i in range(12)]


async def test_overloaded_cache_gives_every_request_its_solo_greedy_tokens(tiny_model: Transformer) -> None:
    expected = [await solo(tiny_model, ids, greedy(n)) for ids, n in LOAD]
    engine = make_engine(tiny_model, num_blocks=12, max_batch=6, budget=8)  # room for ~2 requests at once
    async with running(engine):
        results = await asyncio.gather(*(collect(engine.submit(ids, greedy(n))) for ids, n in LOAD))
        await wait_idle(engine)
        stats = engine.stats()
    for (tokens, outcome), want in zip(results, expected, strict=True):
        assert isinstance(outcome, Finished), outcome
        assert tokens == want
        assert outcome.completion_tokens == len(want)
    assert stats.preemptions > 0, "the load never filled the cache"
    assert stats.kv_blocks_free == stats.kv_blocks_total == 12
    assert stats.prefill_tokens_per_step == 8  # the scheduler's budget, as /metrics publishes it


async def test_requests_sharing_a_prompt_prefix_share_blocks_and_match(tiny_model: Transformer) -> None:
    system = prompt(13, 40)  # a long common "system prompt" (10 blocks of 4), then each its own question
    load = [(system + prompt(i, 3 + i), 8) for i in range(5)]
    expected = [await solo(tiny_model, ids, greedy(n)) for ids, n in load]
    engine = make_engine(tiny_model, num_blocks=48, budget=32)
    async with running(engine):
        first = await collect(engine.submit(load[0][0], greedy(load[0][1])))  # done before the rest arrive
        rest = await asyncio.gather(*(collect(engine.submit(ids, greedy(n))) for ids, n in load[1:]))
        stats = engine.stats()
    assert [tokens for tokens, _ in [first, *rest]] == expected
    # The first one had left (its blocks with it); of the four arriving together, the first to compute the
    # common blocks lends them to the three admitted after it.
    assert stats.prefix_hit_tokens >= 3 * 32
    assert stats.kv_blocks_free == 48


async def test_requests_arriving_mid_generation_join_and_match(tiny_model: Transformer) -> None:
    expected = [await solo(tiny_model, ids, greedy(n)) for ids, n in LOAD[:6]]
    engine = make_engine(tiny_model, num_blocks=16, max_batch=4, budget=6)
    async with running(engine):
        tasks = []
        for ids, n in LOAD[:6]:
            tasks.append(asyncio.create_task(collect(engine.submit(ids, greedy(n)))))
            await asyncio.sleep(0.02)  # the earlier ones are mid-prefill or decoding by now
        results = await asyncio.gather(*tasks)
    assert [tokens for tokens, _ in results] == expected
    assert all(isinstance(outcome, Finished) for _, outcome in results)


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_model: Transformer) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first = await solo(tiny_model, prompt(1, 9), seeded)
    assert first == await solo(tiny_model, prompt(1, 9), seeded)
    engine = make_engine(tiny_model, num_blocks=64)
    async with running(engine):
        others = [collect(engine.submit(prompt(i, 5), SamplingParams(max_tokens=12))) for i in range(4)]
        mine, *_ = await asyncio.gather(collect(engine.submit(prompt(1, 9), seeded)), *others)
    assert mine[0] == first
    unseeded = [await solo(tiny_model, prompt(1, 9), SamplingParams(max_tokens=16)) for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # fresh randomness when no seed is given


async def test_abort_frees_blocks_and_ends_with_abort(tiny_model: Transformer) -> None:
    engine = make_engine(tiny_model, num_blocks=32)
    async with running(engine):
        handle = engine.submit(prompt(3, 10), greedy(100))
        events = handle.events()
        first = await anext(events)
        assert isinstance(first, Tokens)
        assert engine.stats().kv_blocks_free < 32
        handle.abort()
        rest = [event async for event in events]
        assert isinstance(rest[-1], Finished) and rest[-1].cause is FinishCause.ABORT
        await wait_idle(engine)
        assert engine.stats().kv_blocks_free == 32
        tokens, outcome = await collect(engine.submit(prompt(4, 5), greedy(3)))
        assert isinstance(outcome, Finished) and len(tokens) == 3


async def test_max_tokens_and_stop_token_finish_reasons(tiny_model: Transformer) -> None:
    engine = make_engine(tiny_model, num_blocks=32)
    async with running(engine):
        tokens, outcome = await collect(engine.submit(prompt(5, 7), greedy(4)))
        assert isinstance(outcome, Finished) and outcome.cause is FinishCause.LENGTH and len(tokens) == 4
        assert outcome.prompt_tokens == 7 and outcome.completion_tokens == 4
    # Make the stop token the greedy choice after this prompt: its reference first token becomes EOS.
    first = (await solo(tiny_model, prompt(6, 7), greedy(1)))[0]
    stopping = make_engine(tiny_model, num_blocks=32, stop_token_ids=(first,))
    async with running(stopping):
        tokens, outcome = await collect(stopping.submit(prompt(6, 7), greedy(10)))
    assert tokens == [first] and isinstance(outcome, Finished) and outcome.cause is FinishCause.STOP


async def test_a_request_that_never_fits_is_refused_at_submit(tiny_model: Transformer) -> None:
    engine = make_engine(tiny_model, num_blocks=4)  # 16 positions
    async with running(engine):
        with pytest.raises(RequestTooLarge, match="--kv-cache-mb"):
            engine.submit(prompt(0, 10), greedy(8))


class FailOnce:
    """A runner that raises on the first step holding `victim`'s chunk, then behaves."""

    def __init__(self, runner: ModelRunner, victim_prompt: Sequence[int]) -> None:
        self._runner = runner
        self._victim = tuple(victim_prompt)
        self.failed = False

    def execute(self, plan: StepPlan) -> Any:
        if not self.failed and any(c.token_ids[: len(self._victim)] == self._victim for c in plan.chunks):
            self.failed = True
            raise RuntimeError("injected failure")
        return self._runner.execute(plan)


async def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(tiny_model: Transformer) -> None:
    victim = prompt(7, 6)
    engine = make_engine(tiny_model, num_blocks=32, wrap=lambda r: FailOnce(r, victim))
    async with running(engine):
        tokens, outcome = await collect(engine.submit(victim, greedy(5)))
        assert isinstance(outcome, Failed) and "RuntimeError" in outcome.message
        await wait_idle(engine)
        assert engine.stats().kv_blocks_free == 32
        tokens, outcome = await collect(engine.submit(prompt(8, 6), greedy(5)))
        assert isinstance(outcome, Finished) and len(tokens) == 5
        assert engine.alive


class ScriptedProposer:
    """Proposes the reference continuation, with every `wrong_every`-th draft corrupted."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], wrong_every: int) -> None:
        self._reference = reference
        self._wrong_every = wrong_every
        self.released: list[int] = []

    def propose(self, queries: Sequence[DraftQuery]) -> list[tuple[int, ...]]:
        out = []
        for q in queries:
            for ids, continuation in self._reference.items():
                if q.token_ids[: len(ids)] == ids:
                    done = len(q.token_ids) - len(ids)
                    drafts = list(continuation[done : done + q.max_drafts])
                    out.append(
                        tuple(
                            t if (done + i) % self._wrong_every else (t + 1) % EOS
                            for i, t in enumerate(drafts)
                        )
                    )
                    break
            else:
                out.append(())
        return out

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


@pytest.mark.parametrize("wrong_every", [1000, 3, 1], ids=["all-right", "some-wrong", "all-wrong"])
async def test_speculative_seam_keeps_greedy_output(tiny_model: Transformer, wrong_every: int) -> None:
    load = LOAD[:4]
    expected = [await solo(tiny_model, ids, greedy(n)) for ids, n in load]
    proposer = ScriptedProposer(
        {tuple(ids): want for (ids, _), want in zip(load, expected, strict=True)}, wrong_every
    )
    engine = make_engine(tiny_model, num_blocks=40, spec=3, proposer=proposer)
    async with running(engine):
        results = await asyncio.gather(*(collect(engine.submit(ids, greedy(n))) for ids, n in load))
        stats = engine.stats()
    assert [tokens for tokens, _ in results] == expected
    assert stats.drafted_tokens > 0 and len(proposer.released) == len(load)
    if wrong_every == 1:
        assert stats.accepted_tokens == 0
    elif wrong_every == 1000:
        assert stats.accepted_tokens == stats.drafted_tokens


class ThreadCounter:
    """Records the torch thread count the engine thread computes with."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self.seen: set[int] = set()

    def execute(self, plan: StepPlan) -> Any:
        self.seen.add(torch.get_num_threads())
        return self._runner.execute(plan)


async def test_the_engine_thread_computes_with_its_own_thread_count(tiny_model: Transformer) -> None:
    """`--threads` belongs to the engine thread, whatever the loading thread set (one_compute_thread)."""
    counters: list[ThreadCounter] = []

    def wrap(runner: ModelRunner) -> StepRunner:
        counters.append(ThreadCounter(runner))
        return counters[-1]

    engine = make_engine(tiny_model, num_blocks=32, wrap=wrap, threads=3)
    before = torch.get_num_threads()
    async with running(engine):
        _, outcome = await collect(engine.submit(prompt(1, 5), greedy(3)))
        assert isinstance(outcome, Finished)
    assert counters[0].seen == {3}
    assert torch.get_num_threads() == before  # the caller's thread keeps its own count
