"""`--dtype auto` / `--quant auto`: time the candidate configurations on this machine and keep the fastest.

Candidates are every (compute dtype, weight quantization) whose quality is within the stated bounds: float32
compute, and bf16 compute only where the CPU has native bf16 arithmetic (AVX512-BF16, AMX, Arm BF16), over
weights kept as is, int8 per channel, or int4 group 32 with an int8 `lm_head` (docs/BENCHMARKS.md,
"Weight-only quantization"), less those another always beats here (`pruned`). Each is built from the loaded
weights and timed alone, one after another (decode of 1 and 8 rows, a 64-token prefill); one clearly slower
after a single pass stops there, and the two fastest are timed once more. The choice is cached in the
kernels directory, keyed by torch, the kernel sources, the CPU model and flags, model and threads.
Invariant: the choice is one of the candidates, and the table that justified it travels with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUANT_CANDIDATES = ("int4", "int8", "none")  # timed in this order: the likely winners first
DECODE_STEPS = 4  # timed steps per row count and round, after one warm-up step
ROUNDS = 2
PREFILL_TOKENS = 64
SLOWER = 1.5  # a candidate whose first passes score this much above the best so far is not timed further
QUICK_ROUNDS = 2  # first passes (one step of each shape): the faster counts, so one burst does not stop it


@dataclass(frozen=True, slots=True)
class Timing:
    dtype: str
    quant: str
    decode1_ms: float  # one decode step, one sequence
    decode8_ms: float  # one decode step, eight sequences
    prefill_ms: float  # one 64-token prefill chunk
    early: bool = False  # stopped after one pass: clearly slower than the best at the time (one step each)

    @property
    def score_ms(self) -> float:
        """Per-token cost of a mixed load: one stream's token, an 8-stream step's token, a prompt token."""
        return self.decode1_ms + self.decode8_ms / 8 + self.prefill_ms / PREFILL_TOKENS


@dataclass(frozen=True, slots=True)
class Choice:
    dtype: str
    quant: str
    table: tuple[Timing, ...]
    key: str
    cached: bool

    def rows(self) -> list[str]:
        """The table as log lines, fastest first."""
        lines = []
        for t in sorted(self.table, key=lambda t: t.score_ms):
            mark = "*" if (t.dtype, t.quant) == (self.dtype, self.quant) else " "
            lines.append(
                f"{mark} {t.dtype:>8} {t.quant:>4}: decode x1 {t.decode1_ms:6.1f} ms, "
                f"x8 {t.decode8_ms:6.1f} ms, "
                f"prefill {PREFILL_TOKENS} {t.prefill_ms:6.1f} ms"
                + (" (first passes only: stopped early)" if t.early else "")
            )
        return lines


def cpu_description() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, sorted feature flags) from /proc/cpuinfo; the platform name elsewhere."""
    model = platform.processor() or platform.machine()
    flags: tuple[str, ...] = ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "CPU part") and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif name in ("flags", "Features") and not flags:
            flags = tuple(sorted(value.split()))
    return model, flags


def native_bf16(flags: tuple[str, ...]) -> bool:
    """Whether the CPU computes in bf16 natively (else bf16 arithmetic is emulated and float32 is faster).

    A narrower ISA forced on this machine (`SWITCHBOARD_KERNEL_ISA=avx2|scalar`, or torch's
    `ATEN_CPU_CAPABILITY=avx2|default`) stands for a CPU without bf16 instructions, as issue 18's AVX2 run
    means it to: bf16 compute is then no candidate, as on that CPU, whatever this one's flags say."""
    from backends.local.engine.kernels import kernel_isa_setting

    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    forced = kernel_isa_setting() != "native" or aten in ("avx2", "default")
    return not forced and any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def candidates(flags: tuple[str, ...]) -> list[tuple[str, str]]:
    dtypes = ("float32", "bfloat16") if native_bf16(flags) else ("float32",)
    return [(dtype, quant) for dtype in dtypes for quant in QUANT_CANDIDATES]


def cache_key(model_name: str, threads: int, *, dtype: str, quant: str) -> str:
    import torch

    from backends.local.engine.kernels import kernel_isa_setting, kernels_disabled, source_digest

    model, flags = cpu_description()
    parts = [torch.__version__, source_digest(), str(kernels_disabled()), kernel_isa_setting(), model,
             " ".join(flags), model_name, str(threads), dtype, quant]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_path() -> Path:
    from backends.local.engine.kernels import kernels_dir

    return kernels_dir() / "autotune.json"


