"""Weight-only int8/int4 quantization of linear layers: a module swap applied at load time.

`quantize_model` replaces `nn.Linear` children with `Int8Linear` (per-output-channel symmetric int8) or
`Int4Linear` (grouped asymmetric int4 in PyTorch's CPU packed layout) and returns a `QuantManifest` naming
every layer's scheme; the model's own code never branches on quantization, and `apply_manifest` replays a
recorded scheme rather than guessing one. Activations are cast to bf16 around the CPU kernels
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) and back to the caller's dtype.
Invariant: a quantized layer computes bf16(x) @ dequantize(q).T (+ bias) up to the kernel's bf16 output
rounding; tests hold each layer to that and whole models to stated top-1/KL bounds against full precision.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes `_weight_int4pack_mm_for_cpu` accepts
INT4_OUT_MULTIPLE = 16  # `_convert_weight_to_int4pack_for_cpu`: "expect N to be dividable by 16"
INT8_IN_MULTIPLE = 16  # `_weight_int8pack_mm` (torch 2.13, bf16) segfaults when in_features % 16 != 0
LM_HEAD_NAME = "lm_head"
MANIFEST_VERSION = 1
_INT4_MID = 8  # stored nibble q in 0..15 means (q - 8) * scale + zero
_QUANT_ROWS = 4096  # rows quantized at a time: bounds the float32 temporaries (quantization is per row)
_MIN_SCALE = 1e-8  # an all-equal (e.g. all-zero padding) row or group still gets a finite scale


class QuantMode(StrEnum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


class LayerScheme(StrEnum):
    KEEP = "keep"  # left as the original nn.Linear
    INT8 = "int8"
    INT4 = "int4"


@dataclass(frozen=True, slots=True)
class LayerQuant:
    """What one linear layer became. `note` says why it differs from what the mode asked for."""

    name: str
    scheme: LayerScheme
    in_features: int
    out_features: int
    group_size: int | None  # int4 only
    padded_in_features: int  # == in_features unless zero columns were appended for the kernel
    bytes_before: int
    bytes_after: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class QuantManifest:
    """The recorded scheme of a quantized model. Byte totals are `model_bytes` before and after the swap."""

    mode: QuantMode
    group_size: int | None  # int4 only
    lm_head: LayerScheme
    layers: tuple[LayerQuant, ...]
    bytes_before: int
    bytes_after: int
    version: int = MANIFEST_VERSION

    def scheme_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.scheme.value] = counts.get(layer.scheme.value, 0) + 1
        return counts

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> QuantManifest:
        raw = json.loads(text)
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"quant manifest version {raw.get('version')!r}; this engine reads {MANIFEST_VERSION}"
            )
        layers = tuple(
            LayerQuant(**{**layer, "scheme": LayerScheme(layer["scheme"])}) for layer in raw["layers"]
        )
        return cls(
            mode=QuantMode(raw["mode"]),
            group_size=raw["group_size"],
            lm_head=LayerScheme(raw["lm_head"]),
            layers=layers,
            bytes_before=raw["bytes_before"],
            bytes_after=raw["bytes_after"],
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


INT_KERNEL_MAX_ROWS = 32  # int4_gemv / int8_gemv take up to this many rows; more go to a GEMM


def int_kernel(name: str) -> Any:
    """The C++ int kernel `name`, or None without the kernels (then torch's own int kernels run)."""
    from backends.local.engine.kernels import kernel_op

    return kernel_op(name)


def rows_input(x: Tensor, in_features: int, padded_in_features: int) -> Tensor:
    """(..., K) -> (M, K_padded) contiguous float32 or bf16 (x's dtype when it is one of those)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    if padded_in_features != in_features:
        x2 = F.pad(x2, (0, padded_in_features - in_features))
    return x2 if x2.is_contiguous() else x2.contiguous()


def _kernel_input(x: Tensor, in_features: int, padded_in_features: int) -> Tensor:
    """(..., K) any float dtype -> (M, K_padded) contiguous bf16, zero columns matching the zero weights.

    The checks are Python-side so the common decode case (2-D contiguous bf16, no padding) makes no
    dispatcher call at all: a 135M model calls this ~120 times per token.
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if padded_in_features != in_features:
        x2 = F.pad(x2, (0, padded_in_features - in_features))
    return x2 if x2.is_contiguous() else x2.contiguous()


def in_row_chunks(op: Any, x2: Tensor, out_features: int, *weight: Any) -> Tensor:
    """`op(rows, *weight)` over x2 (M, K) in calls of at most INT_KERNEL_MAX_ROWS rows: each row computes as
    it would alone, in any batch (no rows: a prefill chunk that ends no prompt asks for no logits)."""
    if x2.shape[0] <= INT_KERNEL_MAX_ROWS:
        return op(x2, *weight) if x2.shape[0] else x2.new_empty(0, out_features)
    parts = [op(x2[i : i + INT_KERNEL_MAX_ROWS], *weight) for i in range(0, x2.shape[0], INT_KERNEL_MAX_ROWS)]
    return torch.cat(parts)


def untile_q8_0(q: Tensor, scales: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Rows `index` of a Q8_0 table in `q8_0_tile_pack`'s tiles (q (N, K) uint8, scales (N / T, K / 32, T))
    as (int8 values (n, K), float32 scales (n, K / 32)): per tile t, block b, word j and row r, 4 bytes
    (quant_impl.h, "Tiled Q8_0"), stored as value ^ 0x80."""
    rows, k = scales.shape[-1], q.shape[1]
    t, r = index // rows, index % rows
    words = q.view(-1, k // 32, 8, rows, 4)
    return (words[t, :, :, r, :].reshape(-1, k) ^ 0x80).view(torch.int8), scales[t, :, r]


def _kernel_output(out: Tensor, x: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """The kernel's (M, N) bf16 result in x's dtype and leading shape, plus the bias."""
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if bias is not None:
        out = out + (bias if bias.dtype == x.dtype else bias.to(x.dtype))
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out_features)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> q (N, K) int8 in [-127, 127], scales (N,) bf16; w ~= q * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=_MIN_SCALE).to(torch.bfloat16)
    # Quantise against the bf16 scale the kernel will use, so its rounding adds no error of its own.
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(N, K) float, K % group_size == 0 -> q (N, K) int32 in [0, 15], scales_and_zeros (K/gs, N, 2) bf16.

    Asymmetric per group, as the kernel expects: w ~= (q - 8) * scale + zero, with `zero` the value at q = 8.
    """
    w = weight.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)  # (N, G, gs)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=_MIN_SCALE).to(torch.bfloat16)
    zero = (lo + _INT4_MID * scale.float()).to(torch.bfloat16)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]) + _INT4_MID
    q = q.clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return q, scales_and_zeros


