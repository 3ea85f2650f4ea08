"""Suspending a step with batch rows at a layer boundary, on the real SmolLM2 engine (float32, C++ kernels).

`Arrivals` wraps the engine's runner: at chosen layered (suspendable) steps it has the test's loop submit
requests after one layer, and waits until they are in the engine's inbox, so an arrival lands mid-step
every run. A gate holds the engine before the batch is submitted, so every run plans the batch in the same
steps: greedy batch outputs can then be compared token for token with a run that never suspended.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from backends.local.build import BuiltEngine, EngineOptions, build_engine_parts  # noqa: E402
from backends.local.engine.engine import (  # noqa: E402
    Engine,
    Failed,
    Finished,
    LayeredStep,
    RequestHandle,
)
from backends.local.engine.kv_cache import BlockAllocator  # noqa: E402
from backends.local.engine.runner import ModelRunner  # noqa: E402
from backends.local.engine.scheduler import (  # noqa: E402
    FinishCause,
    Priority,
    SamplingParams,
    Scheduler,
)
from backends.local.engine.types import StepPlan  # noqa: E402
from tests.support.tiny_engine import collect, running, wait_idle  # noqa: E402

pytestmark = pytest.mark.model

BATCH_TEXTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a bicycle gear works, step by step.",
    "List ten fruits and say one thing about each.",
    "Describe a night train crossing the mountains.",
]
INTERACTIVE_TEXTS = ["What is the capital of France?", "Say hello in Spanish.", "Name a primary colour."]
LAYER = 7  # arrivals land after this layer of a suspendable step (SmolLM2 has 30)


@pytest.fixture(scope="module")
def parts(smollm2: Any) -> BuiltEngine:
    options = EngineOptions(dtype="float32", quant="none", kv_cache_mb=64, max_batch=8, warm_up=False)
    return build_engine_parts(smollm2, options)


@pytest.fixture(scope="module")
def ids(smollm2: Any) -> Callable[[str], list[int]]:
    def encode(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        text = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode


def greedy(n: int, priority: Priority = Priority.INTERACTIVE) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, priority=priority)


class Arrivals:
    """The real runner, plus: a gate that holds the engine thread in one step, and hooks run on the test's
    loop after `LAYER` layers of the n-th layered step. `log` records, on the engine thread, what ran when."""

    def __init__(self, runner: ModelRunner, loop: asyncio.AbstractEventLoop) -> None:
        self.runner = runner
        self.loop = loop
        self.hooks: dict[int, Callable[[], None]] = {}  # layered step number (from 1) -> what arrives
        self.after_last: dict[int, Callable[[], None]] = {}  # arrivals once that step's last layer ran
        self.checks: dict[int, Callable[[], None]] = {}  # run on the engine thread at that step's resume
        self.gate: threading.Event | None = None
        self.gated = threading.Event()
        self.layered_steps = 0
        self.in_layered = False
        self.log: list[tuple[str, Any]] = []

    def execute(self, plan: StepPlan) -> Any:
        if self.gate is not None:
            self.gated.set()
            self.gate.wait(30)
            self.gate = None
        self.log.append(("inner" if self.in_layered else "step", plan))
        return self.runner.execute(plan)

    def begin(self, plan: StepPlan) -> LayeredStep | None:
        layered = self.runner.begin(plan)
        if layered is None:
            return None
        self.layered_steps += 1
        self.log.append(("begin", plan))
        return _Hooked(self, layered, self.layered_steps)

    def arrive(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the test's loop and wait for it: what it submits is in the inbox on return."""
        done = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(call)
        assert done.wait(30), "the test's loop did not run the arrival"


class _Hooked:
    def __init__(self, owner: Arrivals, layered: LayeredStep, number: int) -> None:
        self._owner, self._layered, self._number = owner, layered, number
        self._layer = 0
        owner.in_layered = True

    def advance(self) -> bool:
        if self._layer == LAYER + 1 and (check := self._owner.checks.pop(self._number, None)):
            check()  # the steps run in between are done; this step goes on from here
        more = self._layered.advance()
        self._layer += 1
        if self._layer == LAYER and (hook := self._owner.hooks.pop(self._number, None)):
            self._owner.arrive(hook)
        if not more and (hook := self._owner.after_last.pop(self._number, None)):
            self._owner.arrive(hook)
        return more

    def logits(self) -> Any:
        self._owner.in_layered = False
        self._owner.log.append(("logits", self._number))
        return self._layered.logits()


