"""Tiny random-weight Llama / Qwen2 / Mistral models built from transformers configs, our runner over them,
and a toy driver that plays a scheduler's part (arrivals, chunked prefill, decode) against a `ModelRunner`.

Tiny models use a large init range so logits are well separated (greedy ties would make token-for-token
comparisons meaningless). Import only where torch and transformers are installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from backends.local.engine.kernels import attach_cpu_kernels
from backends.local.engine.kv_cache import BlockAllocator, blocks_needed
from backends.local.engine.runner import ModelRunner, build_runner
from backends.local.engine.types import SeqChunk, StepPlan
from backends.local.engine.weights import build_model

TINY_KINDS = ("llama", "qwen2", "llama3_rope", "mistral")


def tiny_config(kind: str) -> Any:
    """hidden 64, 2 layers, 4 heads over 2 KV heads (GQA), vocab 256; no eos so generation runs to length."""
    common: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if kind == "llama":  # tied embeddings, like SmolLM2
        return transformers.LlamaConfig(tie_word_embeddings=True, rms_norm_eps=1e-5, **common)
    if kind == "qwen2":  # q/k/v bias, untied lm_head, another rope theta
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
        return transformers.Qwen2Config(tie_word_embeddings=False, **common)
    if kind == "llama3_rope":
        common["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return transformers.LlamaConfig(tie_word_embeddings=False, **common)
    if kind == "mistral":  # exact while a context fits the window, so the engine caps sequences at 64
        return transformers.MistralConfig(tie_word_embeddings=False, sliding_window=64, **common)
    raise ValueError(f"unknown tiny model kind `{kind}`; known: {', '.join(TINY_KINDS)}")


def tiny_hf_model(kind: str, seed: int = 0) -> Any:
    """A transformers causal LM with random weights, float32, eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_runner(
    hf_model: Any,
    *,
    dtype: Any = None,
    attn_impl: str = "auto",  # the production default: the paged kernel on CPU
    block_size: int = 4,
    kv_cache_mb: float = 2.0,
    device: str = "cpu",
    kernels: bool = True,
    kv_dtype: Any = None,  # the cache's dtype (default: the model's)
) -> ModelRunner:
    """Our model from `hf_model` (which stays usable as the reference) behind a runner.

    With `kernels`, the C++ kernels `build_engine_parts` attaches on CPU are attached here too (RMSNorm,
    RoPE + KV write, the bf16 GEMV for bf16 models), so the equivalence tests hold the production path.
    """
    model = build_model(hf_model, dtype=dtype or torch.float32, device=device, release_source=False)
    if kernels and device == "cpu":
        attach_cpu_kernels(model)
    return build_runner(
        model, kv_cache_mb=kv_cache_mb, block_size=block_size, attn_impl=attn_impl, kv_dtype=kv_dtype
    )


@dataclass(slots=True)
class ToySeq:
    """One sequence the toy driver feeds: `tokens` so far, of which `prompt_len` are prompt."""

    seq_id: int
    tokens: list[int]
    prompt_len: int
    arrival_step: int
    chunk_size: int
    max_len: int
    done_pos: int = 0  # positions already in the cache
    blocks: list[int] = field(default_factory=list)


StepCallback = Callable[[ToySeq, SeqChunk, "torch.Tensor"], None]


def drive(
    runner: ModelRunner,
    seqs: Sequence[ToySeq],
    on_logits: StepCallback,
    *,
    all_logits: bool = False,
) -> Iterator[StepPlan]:
    """Feed every sequence all its tokens, interleaving arrivals, chunked prefill and decode in one batch.

    `on_logits(seq, chunk, logits)` sees each chunk's logits and may append the next token to `seq.tokens`
    (greedy decoding, up to `max_len`); with teacher forcing the tokens are all there already. A sequence
    ends once every token it has is in the cache. `all_logits` asks for every
    position's logits (prefill chunks included), else only the last prompt token's and decode tokens'.
    Blocks come from a `BlockAllocator` one at a time, so interleaved sequences get scattered block ids.
    """
    allocator = BlockAllocator(runner.kv_cache.num_blocks)
    step, live = 0, list(seqs)
    while live:
        chunks: list[tuple[ToySeq, SeqChunk]] = []
        for seq in live:
            if seq.arrival_step > step:
                continue
            prefill_left = seq.prompt_len - seq.done_pos
            n = min(seq.chunk_size, prefill_left) if prefill_left > 0 else 1
            end = seq.done_pos + n
            more = allocator.allocate(blocks_needed(end, runner.block_size) - len(seq.blocks))
            assert more is not None, "toy driver ran out of KV blocks; raise kv_cache_mb"
            seq.blocks += more
            last_prefill = prefill_left > 0 and end == seq.prompt_len
            wanted = n if all_logits else (1 if prefill_left <= 0 or last_prefill else 0)
            tokens, prefill = tuple(seq.tokens[seq.done_pos : end]), prefill_left > 0
            chunk = SeqChunk(seq.seq_id, tokens, seq.done_pos, tuple(seq.blocks), wanted, prefill=prefill)
            chunks.append((seq, chunk))
        plan = StepPlan(tuple(c for _, c in chunks))
        logits = runner.execute(plan)
        yield plan
        row = 0
        for seq, chunk in chunks:
            seq.done_pos += len(chunk.token_ids)
            on_logits(seq, chunk, logits[row : row + chunk.num_logits])
            row += chunk.num_logits
        assert row == logits.shape[0]
        for seq in [s for s in live if s.done_pos >= len(s.tokens)]:
            allocator.free(seq.blocks)
            live.remove(seq)
        step += 1
    assert allocator.num_free == allocator.num_blocks
