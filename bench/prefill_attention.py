"""Long prefill chunks' attention in bf16 against float32, on the engine's own runner (SmolLM2, CPU).

Under `--attn paged` a float32 engine over a bfloat16 KV cache (what `--dtype float32 --kv-dtype auto`
gives) computes its long prefill chunks' SDPA in bf16 on CPUs with AMX (`attention.prefill_dtype`). This
measures what that costs in quality and saves in time wherever torch runs bf16 SDPA natively (AMX or
AVX512-BF16; the table says whether this build takes it here), in one process on one thread, with the
routing evaluation's engine flags (float32 compute, int4 weights):
- quality, teacher-forced over `bench/data/tide_clock.txt` (~3.2k tokens, `--chunk`-token prefill chunks,
  logits at every position): perplexity, top-1 agreement and mean/max KL against the same runner with
  float32 attention, and both against a float32 KV cache (`--kv-dtype float32`, attention all float32);
- speed, the median of `--repeats` timings of one step: a warm agent turn (`--turn` new tokens after
  `--history` cached ones) and a cold prompt's chunk at the same depth, each with bf16 and float32 SDPA.
Run: `python -m bench.prefill_attention [--history 1500] [--turn 100] [--chunk 256] [--repeats 15]
[--out docs/BENCHMARKS.md]` (about a minute).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from backends.local.build import EngineOptions, build_engine_parts
from backends.local.engine.quant import compare_logits
from backends.local.engine.types import SeqChunk, StepPlan
from backends.local.loader import DEFAULT_MODEL_SPEC, load_engine_model
from bench.overhead import machine_info

TEXT_PATH = Path(__file__).parent / "data" / "tide_clock.txt"
MARK = "bench/prefill_attention"


def _runner(loaded: object, kv_dtype: str) -> object:
    options = EngineOptions(dtype="float32", quant="int4", kv_dtype=kv_dtype, max_batch=8, warm_up=False)
    return build_engine_parts(loaded, options).runner  # type: ignore[arg-type]


def _teacher_forced(runner: object, ids: list[int], chunk: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Logits at every position of `ids`, prefilled `chunk` tokens a step, long chunks' SDPA in `dtype`."""
    runner.prefill_dtype = dtype  # type: ignore[attr-defined]
    bs = runner.block_size  # type: ignore[attr-defined]
    table = tuple(range(1, math.ceil(len(ids) / bs) + 1))
    out = []
    for start in range(0, len(ids), chunk):
        part = tuple(ids[start : start + chunk])
        plan = StepPlan((SeqChunk(0, part, start, table, num_logits=len(part)),))
        out.append(runner.execute(plan))  # type: ignore[attr-defined]
    return torch.cat(out)


def _perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def _step_ms(
    runner: object, ids: list[int], start: int, n: int, dtype: torch.dtype | None, repeats: int
) -> float:
    """Median time of one step computing ids[start:start+n] over `start` cached tokens (already written)."""
    runner.prefill_dtype = dtype  # type: ignore[attr-defined]
    bs = runner.block_size  # type: ignore[attr-defined]
    table = tuple(range(1, math.ceil((start + n) / bs) + 1))
    plan = StepPlan((SeqChunk(0, tuple(ids[start : start + n]), start, table),))
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        runner.execute(plan)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:]) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=1500)
    ap.add_argument("--turn", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_engine_model(DEFAULT_MODEL_SPEC)
    ids = loaded.tokenizer.encode(TEXT_PATH.read_text(), add_special_tokens=False)
    mixed = _runner(loaded, "auto")
    if not (torch.cpu._is_avx512_bf16_supported() and torch.backends.cpu.get_cpu_capability() == "AVX512"):
        raise SystemExit("torch runs no native bf16 SDPA here (no AVX512-BF16, or not its AVX-512 code)")
    native = torch.bfloat16
    taken = "this build" if mixed.prefill_dtype else "not taken here: no AMX"  # type: ignore[attr-defined]
    with torch.inference_mode():
        bf16 = _teacher_forced(mixed, ids, args.chunk, native)
        f32 = _teacher_forced(mixed, ids, args.chunk, None)
        exact = _teacher_forced(_runner(loaded, "float32"), ids, args.chunk, None)
        steps = (("warm turn", args.turn), ("cold prompt's chunk", args.chunk))
        timings = {
            (label, dtype): _step_ms(mixed, ids, args.history, n, dtype, args.repeats)
            for label, n in steps
            for dtype in (None, native)
        }
    rows = [
        "| long chunks' attention | KV cache | perplexity | top-1 vs float32 attention | mean KL | max KL "
        "| top-1 vs all float32 | mean KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, cache, logits in (
        ("float32", "float32", exact),
        ("float32", "bfloat16", f32),
        (f"bf16 ({taken})", "bfloat16", bf16),
    ):
        agree, whole = compare_logits(f32, logits), compare_logits(exact, logits)
        rows.append(
            f"| {label} | {cache} | {_perplexity(logits, ids):.3f} | {agree.top1:.4f} | "
            f"{agree.kl_mean:.5f} | {agree.kl_max:.4f} | {whole.top1:.4f} | {whole.kl_mean:.5f} |"
        )
    rows += [
        "",
        f"| one step, {args.history} tokens cached | float32 attention ms | bf16 attention ms | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, n in steps:
        f, b = timings[(label, None)], timings[(label, native)]
        rows.append(f"| {label}: {n} new tokens | {f:.1f} | {b:.1f} | {f / b:.2f}x |")
    info = machine_info()
    out = f" --out {args.out}" if args.out else ""
    text = "\n".join(
        [
            f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (torch {torch.__version__}, one "
            f"thread), commit {info['commit']}.",
            "",
            f"Command: `python -m bench.prefill_attention --history {args.history} --turn {args.turn} "
            f"--chunk {args.chunk} --repeats {args.repeats}{out}`. Teacher-forced over {len(ids)} tokens in "
            f"{args.chunk}-token chunks; top-1 and KL (nats a position) against float32 attention over the "
            "same bf16 cache, and against a float32 cache (attention all float32). "
            f"Step times: medians of {args.repeats}.",
            "",
            *rows,
        ]
    )
    print(text)
    if args.out:
        from bench.routing import update_section

        update_section(
            args.out, MARK, "Long prefill chunks' attention in bf16 (`bench/prefill_attention`)", text
        )


if __name__ == "__main__":
    main()