def pack_int4_blocks(q: Tensor) -> Tensor:
    """(N, K) int32 in 0..15, K % 32 == 0 -> (N, K/2) uint8: per 32-block, byte j = q[j] | q[j + 16] << 4.

    The `int4_gemv` layout (csrc/quant_impl.h): one 16-byte load gives a block's 32 nibbles in order after a
    mask and a shift, as llama.cpp's 4-bit blocks do.
    """
    blocks = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack_int4_blocks(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4_blocks`: (N, K/2) uint8 -> (N, K) uint8 in 0..15."""
    blocks = packed.reshape(packed.shape[0], -1, 1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(packed.shape[0], -1)


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """Inverse of `quantize_int4` in float32: the weight the int4 kernel multiplies by."""
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
    groups = q.float().reshape(n, k // group_size, group_size) - _INT4_MID
    return (groups * sz[..., :1] + sz[..., 1:]).reshape(n, k)


class Int8Linear(nn.Module):
    """y = bf16(x) @ (q * scales[:, None]).T + bias; q (N, K_padded) int8, one symmetric scale per row.

    Where this build's `q8_0_gemv` reads tiles (x86) and N and K_padded allow, the layer is held as Q8_0
    tiles instead (`q8_0_tile_pack`: `weight` (N, K_padded) uint8, `scales` the row's scale for every
    32-block, (N / T, K_padded / 32, T) float32) and every row count runs that kernel in 32-row calls."""

    weight: Tensor
    scales: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, *, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.padded_in_features = _round_up(in_features, INT8_IN_MULTIPLE)
        self.register_buffer("weight", torch.zeros(out_features, self.padded_in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        weight, pad = linear.weight.detach(), layer.padded_in_features - linear.in_features
        # Row blocks: a large lm_head (49152 x 576) would otherwise take ~4 float32 copies of itself at once.
        for start in range(0, linear.out_features, _QUANT_ROWS):
            rows = slice(start, start + _QUANT_ROWS)
            q, scales = quantize_int8(F.pad(weight[rows].float(), (0, pad)))
            layer.weight[rows].copy_(q)
            layer.scales[rows].copy_(scales)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        layer._tile()
        return layer

    tiled = False

    def _tile(self) -> None:
        pack, rows = int_kernel("q8_0_tile_pack"), int_kernel("q8_0_tile_rows")
        n, k = self.weight.shape
        if pack is None or not rows() or n % rows() or k % 32:
            return
        blocks = self.scales.float()[:, None].expand(n, k // 32).contiguous()  # exact: bf16 widens
        self.weight, self.scales = pack(self.weight, blocks, rows())
        self.tiled = True

    def dequantized_weight(self) -> Tensor:
        """(N, K) float32: what the kernel multiplies by (padding columns dropped)."""
        if self.tiled:
            q, scales = untile_q8_0(self.weight, self.scales, torch.arange(self.out_features))
            return (q.float() * scales.repeat_interleave(32, dim=1))[:, : self.in_features]
        return (self.weight.float() * self.scales.float()[:, None])[:, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        if self.tiled:
            x2 = rows_input(x, self.in_features, self.padded_in_features)
            out = in_row_chunks(int_kernel("q8_0_gemv"), x2, self.out_features, self.weight, self.scales)
            return _kernel_output(out, x, self.bias, self.out_features)
        rows = x.numel() // self.in_features
        op = int_kernel("int8_gemv") if 0 < rows <= INT_KERNEL_MAX_ROWS else None
        if op is not None and self.padded_in_features % 32 == 0:
            out = op(rows_input(x, self.in_features, self.padded_in_features), self.weight, self.scales)
            return _kernel_output(out, x, self.bias, self.out_features)
        x2 = _kernel_input(x, self.in_features, self.padded_in_features)
        out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return _kernel_output(out, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W[n, k] = (q[n, k] - 8) * scale[n, k // gs] + zero[n, k // gs].

    Two packings of the same q, chosen at construction. `switchboard` (when the C++ kernels built): `weight`
    (N, K_padded / 2) uint8 in 32-element blocks and `scales_and_zeros` (N, K_padded / gs, 2), read by
    `int4_gemv` (x quantized per block to int8) in calls of up to 32 rows at every row count, prefill too
    (measured: a 512-token chunk 2.4x faster than dequantizing for the GEMM; docs/ENGINE.md); on
    builds whose `int4_gemv` reads tiles of T rows (x86: T = the vector width), both are stored tiled
    (`int4_tile_pack`: the same bytes reordered, `scales_and_zeros` (N / T, K_padded / gs, 2, T)).
    `torch`: q packed by `_convert_weight_to_int4pack_for_cpu` in a blocked layout only that kernel reads,
    `scales_and_zeros` (K_padded / gs, N, 2), x cast to bf16. K is zero-padded to a multiple of `group_size`.
    """

    weight: Tensor
    scales_and_zeros: Tensor
    bias: Tensor | None

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, group_size: int, packing: str = "torch"
    ) -> None:
        super().__init__()
        self.packing = packing
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")
        if out_features % INT4_OUT_MULTIPLE:
            raise ValueError(f"Int4Linear needs out_features % {INT4_OUT_MULTIPLE} == 0, got {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.padded_in_features = _round_up(in_features, group_size)
        k = self.padded_in_features
        self.register_buffer("weight", torch.zeros(out_features, k // 2, dtype=torch.uint8))
        sz_shape = (
            (out_features, k // group_size, 2)
            if packing == "switchboard"
            else (k // group_size, out_features, 2)
        )
        self.register_buffer("scales_and_zeros", torch.zeros(sz_shape, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, *, kernels: bool = True) -> Int4Linear:
        """`kernels`: use our `int4_gemv` packing when the C++ kernels built (False: torch's kernel)."""
        packing = "switchboard" if kernels and int_kernel("int4_gemv") is not None else "torch"
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            packing=packing,
        )
        weight = linear.weight.detach().float()
        q, scales_and_zeros = quantize_int4(
            F.pad(weight, (0, layer.padded_in_features - linear.in_features)), group_size
        )
        if packing == "switchboard":
            layer._set_blocks(pack_int4_blocks(q), scales_and_zeros.transpose(0, 1).contiguous())
        else:
            # The CPU packing ignores inner_k_tiles (every value gives the same bytes); 2 is the CUDA default.
            layer.weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
            layer.scales_and_zeros.copy_(scales_and_zeros)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    @classmethod
    def from_blocks(
        cls, packed: Tensor, scales_and_zeros: Tensor, group_size: int, bias: Tensor | None, *, kernels: bool
    ) -> Int4Linear:
        """From weights already in our block layout: `packed` (N, K/2) uint8 as `pack_int4_blocks` makes,
        `scales_and_zeros` (N, K/gs, 2) bf16; K % group_size == 0. No float copy of the weight is made
        (GGUF Q4_0/Q4_1 blocks arrive so); torch's packing, where our kernels did not build, unpacks q."""
        n, k = packed.shape[0], packed.shape[1] * 2
        packing = "switchboard" if kernels and int_kernel("int4_gemv") is not None else "torch"
        layer = cls(k, n, bias=bias is not None, group_size=group_size, packing=packing)
        if k != layer.padded_in_features or scales_and_zeros.shape != (n, k // group_size, 2):
            raise ValueError(f"int4 blocks {tuple(packed.shape)} do not make groups of {group_size}")
        if packing == "switchboard":
            layer._set_blocks(packed.contiguous(), scales_and_zeros.to(torch.bfloat16).contiguous())
        else:
            q = unpack_int4_blocks(packed).to(torch.int32)
            layer.weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
            layer.scales_and_zeros.copy_(scales_and_zeros.transpose(0, 1))
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    def _set_blocks(self, packed: Tensor, scales_and_zeros: Tensor) -> None:
        """Hold row-layout blocks (N, K/2) and scales (N, K/gs, 2): tiled where this build's kernel reads
        tiles (`int4_tile_pack`)."""
        rows = int_kernel("int4_tile_rows")()
        if rows:
            packed, scales_and_zeros = int_kernel("int4_tile_pack")(packed, scales_and_zeros, rows)
        self.weight, self.scales_and_zeros = packed, scales_and_zeros

    def forward(self, x: Tensor) -> Tensor:
        if self.packing == "switchboard":
            x2 = rows_input(x, self.in_features, self.padded_in_features)
            weight = (self.weight, self.scales_and_zeros, self.group_size)
            out = in_row_chunks(int_kernel("int4_gemv"), x2, self.out_features, *weight)
            return _kernel_output(out, x, self.bias, self.out_features)
        x2 = _kernel_input(x, self.in_features, self.padded_in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.weight, self.group_size, self.scales_and_zeros
        )
        return _kernel_output(out, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )


class BlockQuantLinear(nn.Module):
    """y = x @ W.T with W a GGUF Q8_0 table: int8 `q` (N, K) and a float32 scale per 32 columns of a row
    (`scales`, (N, K / 32)), or the same tiled (`q8_0_tile_pack`), read by the `q8_0_gemv` kernel 32 rows of
    x at a time. A tied `lm_head` built
    over the `BlockQuantEmbedding`'s own tensors (`assemble_model`): one copy of the table where an
    `Int8Linear` made from it was a second (SmolLM2: 27 MB), and the GGUF's block scales where that
    re-quantized per row. CPU, with the C++ kernels; no bias."""

    q: Tensor
    scales: Tensor

    def __init__(self, q: Tensor, scales: Tensor) -> None:
        super().__init__()
        tiled = q.dtype == torch.uint8 and scales.dim() == 3 and scales.shape[1] * 32 == q.shape[-1]
        rows = q.dtype == torch.int8 and scales.dim() == 2 and scales.shape[-1] * 32 == q.shape[-1]
        if scales.dtype != torch.float32 or not (tiled or rows):
            raise ValueError(
                "BlockQuantLinear takes int8 q (N, K) and float32 scales (N, K / 32), or their tiles "
                "(`q8_0_tile_pack`)"
            )
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor) -> Tensor:
        x2 = rows_input(x, self.in_features, self.in_features)
        out = in_row_chunks(int_kernel("q8_0_gemv"), x2, self.out_features, self.q, self.scales)
        return _kernel_output(out, x, None, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 blocks of 32"


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once (tied weights: once)."""
    storages: dict[int, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _is_lm_head(name: str) -> bool:
    return name == LM_HEAD_NAME or name.endswith("." + LM_HEAD_NAME)


def _feasible(scheme: LayerScheme, linear: nn.Linear) -> tuple[LayerScheme, str]:
    """The scheme the kernels can run for this shape, and why it differs from the one asked for."""
    if scheme is LayerScheme.INT4 and linear.out_features % INT4_OUT_MULTIPLE:
        return LayerScheme.INT8, (
            f"int4 kernel needs out_features % {INT4_OUT_MULTIPLE} == 0 "
            f"(got {linear.out_features}); int8 instead"
        )
    return scheme, ""


def build_layer(linear: nn.Linear, scheme: LayerScheme, group_size: int | None, kernels: bool) -> nn.Module:
    if scheme is LayerScheme.INT8:
        return Int8Linear.from_linear(linear)
    if scheme is LayerScheme.INT4 and group_size is not None:
        return Int4Linear.from_linear(linear, group_size, kernels=kernels)
    return linear


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    linear: nn.Linear
    scheme: LayerScheme
    group_size: int | None
    note: str


def _execute(model: nn.Module, plan: list[_Step], kernels: bool = True) -> tuple[LayerQuant, ...]:
    """Swap every planned layer; checks the whole plan first so a refusal leaves the model untouched."""
    for step in plan:
        if step.scheme is not LayerScheme.KEEP and step.linear.weight.device.type != "cpu":
            raise ValueError(
                f"layer `{step.name}` is on {step.linear.weight.device}; these int8/int4 kernels are "
                "CPU-only (quantize before moving the model, or use mode none)"
            )
        check_group_size(step.scheme, step.group_size)
    layers = []
    for step in plan:
        new = build_layer(step.linear, step.scheme, step.group_size, kernels)
        if new is not step.linear:
            model.set_submodule(step.name, new)
        layers.append(layer_record(step.name, step.linear, new, step.scheme, step.group_size, step.note))
    return tuple(layers)


def check_group_size(scheme: LayerScheme, group_size: int | None) -> None:
    if scheme is LayerScheme.INT4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")


def layer_record(
    name: str, linear: nn.Linear, new: nn.Module, scheme: LayerScheme, group_size: int | None, note: str
) -> LayerQuant:
    """The manifest's line for `linear` (the layer as built in the compute dtype) now that it is `new`."""
    return LayerQuant(
        name=name,
        scheme=scheme,
        in_features=linear.in_features,
        out_features=linear.out_features,
        group_size=group_size if scheme is LayerScheme.INT4 else None,
        padded_in_features=getattr(new, "padded_in_features", linear.in_features),
        bytes_before=_module_bytes(linear),
        bytes_after=_module_bytes(new),
        note=note,
    )


def layer_scheme(
    name: str, linear: nn.Linear, mode: QuantMode, head: LayerScheme, skip: tuple[str, ...] = ()
) -> tuple[LayerScheme, str]:
    """The scheme `quantize_model(mode, lm_head=head)` gives layer `name`, and why it differs if it does."""
    wanted = head if _is_lm_head(name) else MODE_SCHEME[mode]
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
        wanted = LayerScheme.KEEP
    return _feasible(wanted, linear)


# The scheme each mode gives the body's layers (the lm_head has its own).
MODE_SCHEME = {
    QuantMode.NONE: LayerScheme.KEEP,
    QuantMode.INT8: LayerScheme.INT8,
    QuantMode.INT4: LayerScheme.INT4,
}


def _parse(enum: type[QuantMode] | type[LayerScheme], value: str, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise ValueError(f"{what} `{value}` is unknown; use one of: {choices}") from None


def quantize_model(
    model: nn.Module,
    mode: str = "int8",
    *,
    group_size: int = 128,
    lm_head: str = "int8",
    skip: tuple[str, ...] = (),
    kernels: bool = True,
) -> QuantManifest:
    """Swap every `nn.Linear` in `model` (in place, on CPU) for its quantized form and record what was done.

    `mode` is "none" | "int8" | "int4" for the body; `lm_head` ("int8" | "int4" | "keep") is the scheme of the
    output layer (a Linear named `lm_head`), which int4 hurts most. `skip` holds fnmatch patterns of module
    names to keep. Layers the int4 kernel cannot take fall back to int8; the manifest says which and why.
    `kernels=False` keeps torch's int4 packing even where our C++ kernels built (to measure or compare).
    """
    quant_mode, head = parse_mode(mode, lm_head)
    plan = []
    for name, linear in model.named_modules():
        if isinstance(linear, nn.Linear):
            scheme, note = layer_scheme(name, linear, quant_mode, head, skip)
            plan.append(_Step(name, linear, scheme, group_size, note))
    bytes_before = model_bytes(model)
    layers = _execute(model, plan, kernels)
    return QuantManifest(
        mode=quant_mode,
        group_size=group_size if LayerScheme.INT4 in (MODE_SCHEME[quant_mode], head) else None,
        lm_head=head,
        layers=layers,
        bytes_before=bytes_before,
        bytes_after=model_bytes(model),
    )


def parse_mode(mode: str, lm_head: str) -> tuple[QuantMode, LayerScheme]:
    """The body's mode and the lm_head's scheme (keep when the mode is none), or a ValueError naming them."""
    quant_mode: QuantMode = _parse(QuantMode, mode, "quant mode")
    head: LayerScheme = _parse(LayerScheme, lm_head, "lm_head scheme")
    return quant_mode, LayerScheme.KEEP if quant_mode is QuantMode.NONE else head


def apply_manifest(model: nn.Module, manifest: QuantManifest) -> None:
    """Quantize `model` exactly as `manifest` records (e.g. when loading saved quantized weights)."""
    modules = dict(model.named_modules())
    plan = []
    for layer in manifest.layers:
        linear = modules.get(layer.name)
        if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != (
            layer.in_features,
            layer.out_features,
        ):
            raise ValueError(
                f"manifest layer `{layer.name}` ({layer.in_features}->{layer.out_features}) does not match "
                f"the model's {linear!r}; was the manifest written for another model?"
            )
        plan.append(_Step(layer.name, linear, layer.scheme, layer.group_size, layer.note))
    _execute(model, plan)


@dataclass(frozen=True, slots=True)
class LogitAgreement:
    """Teacher-forced agreement of a candidate's next-token distributions with a reference's."""

    positions: int
    top1: float  # fraction of positions where both argmaxes agree
    kl_mean: float  # mean over positions of KL(reference || candidate), nats
    kl_max: float


def compare_logits(reference: Tensor, candidate: Tensor) -> LogitAgreement:
    """Compare two (..., V) logit tensors over the same positions."""
    ref = reference.detach().float().reshape(-1, reference.shape[-1])
    cand = candidate.detach().float().reshape(-1, candidate.shape[-1])
    ref_logp, cand_logp = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1)  # (positions,)
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    return LogitAgreement(
        positions=ref.shape[0], top1=top1.item(), kl_mean=kl.mean().item(), kl_max=kl.max().item()
    )