def read_cached(key: str) -> Choice | None:
    try:
        raw = json.loads(cache_path().read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not raw:
        return None
    table = tuple(Timing(**row) for row in raw["table"])
    return Choice(raw["dtype"], raw["quant"], table, key, cached=True)


def write_cached(choice: Choice) -> None:
    path = cache_path()
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    entries[choice.key] = {
        "dtype": choice.dtype,
        "quant": choice.quant,
        "table": [asdict(t) for t in choice.table],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{time.time_ns()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)  # atomic: processes starting together never read half a file


def build_candidate(loaded: Any, dtype: str, quant: str, *, kv_dtype: str = "auto") -> Any:
    """One candidate's runner, built from the loaded weights (left intact) over a small cache (`kv_dtype`:
    the engine's `--kv-dtype`, `auto` as it runs by default)."""
    import torch

    from backends.local.build import assemble_engine_model, kv_cache_dtype
    from backends.local.engine.kernels import attach_cpu_kernels
    from backends.local.engine.runner import build_runner

    # Built with one compute thread: the build is elementwise passes over memory that a second thread
    # hardly speeds up, and on a busy machine an OpenMP team whose other thread is descheduled waits at every
    # op's barrier (docs/ENGINE.md, Threads). The timing that follows runs with the engine's count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = assemble_engine_model(loaded, dtype, quant)
    finally:
        torch.set_num_threads(threads)
    attach_cpu_kernels(model)
    kv = getattr(torch, kv_cache_dtype(kv_dtype, dtype, "cpu"))
    return build_runner(model, kv_cache_mb=32, block_size=16, attn_impl="auto", kv_dtype=kv)


def pruned(dtype: str, quant: str) -> str:
    """Why a candidate is not timed on this machine ("" when it is): one that another always beats here.

    float32 weights under float32 compute stream 4x the bytes of int8 per decoded token, and int8's own GEMV
    kernel builds for every ISA the engine has (AVX-512, AVX2, NEON, scalar): it never won a table."""
    from backends.local.engine.kernels import kernel_op

    if (dtype, quant) == ("float32", "none") and kernel_op("int8_gemv") is not None:
        return "float32 weights: int8 reads a quarter of the bytes on the same kernels"
    return ""


def _measure(runner: Any, tables: Any, steps: int, rounds: int) -> tuple[float, float, float]:
    from backends.local.warmup import time_steps

    best = (float("inf"),) * 3
    for _ in range(rounds):
        got = time_steps(runner, tables, steps=steps, prefill_tokens=PREFILL_TOKENS)
        best = tuple(min(a, b) for a, b in zip(best, got, strict=True))  # type: ignore[assignment]
    return best


def _timing(dtype: str, quant: str, seconds: tuple[float, float, float], early: bool = False) -> Timing:
    d1, d8, pf = seconds
    return Timing(dtype, quant, d1 * 1e3, d8 * 1e3, pf * 1e3, early=early)


def time_candidates(loaded: Any, pool: list[tuple[str, str]]) -> tuple[Timing, ...]:
    """Time the candidates one after another, each built only while it is timed: one model at a time.

    A candidate first runs one step of each shape twice (`QUICK_ROUNDS`, the faster kept); one whose
    score is then `SLOWER` times the best so far stops there (its row says so). The others run `ROUNDS`
    rounds of `DECODE_STEPS` steps, keeping each shape's fastest, so a burst of other work on a shared
    machine during one round does not decide the choice.
    """
    from backends.local.engine.heap import trim_heap
    from backends.local.warmup import timing_tables

    table: list[Timing] = []
    for dtype, quant in pool:
        started_s = time.perf_counter()
        runner = build_candidate(loaded, dtype, quant)
        built_s = time.perf_counter()
        tables = timing_tables(runner, steps=DECODE_STEPS, prefill_tokens=PREFILL_TOKENS)
        timed = _timing(dtype, quant, _measure(runner, tables, 1, QUICK_ROUNDS), early=True)
        best = min((t.score_ms for t in table if not t.early), default=None)
        if best is None or timed.score_ms <= SLOWER * best:
            timed = _timing(dtype, quant, _measure(runner, tables, DECODE_STEPS, ROUNDS))
        table.append(timed)
        del runner, tables
        trim_heap()
        log.info(
            "autotune: %s %s built in %.1f s, timed in %.1f s%s",
            dtype,
            quant,
            built_s - started_s,
            time.perf_counter() - built_s,
            " (stopped early)" if timed.early else "",
        )
    return tuple(table)


def choose(loaded: Any, *, dtype: str, quant: str, threads: int) -> Choice:
    """Resolve `auto` in dtype and/or quant by timing (or from the cache); fixed values are kept."""
    key = cache_key(loaded.name, threads, dtype=dtype, quant=quant)
    cached = read_cached(key)
    if cached is not None:
        return cached
    _, flags = cpu_description()
    pool = [(d, q) for d, q in candidates(flags) if dtype in ("auto", d) and quant in ("auto", q)] or [
        (dtype if dtype != "auto" else "float32", quant if quant != "auto" else "int4")
    ]
    timed_pool = [(d, q) for d, q in pool if not pruned(d, q)] or pool
    for d, q in pool:
        if (d, q) not in timed_pool:
            log.info("autotune: not timing %s %s (%s)", d, q, pruned(d, q))
    table = time_candidates(loaded, timed_pool)  # on the caller's thread, with its thread count
    best = min((t for t in table if not t.early), key=lambda t: t.score_ms)
    choice = Choice(best.dtype, best.quant, table, key, cached=False)
    write_cached(choice)
    return choice
