"""bf16-weight linear layers on the C++ `bf16_gemv` kernel: decode rows in float32 or bf16 compute.

`GemvLinear` wraps an `nn.Linear` whose weight is bf16 (no copy: tied weights stay tied). Calls of a few rows
(decode) go to the kernel, which widens the weight in registers and accumulates in float32; larger calls go
to the GEMM. With float32 activations (`--dtype float32` over bf16-stored weights, for CPUs without native
bf16 arithmetic) the GEMM gets the weight widened once per call. Invariant: output equals F.linear over the
same weight up to float32 summation order and one rounding to the activations' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backends.local.engine.quant import _kernel_output, rows_input


class GemvLinear(nn.Module):
    """A bf16 `nn.Linear` whose few-row calls (decode) go to the C++ `bf16_gemv` kernel; others to the GEMM.

    Holds the original weight and bias tensors (no copy, tied weights stay tied). Output equals F.linear up
    to float32 summation order and one bf16 rounding per element.
    """

    MAX_ROWS = 2  # measured: beyond this the GEMM's register blocking wins (docs/ENGINE.md)

    def __init__(self, linear: nn.Linear, op: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._op = op

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0] if x.dim() == 2 else x.numel() // self.in_features
        if rows > self.MAX_ROWS or rows == 0 or x.dtype not in (torch.bfloat16, torch.float32):
            if x.dtype == self.weight.dtype:
                return F.linear(x, self.weight, self.bias)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        out = self._op(rows_input(x, self.in_features, self.in_features), self.weight, self.bias)
        return _kernel_output(out, x, None, self.out_features)  # the kernel added the bias


def use_gemv_kernel(model: nn.Module) -> int:
    """Swap every bf16 CPU `nn.Linear` in `model` for `GemvLinear` when the kernel is built; how many."""
    from backends.local.engine.kernels import kernel_op

    op = kernel_op("bf16_gemv")
    if op is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.is_cpu:
                setattr(parent, name, GemvLinear(child, op))
                swapped += 1
    return swapped