class Observed:
    """EngineObserver recording first tokens, by prompt length, in the engine thread's order."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self._log = log

    def first_token(self, ttft_s: float, prompt_tokens: int, late: bool) -> None:
        self._log.append(("first_token", prompt_tokens))

    def next_tokens(self, count: int, gap_s: float) -> None:
        return None

    def finished(self, outcome: Finished | Failed) -> None:
        return None


def make(parts: BuiltEngine, *, suspend: bool = True) -> tuple[Engine, Arrivals]:
    arrivals = Arrivals(parts.runner, asyncio.get_running_loop())
    scheduler = Scheduler(parts.scheduler.config, BlockAllocator(parts.runner.kv_cache.num_blocks))
    engine = Engine(
        arrivals,
        scheduler,
        stop_token_ids=parts.stop_token_ids,
        observer=Observed(arrivals.log),
        suspend_batch_steps=suspend,
    )
    return engine, arrivals


async def start_batch(
    engine: Engine, arrivals: Arrivals, prompts: list[list[int]], n: int
) -> list[RequestHandle]:
    """Submit the batch while the engine is held in a one-token interactive step: it is planned at once."""
    arrivals.gate = threading.Event()
    opener = asyncio.ensure_future(collect(engine.submit([1, 2, 3], greedy(1))))
    assert await asyncio.to_thread(arrivals.gated.wait, 30)
    handles = [engine.submit(p, greedy(n, Priority.BATCH)) for p in prompts]
    arrivals.gate.set()
    await opener
    return handles


async def batch_run(
    parts: BuiltEngine, prompts: list[list[int]], n: int, *, suspend: bool
) -> list[tuple[list[int], Finished | Failed]]:
    engine, arrivals = make(parts, suspend=suspend)
    async with running(engine):
        handles = await start_batch(engine, arrivals, prompts, n)
        return await asyncio.gather(*(collect(h) for h in handles))


async def test_suspended_batch_steps_resume_to_the_same_greedy_tokens(
    parts: BuiltEngine, ids: Callable[[str], list[int]]
) -> None:
    prompts = [ids(t) for t in BATCH_TEXTS]
    unsuspended = await batch_run(parts, prompts, 16, suspend=False)
    asked = [ids(t) for t in INTERACTIVE_TEXTS]
    solo = []
    for p in asked:
        engine, _ = make(parts)
        async with running(engine):
            solo.append(await collect(engine.submit(p, greedy(1))))

    engine, arrivals = make(parts)
    interactive: list[asyncio.Future[Any]] = []

    def asking(p: list[int]) -> Callable[[], None]:
        return lambda: interactive.append(asyncio.ensure_future(collect(engine.submit(p, greedy(1)))))

    for step, p in zip((1, 3, 6), asked, strict=True):  # the batch's prefill step and two decode steps
        arrivals.hooks[step] = asking(p)
    async with running(engine):
        handles = await start_batch(engine, arrivals, prompts, 16)
        suspended = await asyncio.gather(*(collect(h) for h in handles))
        answers = await asyncio.gather(*interactive)
        await wait_idle(engine)
        stats = engine.stats()
    assert [tokens for tokens, _ in suspended] == [tokens for tokens, _ in unsuspended]
    assert all(isinstance(o, Finished) and o.cause is not FinishCause.ERROR for _, o in suspended)
    assert [tokens for tokens, _ in answers] == [tokens for tokens, _ in solo]
    assert stats.suspended_steps == 3 and stats.interleaved_steps == 3
    assert stats.kv_blocks_free == stats.kv_blocks_total


async def test_an_interactive_arrival_gets_its_first_token_before_the_suspended_batch_rows(
    parts: BuiltEngine, ids: Callable[[str], list[int]]
) -> None:
    question = ids(INTERACTIVE_TEXTS[0])
    engine, arrivals = make(parts)
    answer: list[asyncio.Future[Any]] = []
    arrivals.hooks[2] = lambda: answer.append(
        asyncio.ensure_future(collect(engine.submit(question, greedy(4))))
    )
    async with running(engine):
        handles = await start_batch(engine, arrivals, [ids(t) for t in BATCH_TEXTS], 8)
        await asyncio.gather(*(collect(h) for h in handles))
        tokens, outcome = await answer[0]
    assert isinstance(outcome, Finished) and len(tokens) == 4
    log = [(what, x if isinstance(x, int) else None) for what, x in arrivals.log]
    second = log.index(("begin", None), log.index(("begin", None)) + 1)
    first_token = log.index(("first_token", len(question)))
    # Inside the second layered step: its begin, the interactive prefill alone, the first token, then the
    # suspended step's logits (the batch rows' tokens are sampled only after that).
    assert second < first_token < log.index(("logits", 2))
    inner = [plan for what, plan in arrivals.log if what == "inner"]
    assert len(inner) == 1 and len(inner[0].chunks) == 1 and inner[0].chunks[0].num_logits == 1


async def test_an_interactive_prompt_arriving_between_steps_runs_alone_before_the_batch_rows(
    parts: BuiltEngine, ids: Callable[[str], list[int]]
) -> None:
    question = ids(INTERACTIVE_TEXTS[2])
    engine, arrivals = make(parts)
    answer: list[asyncio.Future[Any]] = []
    arrivals.after_last[2] = lambda: answer.append(
        asyncio.ensure_future(collect(engine.submit(question, greedy(3))))
    )
    async with running(engine):
        handles = await start_batch(engine, arrivals, [ids(t) for t in BATCH_TEXTS], 8)
        await asyncio.gather(*(collect(h) for h in handles))
        tokens, outcome = await answer[0]
    assert isinstance(outcome, Finished) and len(tokens) == 3
    after = arrivals.log[arrivals.log.index(("logits", 2)) + 1 :]
    (first, plan), first_token, (then, rest) = after[:3]
    assert (first, first_token, then) == ("step", ("first_token", len(question)), "begin")
    (chunk,) = plan.chunks  # the prompt alone (its chat-template prefix may come from shared blocks)
    assert chunk.start_pos + len(chunk.token_ids) == len(question) and chunk.num_logits == 1
    assert len(rest.chunks) == len(BATCH_TEXTS) and chunk.seq_id not in {c.seq_id for c in rest.chunks}
    assert engine.stats().suspended_steps == 0


async def test_aborting_a_suspended_batch_request_waits_for_its_step_then_frees_its_blocks(
    parts: BuiltEngine, ids: Callable[[str], list[int]]
) -> None:
    prompts = [ids(t) for t in BATCH_TEXTS]
    unsuspended = await batch_run(parts, prompts, 12, suspend=False)
    engine, arrivals = make(parts)
    handles: list[RequestHandle] = []
    answer: list[asyncio.Future[Any]] = []
    held_blocks: list[int] = []

    def arrive() -> None:  # on the loop, mid-step: abort a batch request, and ask something
        handles[1].abort()
        answer.append(asyncio.ensure_future(collect(engine.submit(ids(INTERACTIVE_TEXTS[1]), greedy(1)))))

    def check() -> None:  # on the engine thread, as the step resumes after the interactive step ran
        step = next(plan for what, plan in reversed(arrivals.log) if what == "begin")
        chunk = next(c for c in step.chunks if c.seq_id == handles[1].seq_id)
        held_blocks.extend(chunk.block_table)
        allocator = engine._scheduler.allocator
        assert all(allocator.ref_count(b) > 0 for b in chunk.block_table)
        inner = next(plan for what, plan in reversed(arrivals.log) if what == "inner")
        assert not set(inner.chunks[0].block_table) & set(chunk.block_table)

    arrivals.hooks[4] = arrive
    arrivals.checks[4] = check
    async with running(engine):
        handles += await start_batch(engine, arrivals, prompts, 12)
        results = await asyncio.gather(*(collect(h) for h in handles))
        _, asked = await answer[0]
        await wait_idle(engine)
        stats = engine.stats()
    assert held_blocks, "the check never ran"
    aborted_tokens, aborted = results[1]
    assert isinstance(aborted, Finished) and aborted.cause is FinishCause.ABORT
    # Its suspended step completed first: the tokens up to and including that step, as unsuspended.
    assert aborted_tokens == unsuspended[1][0][: len(aborted_tokens)] and len(aborted_tokens) == 4
    for i in (0, 2, 3):
        assert results[i][0] == unsuspended[i][0]
    assert isinstance(asked, Finished)
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_a_layered_step_computes_the_plain_steps_logits(parts: BuiltEngine) -> None:
    """The runner's two paths agree bit for bit (same ops, same order), prefill and decode chunks mixed."""
    from backends.local.engine.types import SeqChunk

    runner = parts.runner
    runner.execute(StepPlan((SeqChunk(1, tuple(range(50, 70)), 0, (2, 3), num_logits=0),)))
    plan = StepPlan((SeqChunk(0, tuple(range(10, 40)), 0, (0, 1)), SeqChunk(1, (5,), 20, (2, 3))))
    plain = runner.execute(plan)
    layered = runner.begin(plan)
    assert layered is not None
    while layered.advance():
        pass
    assert torch.equal(layered.logits(), plain)
