"""An engine loop on a tiny model, and the helpers engine tests drive it with: prompts, greedy sampling,
collecting a request's tokens, and the solo reference run. Import only where torch is installed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from backends.local.engine.engine import (
    Engine,
    Failed,
    Finished,
    Proposer,
    RequestHandle,
    StepRunner,
    Tokens,
)
from backends.local.engine.kv_cache import BlockAllocator, KVCache
from backends.local.engine.model import Transformer
from backends.local.engine.runner import ModelRunner
from backends.local.engine.scheduler import SamplingParams, Scheduler, SchedulerConfig

EOS = 255  # the tiny model's last id: a stop token for the engine, though the model has no EOS of its own
BLOCK = 4


def make_engine(
    model: Transformer,
    num_blocks: int,
    *,
    max_batch: int = 8,
    budget: int = 16,
    spec: int = 0,
    wrap: Callable[[ModelRunner], StepRunner] | None = None,
    proposer: Proposer | None = None,
    stop_token_ids: Sequence[int] = (EOS,),
    threads: int | None = None,
) -> Engine:
    cache = KVCache(
        n_layers=model.args.n_layers,
        n_kv_heads=model.args.n_kv_heads,
        head_dim=model.args.head_dim,
        num_blocks=num_blocks,
        block_size=BLOCK,
    )
    runner: StepRunner = ModelRunner(model, cache)
    if wrap is not None:
        runner = wrap(runner)  # type: ignore[arg-type]
    config = SchedulerConfig(
        max_batch=max_batch, max_prefill_tokens=budget, block_size=BLOCK, num_spec_tokens=spec
    )
    scheduler = Scheduler(config, BlockAllocator(num_blocks))
    return Engine(runner, scheduler, stop_token_ids=stop_token_ids, proposer=proposer, threads=threads)


@asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Engine]:
    engine.start()
    try:
        yield engine
    finally:
        await asyncio.to_thread(engine.stop)


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + i * 7) % EOS for i in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


async def collect(handle: RequestHandle) -> tuple[list[int], Finished | Failed]:
    tokens: list[int] = []
    async for event in handle.events():
        if isinstance(event, Tokens):
            tokens += event.token_ids
        else:
            return tokens, event
    raise AssertionError("events ended without an outcome")


async def solo(model: Transformer, prompt_ids: Sequence[int], p: SamplingParams) -> list[int]:
    """The request alone in a roomy engine: the reference every batched run must reproduce."""
    async with running(make_engine(model, 256, budget=1024)) as engine:
        tokens, outcome = await collect(engine.submit(prompt_ids, p))
    assert isinstance(outcome, Finished)
    return tokens


async def wait_idle(engine: Engine) -> None:
    for _ in range(500):
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")
