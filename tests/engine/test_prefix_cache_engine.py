"""Automatic prefix caching in the engine loop, on a tiny random Llama: reuse must not change a single token.

Each request's greedy tokens are computed alone in a roomy engine first; then requests that repeat a
finished request's prefix (an agent's next turn, a shared system prompt) must give exactly those tokens
while the engine reports the reused prompt tokens, and a cache too small to keep everything must evict
without corrupting what running requests read, with and without speculative decoding.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.local.engine.engine import Finished  # noqa: E402
from backends.local.engine.model import Transformer  # noqa: E402
from backends.local.engine.speculative import NgramProposer  # noqa: E402
from backends.local.engine.weights import build_model  # noqa: E402
from tests.support.tiny_engine import (  # noqa: E402
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


async def test_a_later_request_with_a_finished_ones_prefix_reuses_it_and_matches(
    tiny_model: Transformer,
) -> None:
    system = prompt(13, 40)  # 10 blocks of 4
    turn1 = system + prompt(1, 6)
    engine = make_engine(tiny_model, num_blocks=64, budget=32)
    async with running(engine):
        tokens1, outcome1 = await collect(engine.submit(turn1, greedy(8)))
        await wait_idle(engine)
        assert engine.stats().prefix_hit_tokens == 0
        turn2 = turn1 + tokens1 + prompt(2, 5)  # the next turn: the whole conversation so far, then more
        tokens2, outcome2 = await collect(engine.submit(turn2, greedy(8)))
        await wait_idle(engine)
        stats = engine.stats()
    assert isinstance(outcome1, Finished) and isinstance(outcome2, Finished)
    assert tokens1 == await solo(tiny_model, turn1, greedy(8))
    assert tokens2 == await solo(tiny_model, turn2, greedy(8))
    # turn1 and its tokens but the last (never fed back) have K/V: their full blocks are what turn2 reuses.
    assert stats.prefix_hit_tokens == (len(turn1) + len(tokens1) - 1) // 4 * 4 >= 40
    assert stats.kv_blocks_free == stats.kv_blocks_total  # cached blocks count as free (evictable)


@pytest.mark.parametrize("spec", [0, 4])
async def test_eviction_under_pressure_keeps_every_requests_tokens(
    tiny_model: Transformer, spec: int
) -> None:
    """Waves of requests, half repeating an earlier prefix, through a cache of 14 blocks (~2 requests)."""
    prefixes = [prompt(50 + k, 16) for k in range(3)]
    waves = [[(prefixes[(w + i) % 3] + prompt(w * 10 + i, 2 + i), 6 + i) for i in range(3)] for w in range(4)]
    expected = [[await solo(tiny_model, ids, greedy(n)) for ids, n in wave] for wave in waves]
    proposer = NgramProposer() if spec else None
    engine = make_engine(tiny_model, num_blocks=14, max_batch=4, budget=8, spec=spec, proposer=proposer)
    async with running(engine):
        results = []
        for wave in waves:
            results.append(await asyncio.gather(*(collect(engine.submit(ids, greedy(n))) for ids, n in wave)))
            await wait_idle(engine)
        stats = engine.stats()
    for got, want in zip(results, expected, strict=True):
        assert [tokens for tokens, _ in got] == want
        assert all(isinstance(outcome, Finished) for _, outcome in got)
    assert stats.prefix_hit_tokens > 0, "no request reused a cached prefix"
    assert stats.kv_blocks_free == 14
