"""Run every compute path the engine will use once before it reports ready, and time decode steps.

The first call of a path pays for lazy work: oneDNN primitive creation for each GEMM shape, OpenMP team
start, the C++ kernels' first touch of their code, the sampler's softmax and top-p. `warm_up` drives the
runner through prefill chunks of the sizes the scheduler makes and decode steps of 1 up to `max_batch` rows,
then samples greedy and top-p rows, on blocks of the real cache that the scheduler has not handed out yet;
what it writes there is finite and overwritten before it is read. `time_steps` is the same drive, timed.
Invariant: nothing here changes what a later request computes.
"""

from __future__ import annotations

import time
from typing import Any

from backends.local.engine.types import SeqChunk, StepPlan


def _blocks_for(runner: Any, seqs: int, tokens: int) -> list[tuple[int, ...]] | None:
    """Block tables for `seqs` sequences of `tokens` positions each, from the cache's first blocks."""
    per_seq = -(-tokens // runner.block_size)
    if seqs * per_seq > runner.kv_cache.num_blocks:
        return None
    return [tuple(range(s * per_seq, (s + 1) * per_seq)) for s in range(seqs)]


def _prefill(runner: Any, tables: list[tuple[int, ...]], tokens: int) -> None:
    prompt = tuple((7 * i) % 100 + 5 for i in range(tokens))
    chunks = tuple(SeqChunk(s, prompt, 0, table, prefill=True) for s, table in enumerate(tables))
    runner.execute(StepPlan(chunks))


def _decode(runner: Any, tables: list[tuple[int, ...]], pos: int) -> Any:
    return runner.execute(StepPlan(tuple(SeqChunk(s, (11,), pos, table) for s, table in enumerate(tables))))


def timing_tables(runner: Any, *, steps: int, prefill_tokens: int) -> list[tuple[int, ...]]:
    """Block tables for 8 sequences that `time_steps` decodes (again and again) at 1 and 8 rows, after one
    untimed step of each shape. Their keys are never prefilled: a step's cost does not depend on the values
    it reads, and stale slots are finite, so prefilling 8 x 64 tokens per candidate only cost time."""
    tables = _blocks_for(runner, 8, prefill_tokens + steps + 2)
    if tables is None:
        raise ValueError("the timing cache is too small for 8 sequences; raise its kv_cache_mb")
    _prefill(runner, tables[:1], prefill_tokens)  # warm-up of each shape
    _decode(runner, tables, prefill_tokens)
    _decode(runner, tables[:1], prefill_tokens)
    return tables


def time_steps(
    runner: Any, tables: list[tuple[int, ...]], *, steps: int, prefill_tokens: int
) -> tuple[float, float, float]:
    """Seconds per decode step at 1 and 8 rows and per prefill chunk of `prefill_tokens` (`timing_tables`)."""
    started = time.perf_counter()
    _prefill(runner, tables[:1], prefill_tokens)
    prefill_s = time.perf_counter() - started
    result = []
    for rows in (1, 8):
        started = time.perf_counter()
        for step in range(steps):
            _decode(runner, tables[:rows], prefill_tokens + 1 + step)
        result.append((time.perf_counter() - started) / steps)
    return result[0], result[1], prefill_s


def warm_up(runner: Any, *, max_batch: int, max_prefill_tokens: int) -> float:
    """Drive every prefill and decode shape class and the sampler once; seconds taken."""
    import torch

    from backends.local.engine.sampler import make_generator, sample

    started = time.perf_counter()
    prefill = min(max_prefill_tokens, 128)
    for rows in sorted({1, 2, 4, 8, min(max_batch, 32), max_batch}):
        tables = _blocks_for(runner, rows, prefill + 2)
        if tables is None:
            break
        if rows == 1:
            for tokens in sorted({1, 8, 16, prefill}):
                _prefill(runner, tables, tokens)
        logits = _decode(runner, tables, prefill)
    gens = [make_generator(0), make_generator(1)]
    with torch.inference_mode():
        sample(logits[:1].repeat(2, 1), [0.0, 0.7], [1.0, 0.9], gens)
    return time.perf_counter() - started
