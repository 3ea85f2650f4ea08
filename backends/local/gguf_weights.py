"""A GGUF file's tensors as the engine's `WeightSource`: read one at a time from the memory-mapped file.

`tensor(name)` dequantizes one tensor to float32 (gguf-py's arithmetic; Q4_0/Q4_1/Q8_0 redone in torch, bit
for bit) and undoes llama.cpp's q/k row permutation for the `llama` architecture: what transformers' GGUF
loader computes, tensor for tensor, without the whole float32 model. `int4_blocks(name, 32)` hands Q4_0/Q4_1
weights over in `Int4Linear`'s layout with no float copy: their 32-element blocks hold element j in byte j's
low nibble and j + 16 in its high nibble, as our kernel reads them. Q4_1 (w = d * q + m) is ours with scale
d and zero m + 8d; Q4_0 (w = d * (q - 8)) with scale d and zero 0; fp16 d and m become bf16 (rounded once).
Invariant: nothing returned shares memory with the file, so `close()` leaves the model whole.

`read_gguf` parses the header and tensor table itself: gguf-py's reader turns every metadata value (the
tokenizer's ~100k strings) into numpy arrays (~55 MB while open) and importing gguf-py keeps sentencepiece,
mistral_common and yaml resident (~4 MB for the engine's life). gguf-py is imported only to dequantize a
type this module does not (K-quants and the rest), as before.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
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

# ggml type ids (gguf-py's GGMLQuantizationType) of the types read here, with (elements per block, bytes
# per block); others take their sizes from gguf-py.
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
_BLOCK_SIZES = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}
_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# metadata value types: struct formats of the fixed-size ones; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """One tensor of a GGUF: its ggml type id and `data`, a view of the mapped file shaped as gguf-py shapes
    it (rows x bytes per row, uint8, for block types; the element type for F32 and F16)."""

    name: str
    tensor_type: int
    data: np.ndarray


def read_gguf(path: Path) -> tuple[dict[str, Any], list[StoredTensor]]:
    """(the scalar and string metadata, the tensors) of a GGUF version 2 or 3; arrays are skipped."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(mapped)  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
    if bytes(buffer[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    version, n_tensors, n_fields = struct.unpack_from("<IQQ", buffer, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    offset = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_fields):
        key, offset = _string(buffer, offset)
        (kind,), offset = struct.unpack_from("<I", buffer, offset), offset + 4
        value, offset = _value(buffer, offset, kind)
        if value is not None:
            metadata[key] = value
    table = []
    for _ in range(n_tensors):
        name, offset = _string(buffer, offset)
        (n_dims,) = struct.unpack_from("<I", buffer, offset)
        dims = struct.unpack_from(f"<{n_dims}Q", buffer, offset + 4)
        kind, start = struct.unpack_from("<IQ", buffer, offset + 4 + 8 * n_dims)
        offset += 4 + 8 * n_dims + 12
        table.append((name, tuple(int(d) for d in dims), int(kind), int(start)))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-offset // alignment) * alignment
    return metadata, [_tensor(mapped, data_start, *entry) for entry in table]


def _string(buffer: memoryview, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buffer, offset)
    end = offset + 8 + length
    return bytes(buffer[offset + 8 : end]).decode("utf-8", errors="replace"), end


def _value(buffer: memoryview, offset: int, kind: int) -> tuple[Any, int]:
    """One metadata value and the offset after it; an array's value is None (only skipped)."""
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack_from(fmt, buffer, offset)[0], offset + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buffer, offset)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", buffer, offset)
        offset += 12
        if item in _SCALARS:
            return None, offset + count * struct.calcsize("<" + _SCALARS[item])
        if item == _STRING:  # a vocabulary: lengths only, nothing decoded
            for _ in range(count):
                offset += 8 + struct.unpack_from("<Q", buffer, offset)[0]
            return None, offset
        for _ in range(count):
            _, offset = _value(buffer, offset, item)
        return None, offset
    raise ValueError(f"GGUF metadata value type {kind} is unknown")


def _tensor(
    mapped: np.ndarray, data_start: int, name: str, dims: tuple[int, ...], kind: int, start: int
) -> StoredTensor:
    shape = tuple(reversed(dims))  # ggml lists the innermost dimension first
    if kind in _BLOCK_SIZES:
        block, block_bytes = _BLOCK_SIZES[kind]
    else:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    n_bytes = int(np.prod(shape, dtype=np.int64)) // block * block_bytes
    raw = mapped[data_start + start : data_start + start + n_bytes]
    if kind == F32:
        return StoredTensor(name, kind, raw.view(np.float32).reshape(shape))
    if kind == F16:
        return StoredTensor(name, kind, raw.view(np.float16).reshape(shape))
    return StoredTensor(name, kind, raw.reshape(*shape[:-1], shape[-1] // block * block_bytes))


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
        self.path = path
        metadata, tensors = read_gguf(path)
        # transformers reverses llama.cpp's rotary permutation of q/k rows for the `llama` architecture only.
        llama = metadata.get("general.architecture") == "llama"
        self._heads = {"q_proj": num_heads, "k_proj": num_kv_heads} if llama else {}
        self._tensors: dict[str, StoredTensor] = {}
        for tensor in tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor  # its view keeps the file mapped until close()

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def tensor(self, name: str) -> Tensor:
        stored = self._tensors[name]
        fast = _dequantize_blocks(stored)
        if fast is not None:
            return self._unpermute(name, fast)
        if stored.tensor_type in (F32, F16):
            return self._unpermute(name, torch.from_numpy(stored.data.astype(np.float32)))  # a copy
        from gguf import GGMLQuantizationType, dequantize

        # every type left here dequantizes into a new array (F32, gguf-py's one view of the file, is above)
        values = dequantize(stored.data, GGMLQuantizationType(stored.tensor_type))
        return self._unpermute(name, torch.from_numpy(values))

    def int4_blocks(self, name: str, group_size: int) -> tuple[Tensor, Tensor] | None:
        stored = self._tensors[name]
        kind = stored.tensor_type
        if group_size != _INT4_BLOCK or kind not in (Q4_0, Q4_1):
            return None
        header = 4 if kind == Q4_1 else 2  # fp16 d (and m) before 16 bytes of nibbles
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
        stored = self._tensors[name]
        if stored.tensor_type != Q8_0:
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


def _q8_0_blocks(stored: StoredTensor) -> tuple[Tensor, Tensor]:
    """A Q8_0 tensor's (q (N, G, 32) int8, d (N, G, 1) float32), copied out of the mapped file."""
    n = stored.data.shape[0]
    blocks = np.asarray(stored.data).reshape(n, -1, 2 + _Q8_BLOCK)  # fp16 d, then 32 int8
    return torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)), _fp16(blocks[..., 0:2])


def _dequantize_blocks(stored: StoredTensor) -> Tensor | None:
    """Q4_0 / Q4_1 / Q8_0 to float32 with torch, the same arithmetic as gguf-py's numpy (one rounding per
    product and per sum, in the same order: bit for bit, tested) in a fraction of its time; None for
    other types. Element j of a Q4 block is byte j's low nibble, element j + 16 its high nibble."""
    kind = stored.tensor_type
    header = {Q4_0: 2, Q4_1: 4, Q8_0: 2}.get(kind)
    if header is None:
        return None
    n = stored.data.shape[0]
    if kind == Q8_0:
        q, d = _q8_0_blocks(stored)
        return (q.float() * d).reshape(n, -1)
    blocks = np.asarray(stored.data).reshape(n, -1, header + 16)
    d = _fp16(blocks[..., 0:2])  # (N, G, 1)
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., header:]))  # (N, G, 16)
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (N, G, 32) in element order
    if kind == Q4_0:
        return (d * (nibbles.to(torch.int8) - 8).float()).reshape(n, -1)
    return (d * nibbles.float() + _fp16(blocks[..., 2:4])).reshape(n, -1)
