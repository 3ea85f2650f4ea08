"""Build the engine's model one layer at a time from a weight source, quantizing each layer as it arrives.

`build_model` then `quantize_model` hold the whole model in its compute dtype before the swap: 540 MB of
float32 for a 135M model that int4 brings to ~200. Here the model starts on the meta device and each tensor
is read from a `WeightSource` (a transformers state_dict, or a GGUF read tensor by tensor), converted to the
compute dtype, quantized if its layer is, and dropped: peak memory is the finished model plus one layer's
unquantized weights. A source holding a layer's int4 blocks in our layout (GGUF Q4_0/Q4_1, group 32) hands
them over as they are, with no float copy at all.
Invariant: from a state_dict (no int4 blocks), the result is bit for bit `build_model` + `quantize_model`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from backends.local.engine.config import ModelArgs
from backends.local.engine.model import BlockQuantEmbedding, Transformer
from backends.local.engine.quant import (
    MODE_SCHEME,
    BlockQuantLinear,
    Int4Linear,
    LayerQuant,
    LayerScheme,
    QuantManifest,
    build_layer,
    check_group_size,
    int_kernel,
    layer_record,
    layer_scheme,
    model_bytes,
    parse_mode,
)
from backends.local.engine.weights import STACKED, engine_name


class WeightSource(Protocol):
    """A model's tensors under transformers' names, handed out one at a time."""

    def names(self) -> Iterable[str]: ...

    def tensor(self, name: str) -> Tensor:
        """The tensor as stored, in a float dtype (the caller converts it)."""
        ...

    def int4_blocks(self, name: str, group_size: int) -> tuple[Tensor, Tensor] | None:
        """`Int4Linear.from_blocks`' (packed, scales_and_zeros) for weight `name`; None if not stored so."""
        ...

    def q8_0_rows(self, name: str) -> tuple[Tensor, Tensor] | None:
        """`BlockQuantEmbedding`'s (q (N, K) int8, scales (N, K / 32) float32) for `name`, where it is stored
        as Q8_0 (GGUF); None otherwise."""
        ...


@dataclass(frozen=True, slots=True)
class StateDictSource:
    """A loaded state_dict (a transformers model's) as a `WeightSource`: it holds no int4 blocks."""

    state: Mapping[str, Tensor]

    def names(self) -> Iterable[str]:
        return self.state.keys()

    def tensor(self, name: str) -> Tensor:
        return self.state[name]

    def int4_blocks(self, name: str, group_size: int) -> tuple[Tensor, Tensor] | None:
        return None

    def q8_0_rows(self, name: str) -> tuple[Tensor, Tensor] | None:
        return None


def _sources(args: ModelArgs, source: WeightSource) -> dict[str, str]:
    """Our unstacked parameter name -> the source's name, checked against the model's parameters."""
    ours: dict[str, str] = {}
    for name in source.names():
        engine = engine_name(name)
        if engine is not None and not (engine == "lm_head.weight" and args.tie_word_embeddings):
            ours[engine] = name
    with torch.device("meta"):
        expected = {part for key in Transformer(args).state_dict() for part in _unstacked(key)}
    if args.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if missing := sorted(expected - ours.keys()):
        raise ValueError(f"the state_dict lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}")
    if unexpected := sorted(ours.keys() - expected):
        raise ValueError(f"the state_dict has weights the model lacks: {', '.join(unexpected[:3])}")
    return ours


def _unstacked(key: str) -> list[str]:
    """`layers.3.attention.qkv_proj.weight` -> its q/k/v parts' names; other names as they are."""
    module, _, kind = key.rpartition(".")
    for stacked, parts in STACKED.items():
        if module.endswith("." + stacked):
            prefix = module.removesuffix(stacked)
            return [f"{prefix}{part}.{kind}" for part in parts]
    return [key]


