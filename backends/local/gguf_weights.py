"""A GGUF file's tensors as the engine's `WeightSource`: read one at a time from the memory-mapped file.

`tensor(name)` dequantizes one tensor to float32 (gguf-py's arithmetic; Q4_0/Q4_1/Q8_0 redone in torch, bit
for bit) and undoes llama.cpp's q/k row permutation for the `llama` architecture: what transformers' GGUF
loader computes, tensor for tensor, without the whole float32 model. `int4_blocks(name, 32)` hands Q4_0/Q4_1
weights over in `Int4Linear`'s layout with no float copy: their 32-element blocks hold element j in byte j's
low nibble and j + 16 in its high nibble, as our kernel reads them. Q4_1 (w = d * q + m) is ours with scale
d and zero m + 8d; Q4_0 (w = d * (q - 8)) with scale d and zero 0; fp16 d and m become bf16 (rounded once).
Invariant: nothing returned shares memory with the file, so `close()` leaves the model whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_RECOMPUTED = ("rope_freqs.weight",)  # llama3 GGUFs store RoPE factors; the engine computes them from config
_INT4_BLOCK = 32
_Q8_BLOCK = 32  # Q8_0: 32 int8 values per fp16 scale


def hf_name(gguf_name: str) -> str | None:
    """transformers' name for a GGUF tensor (Llama-family layout); None for tensors the engine recomputes."""
    if gguf_name in _RECOMPUTED:
        return None
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise ValueError(f"GGUF tensor `{gguf_name}` has no place in the engine's Llama-family model")


class GgufWeights:
    """The tensors of one GGUF under transformers' names. `close()` unmaps the file."""

    def __init__(self, path: Path, *, num_heads: int, num_kv_heads: int) -> None:
        from gguf import GGUFReader

        self.path = path
        reader = GGUFReader(path)
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""
        # transformers reverses llama.cpp's rotary permutation of q/k rows for the `llama` architecture only.
        self._heads = {"q_proj": num_heads, "k_proj": num_kv_heads} if arch == "llama" else {}
        self._tensors: dict[str, Any] = {}
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor
        # The tensors' views keep the file mapped; the parsed metadata (the tokenizer's ~100k strings as
        # numpy arrays) is dropped now rather than held through the build.

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def tensor(self, name: str) -> Tensor:
        from gguf import dequantize

        stored = self._tensors[name]
        fast = _dequantize_blocks(stored)
        if fast is not None:
            return self._unpermute(name, fast)
        values = dequantize(stored.data, stored.tensor_type)
        if np.may_share_memory(values, stored.data):  # F32 comes back as a view of the mapped file
            values = np.array(values)
        return self._unpermute(name, torch.from_numpy(values))

    def int4_blocks(self, name: str, group_size: int) -> tuple[Tensor, Tensor] | None:
        from gguf import GGMLQuantizationType

        stored = self._tensors[name]
        kind = stored.tensor_type
        if group_size != _INT4_BLOCK or kind not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            return None
        header = 4 if kind == GGMLQuantizationType.Q4_1 else 2  # fp16 d (and m) before 16 bytes of nibbles
        n = stored.data.shape[0]
        blocks = np.asarray(stored.data).reshape(n, -1, header + 16)  # (N, K/32, bytes) of the mapped file
        packed = torch.from_numpy(np.ascontiguousarray(blocks[..., header:]).reshape(n, -1))  # a copy
        d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)).float()  # (N, G, 1)
        if header == 4:
            m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)).float()
            zero = m + 8 * d
        else:
            zero = torch.zeros_like(d)
        scales_and_zeros = torch.cat([d, zero], dim=-1).to(torch.bfloat16)  # (N, G, 2)
        return (
            self._unpermute(name, packed),
            self._unpermute(name, scales_and_zeros),
        )

    def q8_0_rows(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(q (N, K) int8, d (N, K / 32) float32) of a Q8_0 tensor, copied out of the mapped file; None for
        other types. q x d in float32 is what `tensor` gives, element for element."""
        from gguf import GGMLQuantizationType

        stored = self._tensors[name]
        if stored.tensor_type != GGMLQuantizationType.Q8_0:
            return None
        q, d = _q8_0_blocks(stored)
        n = q.shape[0]
        return self._unpermute(name, q.reshape(n, -1)), self._unpermute(name, d.reshape(n, -1))

    def _unpermute(self, name: str, rows: Tensor) -> Tensor:
        """llama.cpp stores q/k rows per head as (2, dim/2) interleaved; back to transformers' order."""
        heads = next((h for part, h in self._heads.items() if f".{part}." in name), None)
        if heads is None:
            return rows
        half = rows.shape[0] // heads // 2
        grouped = rows.reshape(heads, half, 2, *rows.shape[1:])
        return grouped.transpose(1, 2).reshape(rows.shape).contiguous()

    def close(self) -> None:
        """Drop the file mapping (its pages stop counting in this process's RSS)."""
        self._tensors.clear()


def _fp16(raw: np.ndarray) -> Tensor:
    """(..., 2) uint8 little-endian fp16 -> (..., 1) float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)).float()


def _q8_0_blocks(stored: Any) -> tuple[Tensor, Tensor]:
    """A Q8_0 tensor's (q (N, G, 32) int8, d (N, G, 1) float32), copied out of the mapped file."""
    n = stored.data.shape[0]
    blocks = np.asarray(stored.data).reshape(n, -1, 2 + _Q8_BLOCK)  # fp16 d, then 32 int8
    return torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)), _fp16(blocks[..., 0:2])


def _dequantize_blocks(stored: Any) -> Tensor | None:
    """Q4_0 / Q4_1 / Q8_0 to float32 with torch, the same arithmetic as gguf-py's numpy (one rounding per
    product and per sum, in the same order: bit for bit, tested) in a fraction of its time; None for
    other types. Element j of a Q4 block is byte j's low nibble, element j + 16 its high nibble."""
    from gguf import GGMLQuantizationType as T

    kind = stored.tensor_type
    header = {T.Q4_0: 2, T.Q4_1: 4, T.Q8_0: 2}.get(kind)
    if header is None:
        return None
    n = stored.data.shape[0]
    if kind == T.Q8_0:
        q, d = _q8_0_blocks(stored)
        return (q.float() * d).reshape(n, -1)
    blocks = np.asarray(stored.data).reshape(n, -1, header + 16)
    d = _fp16(blocks[..., 0:2])  # (N, G, 1)
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., header:]))  # (N, G, 16)
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (N, G, 32) in element order
    if kind == T.Q4_0:
        return (d * (nibbles.to(torch.int8) - 8).float()).reshape(n, -1)
    return (d * nibbles.float() + _fp16(blocks[..., 2:4])).reshape(n, -1)
