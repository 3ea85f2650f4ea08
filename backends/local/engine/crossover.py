"""Where an int4 layer stops using the int4 GEMV kernel and dequantizes for the GEMM instead: timed at start.

`int4_gemv` reads the packed weight once for all rows but does the int8 dot products of every row itself, so
its cost grows with the rows; dequantize-then-GEMM pays a fixed cost (the weight written out in the compute
dtype) and then runs the BLAS GEMM, whose cost barely grows (AMX or AVX512-BF16 for bf16). Which is faster
at 8 to 32 rows (decode of many streams) depends on the CPU and the compute dtype: on a Sapphire Rapids VM
with bf16 compute the GEMM won from 16 rows (32 rows: 184 vs 380 us for a 1536 x 576 layer), with float32
compute only at 32. `calibrate` times the model's largest int4 layer both ways at a few row counts and sets
every int4 layer's `gemm_rows` to the smallest count from which the GEMM wins at every larger one measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from backends.local.engine.quant import INT_KERNEL_MAX_ROWS, Int4Linear

log = logging.getLogger(__name__)

ROWS = (4, 8, 12, 16, 24, 32)
REPEATS = 5  # timed calls per path and row count (median), after two warm-up calls


def _median_s(fn: Callable[[], object]) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def crossover_rows(layer: Int4Linear, dtype: torch.dtype) -> tuple[int, list[tuple[int, float, float]]]:
    """(first row count handed to the GEMM, [(rows, gemv us, gemm us)]); INT_KERNEL_MAX_ROWS + 1: never."""
    table = []
    for rows in ROWS:
        x = torch.randn(rows, layer.in_features).to(dtype)
        with torch.inference_mode():
            gemv = _median_s(lambda: layer.forward(x, gemm_rows=INT_KERNEL_MAX_ROWS + 1))  # noqa: B023
            gemm = _median_s(lambda: layer.forward(x, gemm_rows=1))  # noqa: B023
        table.append((rows, gemv * 1e6, gemm * 1e6))
    first = INT_KERNEL_MAX_ROWS + 1
    for rows, gemv_us, gemm_us in reversed(table):
        if gemm_us >= gemv_us:
            break
        first = rows
    return first, table


def calibrate(model: nn.Module, dtype: torch.dtype) -> int | None:
    """Time the largest int4 layer and set every int4 layer's `gemm_rows`; the value set (None: no layer)."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.packing == "switchboard"]
    if not layers:
        return None
    largest = max(layers, key=lambda m: m.in_features * m.out_features)
    first, table = crossover_rows(largest, dtype)
    for layer in layers:
        layer.gemm_rows = first
    log.info(
        "int4 layers: dequantize + GEMM from %s rows (%s, %d x %d: %s)",
        first if first <= INT_KERNEL_MAX_ROWS else f"{first} (never within the kernel cap)",
        str(dtype).removeprefix("torch."),
        largest.out_features,
        largest.in_features,
        ", ".join(f"{r} rows {a:.0f}/{b:.0f} us" for r, a, b in table),
    )
    return first
