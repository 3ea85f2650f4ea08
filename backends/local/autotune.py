"""`--dtype auto` / `--quant auto`: time the candidate configurations on this machine and keep the fastest.

Candidates are every (compute dtype, weight quantization) whose quality is within the stated bounds: float32
compute, and bf16 compute only where the CPU has native bf16 arithmetic (AVX512-BF16, AMX, Arm BF16), over
weights kept as is, int8 per channel, or int4 group 32 with an int8 `lm_head` (docs/BENCHMARKS.md,
"Weight-only quantization"). Each is built from the loaded weights and timed in interleaved rounds (the
fastest round counts): decode of 1 and 8 rows and a 64-token prefill. The choice is cached in the kernels
directory under a key of the torch version, the kernel sources, the CPU model and flags, the model and the
thread count; any change times again.
Invariant: the choice is one of the candidates, and the table that justified it travels with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUANT_CANDIDATES = ("int4", "int8", "none")
DECODE_STEPS = 6  # timed steps per row count and round, after one warm-up step
ROUNDS = 3
PREFILL_TOKENS = 64


@dataclass(frozen=True, slots=True)
class Timing:
    dtype: str
    quant: str
    decode1_ms: float  # one decode step, one sequence
    decode8_ms: float  # one decode step, eight sequences
    prefill_ms: float  # one 64-token prefill chunk

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
    """Whether the CPU computes in bf16 natively (else bf16 arithmetic is emulated and float32 is faster)."""
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))


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


def build_candidate(hf_model: Any, dtype: str, quant: str) -> Any:
    """One candidate's runner, built from the transformers weights (left intact) over a small cache."""
    import torch

    from backends.local.engine.kernels import attach_cpu_kernels
    from backends.local.engine.runner import build_runner
    from backends.local.engine.weights import build_model

    model = build_model(hf_model, dtype=getattr(torch, dtype), device="cpu", release_source=False)
    if quant != "none":
        from backends.local.engine.quant import quantize_model

        quantize_model(model, quant, group_size=32)
    attach_cpu_kernels(model)
    return build_runner(model, kv_cache_mb=32, block_size=16, attn_impl="auto")


def time_candidates(hf_model: Any, pool: list[tuple[str, str]]) -> tuple[Timing, ...]:
    """Time every candidate in interleaved rounds and keep each one's fastest round.

    On a shared machine a burst of other work slows whichever candidate runs at that moment; interleaving
    spreads it over all of them, and the minimum of the rounds is the figure least touched by it.
    """
    from backends.local.warmup import time_steps, timing_tables

    runners = [build_candidate(hf_model, dtype, quant) for dtype, quant in pool]
    tables = [timing_tables(r, steps=DECODE_STEPS, prefill_tokens=PREFILL_TOKENS) for r in runners]
    best: list[tuple[float, ...]] = [(float("inf"),) * 3 for _ in pool]
    for _ in range(ROUNDS):
        for i, runner in enumerate(runners):
            got = time_steps(runner, tables[i], steps=DECODE_STEPS, prefill_tokens=PREFILL_TOKENS)
            best[i] = tuple(min(a, b) for a, b in zip(best[i], got, strict=True))
    return tuple(
        Timing(dtype, quant, d1 * 1e3, d8 * 1e3, pf * 1e3)
        for (dtype, quant), (d1, d8, pf) in zip(pool, best, strict=True)
    )


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
    table = time_candidates(loaded.model, pool)  # on the caller's thread, with its thread count
    best = min(table, key=lambda t: t.score_ms)
    choice = Choice(best.dtype, best.quant, table, key, cached=False)
    write_cached(choice)
    return choice
