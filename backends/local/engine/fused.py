"""Decode steps without the module machinery: each decoder layer's kernels called from one closure.

A CPU decode step of SmolLM2-135M is about 150 kernel calls (4 projections, 2 norms, RoPE + K/V write and
attention per layer, 30 layers), and the Python around them (`nn.Module.__call__` per module, attribute
lookups, each projection wrapper's checks) cost about a third of a one-stream step (cProfile of
`ModelRunner.execute` at one row, fp32 over int4: 2.3 of 6.8 ms). `fuse_decode(model)` gives each `Block` a
`decode` closure holding its weights and the C++ ops; it serves a step when that step is paged decode
attention (every chunk's queries over the paged cache, `attention.attend`'s identity group with token
sequences) of at most `INT_KERNEL_MAX_ROWS` rows, and returns None otherwise, so the modules serve it.

It calls the same kernels in the same order on the same tensors as the modules do, so a step's logits are
bit for bit those of the module path (tests/engine/test_fused_decode.py). A projection it cannot call
directly (a bias, padded input features, another packing) is called through its own `forward`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from backends.local.engine.attention import AttentionMetadata
from backends.local.engine.kv_cache import KVCache
from backends.local.engine.model import Block, Transformer
from backends.local.engine.quant import INT_KERNEL_MAX_ROWS, Int4Linear, int_kernel

LayerStep = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, KVCache], torch.Tensor | None
]


def _direct(proj: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`proj`'s forward for 2-D contiguous float32/bf16 rows (at most INT_KERNEL_MAX_ROWS): the int4 kernel
    itself where `Int4Linear.forward` would call just that, else the module's own forward."""
    op = int_kernel("int4_gemv")
    if (
        isinstance(proj, Int4Linear)
        and op is not None
        and proj.packing == "switchboard"
        and proj.bias is None
        and proj.in_features == proj.padded_in_features
    ):
        weight, scales_and_zeros, group = proj.weight, proj.scales_and_zeros, proj.group_size
        return lambda x: op(x, weight, scales_and_zeros, group)
    return proj.forward


def layer_step(block: Block, paged: Callable[..., torch.Tensor]) -> LayerStep | None:
    """The closure for `block`, or None when its norms or RoPE have no C++ kernel (then nothing to save)."""
    att, mlp, norm1, norm2 = block.attention, block.mlp, block.attention_norm, block.mlp_norm
    rope, first_norm, second_norm = att.rope_kernel, norm1.kernel, norm2.kernel
    if rope is None or first_norm is None or second_norm is None:
        return None
    qkv, o_proj = _direct(att.qkv_proj), _direct(att.o_proj)
    gate_up, down = _direct(mlp.gate_up_proj), _direct(mlp.down_proj)
    w1, eps1, w2, eps2 = norm1.weight, norm1.eps, norm2.weight, norm2.eps
    index, n_q, head_dim, scale = att.layer_idx, att.n_heads, att.head_dim, att.scale
    width = att.n_heads + 2 * att.n_kv_heads
    silu = F.silu

    def step(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata, kv: KVCache
    ) -> torch.Tensor | None:
        rows = x.shape[0]
        if rows > INT_KERNEL_MAX_ROWS or not attn.identity or x.dim() != 2 or not x.is_contiguous():
            return None
        group = attn.groups[0]
        if group.token_seq is None:
            return None
        k_cache, v_cache = kv.k[index], kv.v[index]
        q = rope(qkv(first_norm(x, w1, eps1)).view(rows, width, head_dim), cos, sin, attn.slots, k_cache,
                 v_cache, n_q)  # fmt: skip
        out = paged(q, k_cache, v_cache, group.block_table, group.token_seq, group.token_keys, scale)
        x = x + o_proj(out.view(rows, n_q * head_dim))
        gate, up = gate_up(second_norm(x, w2, eps2)).chunk(2, dim=-1)
        return x + down(silu(gate) * up)

    return step


def fuse_decode(model: Transformer) -> int:
    """Give every layer of a CPU model with the C++ kernels its decode closure; how many layers got one."""
    from backends.local.engine.kernels import kernel_op

    paged = kernel_op("paged_attention")
    if paged is None:
        return 0
    count = 0
    for block in model.layers:
        assert isinstance(block, Block)
        block.decode = layer_step(block, paged)
        count += block.decode is not None
    return count
