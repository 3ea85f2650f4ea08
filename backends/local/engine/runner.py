"""`ModelRunner.execute(plan)`: one forward pass for every chunk of a `StepPlan`, logits back in chunk order.

All chunks' tokens are packed into one (T,) batch: the projections and MLPs run once over all of them, and
attention runs per group (see `attention`): one padded call for all decode/draft chunks, one call per long
prefill chunk. The runner owns no scheduling state; the plan says which blocks hold which positions.
Output: (sum of num_logits, vocab) float32, the last `num_logits` positions of each chunk, in plan order.
`begin(plan)` runs the same step one layer at a time (`LayeredForward`), so the engine can suspend it.
"""

from __future__ import annotations

import torch

from backends.local.engine.attention import (
    MAX_BATCHED_Q,
    AttentionMetadata,
    SeqSpan,
    build_metadata,
    prefill_dtype,
    resolve_impl,
)
from backends.local.engine.kv_cache import KVCache, cache_dtype_fits
from backends.local.engine.model import Transformer
from backends.local.engine.types import SeqChunk, StepPlan

_Packed = tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]


class ModelRunner:
    """Executes steps of `model` against `kv_cache`; `attn_impl`: auto, sdpa, eager, flash or paged."""

    def __init__(
        self,
        model: Transformer,
        kv_cache: KVCache,
        *,
        attn_impl: str = "sdpa",
        max_batched_q: int = MAX_BATCHED_Q,
    ) -> None:
        dtype, device = model.dtype, model.device
        names = (str(kv_cache.dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
        if not cache_dtype_fits(*names, device.type) or kv_cache.device != device:
            raise ValueError(
                f"KV cache is {kv_cache.dtype} on {kv_cache.device} but the model is {dtype} on "
                f"{device}; build the cache on the model's device, in its dtype (or bfloat16 under a "
                "float32 model on CPU)"
            )
        if kv_cache.n_layers != model.args.n_layers:
            raise ValueError(f"KV cache has {kv_cache.n_layers} layers, the model {model.args.n_layers}")
        self.model = model
        self.kv_cache = kv_cache
        self.attn_impl = resolve_impl(attn_impl, device=device, dtype=dtype)
        self.prefill_dtype = prefill_dtype(self.attn_impl, dtype, kv_cache.dtype)
        self.device = device
        self.dtype = dtype
        self.block_size = kv_cache.block_size
        self.n_rep = model.args.n_heads // model.args.n_kv_heads
        self.max_batched_q = max_batched_q
        self.vocab_size = model.args.vocab_size
        self.max_seq_len = model.args.max_seq_len

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run one step; returns logits (sum of num_logits, vocab) float32 in chunk order."""
        step = self._pack(plan)
        if step is None:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        tokens, positions, meta, rows = step
        return self.model(tokens, positions, meta, self.kv_cache, rows).float()

    def begin(self, plan: StepPlan) -> LayeredForward | None:
        """The same step, run one layer per `advance()` so that the caller may run other steps in between;
        None where that is not offered (an empty plan; CUDA, whose kernels run asynchronously anyway)."""
        if self.device.type != "cpu":
            return None
        with torch.inference_mode():
            step = self._pack(plan)
            if step is None:
                return None
            tokens, positions, meta, rows = step
            x, cos, sin = self.model.embed(tokens, positions)
        return LayeredForward(self.model, self.kv_cache, x, cos, sin, meta, rows)

    def _pack(self, plan: StepPlan) -> _Packed | None:
        """The plan's chunks as one packed batch: tokens (T,), positions (T,), metadata, logits rows."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        spans: list[SeqSpan] = []
        bs = self.block_size
        for chunk in plan.chunks:
            self._check(chunk)
            row, n, start, table = len(tokens), len(chunk.token_ids), chunk.start_pos, chunk.block_table
            tokens += chunk.token_ids
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            logits_rows += range(row + n - chunk.num_logits, row + n)
            spans.append(SeqSpan(start_pos=start, num_tokens=n, block_table=table, prefill=chunk.prefill))
        if not tokens:
            return None
        device = self.device
        meta = build_metadata(
            spans,
            torch.tensor(slots, dtype=torch.long, device=device),
            block_size=bs,
            n_rep=self.n_rep,
            impl=self.attn_impl,
            max_batched_q=self.max_batched_q,
            dtype=self.dtype,
            long_dtype=self.prefill_dtype,
        )
        rows = (
            None
            if len(logits_rows) == len(tokens)
            else torch.tensor(logits_rows, dtype=torch.long, device=device)
        )
        packed = torch.tensor(tokens, dtype=torch.long, device=device)
        return packed, torch.tensor(positions, dtype=torch.long, device=device), meta, rows

    def _check(self, chunk: SeqChunk) -> None:
        n = len(chunk.token_ids)
        end = chunk.start_pos + n
        if n == 0 or not 0 <= chunk.num_logits <= n or chunk.start_pos < 0:
            raise ValueError(
                f"sequence {chunk.seq_id}: a chunk needs >= 1 token and 0 <= num_logits <= tokens "
                f"(got {n} tokens, num_logits={chunk.num_logits}, start_pos={chunk.start_pos})"
            )
        if end > len(chunk.block_table) * self.block_size:
            raise ValueError(
                f"sequence {chunk.seq_id}: positions up to {end - 1} need "
                f"{-(-end // self.block_size)} blocks; the block table has {len(chunk.block_table)}"
            )
        if end > self.max_seq_len:
            raise ValueError(
                f"sequence {chunk.seq_id}: {end} positions exceed the model's {self.max_seq_len}"
            )


class LayeredForward:
    """One step's forward pass, suspended between layers: the hidden states (T, dim), the tokens' RoPE
    tables and the attention metadata are kept; K/V of the layers already run are in the cache already.
    Other steps may run in between as long as they neither free nor write this step's blocks."""

    def __init__(
        self,
        model: Transformer,
        kv: KVCache,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        rows: torch.Tensor | None,
    ) -> None:
        self._model, self._kv, self._x, self._cos, self._sin = model, kv, x, cos, sin
        self._meta, self._rows = meta, rows
        self._next = 0  # the layer `advance` runs next
        self.num_layers = len(model.layers)

    def advance(self) -> bool:
        """Run the next layer; whether layers are left to run."""
        with torch.inference_mode():
            self._x = self._model.layers[self._next](self._x, self._cos, self._sin, self._meta, self._kv)
        self._next += 1
        return self._next < self.num_layers

    def logits(self) -> torch.Tensor:
        """(sum of num_logits, vocab) float32 in chunk order, as `ModelRunner.execute`; after every layer."""
        if self._next < self.num_layers:
            raise RuntimeError(f"logits wanted after {self._next} of {self.num_layers} layers")
        with torch.inference_mode():
            return self._model.head(self._x, self._rows).float()


def build_runner(
    model: Transformer,
    *,
    kv_cache_mb: float,
    block_size: int = 16,
    attn_impl: str = "sdpa",
    kv_dtype: torch.dtype | None = None,
) -> ModelRunner:
    """A runner over a fresh KV cache sized to `kv_cache_mb` MiB on the model's device, in `kv_dtype`
    (default: the model's dtype; bfloat16 under a float32 model on CPU halves it: `build.kv_cache_dtype`)."""
    cache = KVCache.from_budget(
        kv_cache_mb=kv_cache_mb,
        n_layers=model.args.n_layers,
        n_kv_heads=model.args.n_kv_heads,
        head_dim=model.args.head_dim,
        block_size=block_size,
        dtype=kv_dtype or model.dtype,
        device=model.device,
    )
    return ModelRunner(model, cache, attn_impl=attn_impl)
