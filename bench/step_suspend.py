"""What suspendable batch steps cost the engine thread when nothing arrives: a microbench, not a timed test.

On the bundled SmolLM2 engine (autotuned dtype/quant, C++ kernels, `--threads` compute threads), in one
process, A/B repetitions interleaved, medians:
An A/A row (the reference against itself) shows how large a difference this machine's noise makes.
1. Interactive-only decode steps (1 and 8 rows): the engine's `_parts` and `_forward` (which check whether
   the plan may be suspended, then call `runner.execute`) against the forward as it was before suspension
   existed (`Transformer.forward`'s layer loop written out here). Goal: no difference measurable.
2. Batch decode steps (32 rows): `_forward` running the step layer by layer, checking the inbox after each
   layer (nothing arrives), against `runner.execute` in one piece.
Run: python -m bench.step_suspend [--threads 2] [--reps 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

REPS_DEFAULT = 300


def old_execute(runner: Any, plan: Any) -> Any:
    """`ModelRunner.execute` as before this change: pack, then the model's forward with the layer loop inline,
    called through `nn.Module.__call__` as the model was."""
    import torch

    with torch.inference_mode():
        tokens, positions, meta, rows = runner._pack(plan)
        return _old_model(runner.model)(tokens, positions, meta, runner.kv_cache, rows).float()


def _old_model(model: Any) -> Any:
    from torch import nn

    class OldForward(nn.Module):
        """`Transformer.forward` before it was split into embed / layers / head."""

        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, tokens: Any, positions: Any, attn: Any, kv: Any, logits_rows: Any = None) -> Any:
            m = self.m
            x = m.embed_tokens(tokens)
            cos = m.rope_cos.index_select(0, positions)
            sin = m.rope_sin.index_select(0, positions)
            for layer in m.layers:
                x = layer(x, cos, sin, attn, kv)
            if logits_rows is not None:
                x = x.index_select(0, logits_rows)
            return m.lm_head(m.norm(x))

    cached = _OLD.get(id(model))
    if cached is None:
        cached = _OLD[id(model)] = OldForward()
    return cached


_OLD: dict[int, Any] = {}


def timed_pair(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median ms of `a` and of `b` after a warm-up, run alternately, each first in half the pairs (ABBA)."""
    for _ in range(5):
        a(), b()
    times: dict[Callable[[], Any], list[float]] = {a: [], b: []}
    for i in range(reps):
        for fn in (a, b) if i % 2 else (b, a):
            started = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - started)
    return statistics.median(times[a]) * 1e3, statistics.median(times[b]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=REPS_DEFAULT)
    args = parser.parse_args()
    import torch

    from backends.local.build import EngineOptions, build_engine_parts
    from backends.local.engine.engine import Engine
    from backends.local.engine.kv_cache import BlockAllocator
    from backends.local.engine.scheduler import Priority, SamplingParams, Scheduler
    from backends.local.engine.types import SeqChunk, StepPlan
    from backends.local.loader import DEFAULT_MODEL_SPEC, load_model

    parts = build_engine_parts(load_model(DEFAULT_MODEL_SPEC), EngineOptions(threads=args.threads))
    torch.set_num_threads(args.threads)
    runner = parts.runner
    context = 40  # each row decodes position 40 after a 40-token prefill
    rows_out = []
    for rows, priority in ((1, Priority.INTERACTIVE), (8, Priority.INTERACTIVE), (32, Priority.BATCH)):
        scheduler = Scheduler(parts.scheduler.config, BlockAllocator(runner.kv_cache.num_blocks))
        engine = Engine(runner, scheduler, stop_token_ids=parts.stop_token_ids)
        params = SamplingParams(max_tokens=16, temperature=0.0, priority=priority)
        chunks = []
        for i in range(rows):
            scheduler.add(i, list(range(100 + i, 100 + i + context)), params)
            table = (3 * i, 3 * i + 1, 3 * i + 2)
            runner.execute(StepPlan((SeqChunk(i, tuple(range(100, 100 + context)), 0, table, 0),)))
            chunks.append(SeqChunk(i, (7,), context, table))
        plan = StepPlan(tuple(chunks))
        layered = engine._may_suspend(plan)

        def ours(engine: Engine = engine, plan: StepPlan = plan) -> Any:
            return [engine._forward(part) for part in engine._parts(plan)]

        def reference(plan: StepPlan = plan, layered: bool = layered) -> Any:
            return runner.execute(plan) if layered else old_execute(runner, plan)

        def again(reference: Callable[[], Any] = reference) -> Any:
            return reference()

        kind = "layer by layer, inbox checked after each" if layered else "one piece"
        ref = "`runner.execute` in one piece" if layered else "the forward before this change"
        label = f"{rows} {priority} decode rows"
        measured = timed_pair(ours, reference, args.reps)
        rows_out.append((f"{label}: engine `_parts` + `_forward` ({kind})", ref, *measured))
        rows_out.append((f"{label}: A/A", ref, *timed_pair(again, reference, args.reps)))
    load = os.getloadavg()[0]
    print(f"threads {args.threads}, {args.reps} ABBA repetitions, 1-minute load average {load:.2f}")
    print("| step | measured | reference | difference |")
    print("|---|---:|---:|---:|")
    for label, ref, new_ms, old_ms in rows_out:
        print(f"| {label} | {new_ms:.3f} ms | {old_ms:.3f} ms ({ref}) | {(new_ms - old_ms) / old_ms:+.1%} |")


if __name__ == "__main__":
    main()
