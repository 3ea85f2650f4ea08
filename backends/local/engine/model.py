"""The decoder as a pure `nn.Module`: packed tokens, positions and the paged KV cache in, logits out.

Llama-family layout (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP) that reproduces
transformers' Llama/Qwen2/Mistral arithmetic op for op, including the rotate_half RoPE convention. Every
projection is a plain `nn.Linear` attribute (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head), so
quantization is a module swap at load time and never a branch here. q/k/v and gate/up are stored stacked
(`weights.py` concatenates transformers' separate matrices) so a decode step makes 4 projection calls per
layer instead of 7; each output element is still one row's dot product, as in the separate layers.
The model keeps no per-request state: the step's layout lives in `AttentionMetadata`, K/V in `KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from backends.local.engine.attention import AttentionMetadata, attend
from backends.local.engine.config import ModelArgs
from backends.local.engine.kv_cache import KVCache
from backends.local.engine.quant import untile_q8_0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # The same arithmetic in one C++ call (`kernels.kernel_op`), set by `use_cpu_kernels` on CPU models.
        self.kernel: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dim() == 2 and x.is_contiguous():
            return self.kernel(x, self.weight, self.eps)
        # As transformers: normalise in float32, round to the input dtype, then scale.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class BlockQuantEmbedding(nn.Module):
    """A token embedding kept as a GGUF stores it in Q8_0: int8 values with one float scale per block of
    `BLOCK` columns of a row (SmolLM2: 32 MB where a float32 table is 113 MB). A lookup widens only the rows
    asked for, with the arithmetic of the GGUF's dequantization (q x d in float32, then the compute dtype),
    so it gives bit for bit the rows a float table built from the same file holds. CPU only, built by
    `assemble_model` in the compute dtype (never cast afterwards: `.to(dtype)` would round the scales)."""

    BLOCK = 32

    q: torch.Tensor
    scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        if q.dim() != 2 or q.dtype != torch.int8 or q.shape[1] % self.BLOCK:
            raise ValueError(f"Q8_0 rows must be (vocab, dim) int8 with dim a multiple of {self.BLOCK}")
        if scales.shape != (q.shape[0], q.shape[1] // self.BLOCK):
            raise ValueError(f"Q8_0 scales must be (vocab, dim / {self.BLOCK}), got {tuple(scales.shape)}")
        self.num_embeddings, self.embedding_dim = q.shape
        self.dtype = dtype
        self.register_buffer("q", q)
        self.register_buffer("scales", scales.float())

    def tile(self, pack: Callable[..., tuple[torch.Tensor, torch.Tensor]], rows: int) -> None:
        """Store the table as the `q8_0_gemv` kernel's tiles of `rows` rows (`q8_0_tile_pack`: the same values
        reordered, as unsigned bytes), for a tied lm_head that reads it; lookups read the tiles."""
        self.q, self.scales = pack(self.q, self.scales, rows)
        self.tile_rows = rows

    tile_rows = 0  # 0: q (vocab, dim) int8 rows and scales (vocab, dim / BLOCK)

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `index` of the table as (int8 values (n, dim), float32 scales (n, dim / BLOCK))."""
        if not self.tile_rows:
            return self.q.index_select(0, index), self.scales.index_select(0, index)
        return untile_q8_0(self.q, self.scales, index)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        return self._rows(*self._gather(flat)).reshape(*tokens.shape, self.embedding_dim)

    def _rows(self, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        out = (q.reshape(n, -1, self.BLOCK).float() * scales.unsqueeze(-1)).reshape(n, self.embedding_dim)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def dequantized(self, rows_at_a_time: int = 4096) -> torch.Tensor:
        """The whole table in the compute dtype (a tied float lm_head's weight), built in row chunks."""
        parts = [
            self._rows(*self._gather(torch.arange(i, min(i + rows_at_a_time, self.num_embeddings))))
            for i in range(0, self.num_embeddings, rows_at_a_time)
        ]
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0 blocks of {self.BLOCK}, out {self.dtype}"


def use_cpu_kernels(
    model: Transformer, *, norm: Callable[..., torch.Tensor], rope: Callable[..., torch.Tensor]
) -> int:
    """Give a float32/bfloat16 CPU model's norms and attention layers the C++ kernels; how many modules."""
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernel = norm
            count += 1
        elif isinstance(module, Attention):
            module.rope_kernel = rope
            count += 1
    return count


def rope_inv_freq(args: ModelArgs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) float32, as transformers' default / linear / llama3 RoPE init."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(args: ModelArgs, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, each (max_seq_len, head_dim / 2) float32.

    transformers builds cat(freqs, freqs) so both halves of its tables are equal; we keep one half.
    """
    if torch.device(device).type == "meta":  # shapes only: torch's meta arange would import sympy (~30 MB)
        shape = (args.max_seq_len, args.head_dim // 2)
        return torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
    positions = torch.arange(args.max_seq_len, device=device).float()
    freqs = positions[:, None] * rope_inv_freq(args, device)[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) with cos/sin (T, D/2): x * cos + rotate_half(x) * sin, in the same rounding order."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.head_dim**-0.5
        # q, k and v stacked along the output axis: one matmul (or one quantized kernel call) for all three.
        qkv_features = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.qkv_proj = nn.Linear(args.dim, qkv_features, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        # RoPE + the K/V write in one C++ call (`kernels.kernel_op`), set by `use_cpu_kernels`.
        self.rope_kernel: Callable[..., torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata, kv: KVCache
    ) -> torch.Tensor:
        n_q, n_qk = self.n_heads, self.n_heads + self.n_kv_heads
        qkv = self.qkv_proj(x).view(x.shape[0], n_qk + self.n_kv_heads, self.head_dim)
        k_cache, v_cache = kv.k[self.layer_idx], kv.v[self.layer_idx]
        if self.rope_kernel is not None:
            q = self.rope_kernel(qkv, cos, sin, attn.slots, k_cache, v_cache, n_q)
        else:
            qk = apply_rope(qkv[:, :n_qk], cos, sin)  # q and k heads rotated in one pass
            kv.write(self.layer_idx, qk[:, n_q:], qkv[:, n_qk:], attn.slots)
            q = qk[:, :n_q]
        return self.o_proj(attend(q, k_cache, v_cache, attn, scale=self.scale))  # attend: (T, H*D)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # gate and up stacked along the output axis (gate first): one matmul for both.
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.attention = Attention(args, layer_idx)
        self.mlp_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.mlp = MLP(args)
        # The same layer as one closure over its kernels, for decode steps (`fused.fuse_decode`); it returns
        # None for a step it does not serve.
        self.decode: Callable[..., torch.Tensor | None] | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata, kv: KVCache
    ) -> torch.Tensor:
        if self.decode is not None and (out := self.decode(x, cos, sin, attn, kv)) is not None:
            return out
        x = x + self.attention(self.attention_norm(x), cos, sin, attn, kv)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """`forward(tokens (T,), positions (T,), attn, kv, logits_rows=None) -> logits (N, vocab)`."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # Weights always come from a checkpoint (`weights.py`, `assemble.py` build this on the meta device):
        # no initializer runs. nn.Embedding's own (normal_) on a meta tensor goes through torch._refs, whose
        # first call imports torch._dynamo and sympy: ~70 MB resident for the process's whole life.
        empty = torch.empty(args.vocab_size, args.dim)
        self.embed_tokens: nn.Embedding | BlockQuantEmbedding = nn.Embedding(
            args.vocab_size, args.dim, _weight=empty
        )
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tie_lm_head()
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.init_rope_tables()

    def init_rope_tables(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """(Re)build the RoPE tables: computed in float32, stored in the compute dtype (as transformers)."""
        cos, sin = rope_tables(self.args, device or self.device)
        dtype = dtype or self.dtype
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)

    def tie_lm_head(self) -> None:
        """A float lm_head shares the embedding's float table (a quantized embedding has none to share)."""
        if not isinstance(self.embed_tokens, nn.Embedding):
            raise TypeError("a float lm_head can be tied to a float embedding table only")
        self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the final norm's weight holds it; the embedding may be stored quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv: KVCache,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of `logits_rows` (all rows when None) in the model dtype; writes every token's K/V."""
        x, cos, sin = self.embed(tokens, positions)
        for layer in self.layers:
            x = layer(x, cos, sin, attn, kv)
        return self.head(x, logits_rows)

    # `forward` in three parts, for a caller that runs the layers one at a time (runner.LayeredForward).

    def embed(
        self, tokens: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states (T, dim) and the tokens' RoPE cos/sin (T, D/2): what every layer takes."""
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        return self.embed_tokens(tokens), cos, sin

    def head(self, x: torch.Tensor, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of `logits_rows` of the last layer's hidden states (all rows when None)."""
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
        return self.lm_head(self.norm(x))