def assemble_model(
    args: ModelArgs,
    source: WeightSource,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quant: str = "none",
    group_size: int = 32,
    lm_head: str = "int8",
    kernels: bool = True,
) -> tuple[Transformer, QuantManifest]:
    """Our model with `source`'s weights in `dtype` on `device`, its linear layers quantized per `quant`.

    Equal to `build_model_from_state_dict` + `quantize_model(mode=quant, group_size, lm_head)` (int4 blocks
    the source holds are taken as they are); the manifest records every layer, as `quantize_model`'s does."""
    mode, head = parse_mode(quant, lm_head)
    names = _sources(args, source)
    with torch.device("meta"):
        model = Transformer(args)
    model.init_rope_tables(device, dtype)
    bytes_before = _bytes_in(model, dtype, args.tie_word_embeddings)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    plan = []  # checked whole before any layer is built, as quantize_model does
    for name, meta in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        scheme, note = layer_scheme(name, meta, mode, head)
        check_group_size(scheme, group_size)
        if scheme is not LayerScheme.KEEP and torch.device(device).type != "cpu":
            raise ValueError(
                f"layer `{name}` is on {device}; these int8/int4 kernels are CPU-only "
                "(quantize before moving the model, or use mode none)"
            )
        plan.append((name, meta, scheme, note))
    # A float lm_head tied to the embedding shares its table; otherwise a Q8_0-stored embedding stays so.
    float_tied_head = args.tie_word_embeddings and any(
        n == "lm_head" and scheme is LayerScheme.KEEP for n, _, scheme, _ in plan
    )
    on_cpu = torch.device(device).type == "cpu"
    embed_rows = source.q8_0_rows(names["embed_tokens.weight"]) if on_cpu and not float_tied_head else None
    for key in list(model.state_dict()):
        module_name, _, kind = key.rpartition(".")
        if key == "embed_tokens.weight" and embed_rows is not None:
            model.embed_tokens = BlockQuantEmbedding(*embed_rows, dtype=dtype)
        elif module_name not in linears:
            value = source.tensor(names[key]).detach().to(device=device, dtype=dtype)
            setattr(model.get_submodule(module_name), kind, nn.Parameter(value, requires_grad=False))
    build = _Build(model, names, source, dtype, device, group_size, kernels)
    layers = []
    for name, meta, scheme, note in plan:
        record, new = build.layer(name, meta, scheme, note)
        if new is not meta:
            model.set_submodule(name, new)
        layers.append(record)
    if args.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.tie_lm_head()
    manifest = QuantManifest(
        mode=mode,
        group_size=group_size if LayerScheme.INT4 in (head, MODE_SCHEME[mode]) else None,
        lm_head=head,
        layers=tuple(layers),
        bytes_before=bytes_before,
        bytes_after=model_bytes(model),
    )
    return model.eval().requires_grad_(False), manifest


@dataclass(frozen=True, slots=True)
class _Build:
    model: Transformer
    names: dict[str, str]  # our unstacked name -> the source's
    source: WeightSource
    dtype: torch.dtype
    device: torch.device | str
    group_size: int
    kernels: bool

    def layer(
        self, name: str, meta: nn.Linear, scheme: LayerScheme, note: str
    ) -> tuple[LayerQuant, nn.Module]:
        """One linear layer, built from the source and quantized; its float weights die with this call."""
        tied = name == "lm_head" and "lm_head.weight" not in self.names
        embed = self.model.embed_tokens
        if (
            tied
            and scheme is LayerScheme.INT8
            and isinstance(embed, BlockQuantEmbedding)
            and self.kernels
            and int_kernel("q8_0_gemv") is not None
        ):
            # an int8 lm_head over the embedding's own Q8_0 blocks: no second copy of the table, tiled
            # where this build's kernel reads tiles (the embedding's lookups read them too)
            rows = int_kernel("q8_0_tile_rows")()
            if rows and embed.num_embeddings % rows == 0:
                embed.tile(int_kernel("q8_0_tile_pack"), rows)
            shared = BlockQuantLinear(embed.q, embed.scales)
            sized = nn.Linear(
                meta.in_features, meta.out_features, bias=False, device="meta", dtype=self.dtype
            )
            note = note or "int8 as stored: the embedding's Q8_0 blocks"
            return layer_record(name, sized, shared, scheme, self.group_size, note), shared
        weight_parts = [] if tied else [self.names[p] for p in _unstacked(f"{name}.weight")]
        bias_parts = [self.names[p] for p in _unstacked(f"{name}.bias")] if meta.bias is not None else []
        bias = self.cat(bias_parts) if bias_parts else None
        shape = (meta.in_features, meta.out_features)
        if scheme is LayerScheme.INT4 and weight_parts:
            blocks = [self.source.int4_blocks(part, self.group_size) for part in weight_parts]
            if all(b is not None for b in blocks):
                packed = torch.cat([b[0] for b in blocks if b is not None])
                scales = torch.cat([b[1] for b in blocks if b is not None])
                direct = Int4Linear.from_blocks(packed, scales, self.group_size, bias, kernels=self.kernels)
                sized = nn.Linear(*shape, bias=bias is not None, device="meta", dtype=self.dtype)
                note = note or "int4 as stored"
                return layer_record(name, sized, direct, scheme, self.group_size, note), direct
        linear = nn.Linear(*shape, bias=bias is not None, device="meta")
        weight = _embedding_table(self.model) if tied else self.cat(weight_parts)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        new = build_layer(linear, scheme, self.group_size, self.kernels)
        return layer_record(name, linear, new, scheme, self.group_size, note), new

    def cat(self, parts: list[str]) -> Tensor:
        """The parts in the compute dtype, rows concatenated (one part: converted only, sharing if it can)."""
        tensors = [self.source.tensor(p).detach().to(device=self.device, dtype=self.dtype) for p in parts]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _embedding_table(model: Transformer) -> Tensor:
    """The embedding as a float table in the compute dtype (a tied quantized lm_head is made from it)."""
    embed = model.embed_tokens
    return embed.dequantized() if isinstance(embed, BlockQuantEmbedding) else embed.weight


def _bytes_in(model: Transformer, dtype: torch.dtype, tied: bool) -> int:
    """What `model_bytes` counts for the unquantized model in `dtype` (params on meta, rope tables real)."""
    size = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for n, p in model.named_parameters() if not (tied and n == "lm_head.weight"))
    return params * size + sum(b.numel() * b.element_size() for b in model.buffers())
