"""Paged KV cache: `BlockAllocator` hands out fixed-size blocks, `KVCache` holds their keys and values.

`BlockAllocator` is pure Python and this module imports torch only inside `KVCache`, so the torch-free
scheduler can import the allocator. Blocks are ref-counted so sequences with an identical prompt prefix can
share them. When its last holder frees it, a block returns to the free list, or, if the caller marks it as
cached (automatic prefix caching), to an LRU pool of evictable blocks that `share` can take back and
`allocate` reuses, least recently freed first, once the free list is empty. When the pool is short,
`allocate` returns None (never raises, never over-commits): the scheduler queues or preempts.
Invariant: slot `block * block_size + offset` holds the K/V of logical position
`i * block_size + offset` of every sequence whose block table has `block` at index `i`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class BlockAllocator:
    """A free list of `num_blocks` block ids with a reference count per block, and an LRU pool of cached
    blocks nobody holds (K/V kept for reuse; `allocate` evicts them only when the free list is empty)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Popped from the end: low ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref count 0, content kept; oldest first

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` blocks (ref count 1), free ones first, then the least recently freed cached ones (the
        caller forgets what an evicted block held); None when fewer than `n` are available (nothing taken)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            return None
        blocks = []
        for _ in range(n):
            b = self._free.pop() if self._free else self._evictable.popitem(last=False)[0]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add a holder to blocks in use or cached (a sequence reusing another's prompt-prefix blocks)."""
        for b in blocks:
            if self._refs[b] == 0:
                if b not in self._evictable:
                    raise ValueError(f"block {b} is free; only allocated or cached blocks can be shared")
                del self._evictable[b]
            self._refs[b] += 1

    def free(self, blocks: Iterable[int], *, cached: Container[int] = ()) -> None:
        """Drop one holder from each block; a block nobody holds returns to the free list, or, when in
        `cached`, becomes evictable as the most recently freed (free a sequence's blocks tail first, so its
        leading blocks, which more requests share, are evicted last)."""
        for b in blocks:
            if self._refs[b] == 0:
                raise ValueError(f"block {b} is already free (double free)")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in cached:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def uncache(self, block: int) -> None:
        """An evictable block whose content is no longer indexed goes back to the free list."""
        if self._evictable.pop(block, 0) is None:
            self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._refs[block]


def cache_dtype_fits(kv_dtype: str, dtype: str, device: str) -> bool:
    """Whether a KV cache of `kv_dtype` serves a model computing in `dtype` on `device` (torch dtype names
    without the `torch.` prefix): its own dtype, or bfloat16 under float32 on CPU, which the C++ kernels read
    and the torch path widens."""
    return kv_dtype == dtype or (kv_dtype == "bfloat16" and dtype == "float32" and device == "cpu")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions."""
    return -(-num_tokens // block_size)


class KVCache:
    """Per-layer K and V tensors shaped (num_blocks, block_size, n_kv_heads, head_dim).

    All layers live in one zero-filled allocation: stale or never-written slots stay finite, so a masked
    slot can never turn an attention output into NaN (0 * NaN).
    """

    def __init__(
        self,
        *,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        import torch

        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.n_layers = n_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype or torch.float32
        # (layers, 2, blocks, block_size, kv_heads, head_dim); [l, 0] is layer l's K, [l, 1] its V.
        self._storage = torch.zeros(
            (n_layers, 2, num_blocks, block_size, n_kv_heads, head_dim), dtype=self.dtype, device=device
        )
        self.k: list[torch.Tensor] = [self._storage[i, 0] for i in range(n_layers)]
        self.v: list[torch.Tensor] = [self._storage[i, 1] for i in range(n_layers)]
        # Flat (slots, kv_heads, head_dim) views used for writes.
        self._k_flat = [k.view(-1, n_kv_heads, head_dim) for k in self.k]
        self._v_flat = [v.view(-1, n_kv_heads, head_dim) for v in self.v]

    @classmethod
    def from_budget(
        cls,
        *,
        kv_cache_mb: float,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """As many blocks as fit in `kv_cache_mb` MiB; raises when not even one block fits."""
        import torch

        dtype = dtype or torch.float32
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        block_bytes = 2 * n_layers * block_size * n_kv_heads * head_dim * elem_bytes
        num_blocks = int(kv_cache_mb * 1024 * 1024) // block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_mb={kv_cache_mb} holds no block; one block of {block_size} tokens needs "
                f"{block_bytes / 2**20:.3f} MiB"
            )
        return cls(
            n_layers=n_layers,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=dtype,
            device=device,
        )

    @property
    def device(self) -> torch.device:
        return self._storage.device

    @property
    def num_bytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new keys and values (T, n_kv_heads, head_dim) at flat slots (T,) of `layer`, rounded to the
        cache's dtype where the compute's differs (a bfloat16 cache under float32 compute)."""
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        self._k_flat[layer].index_copy_(0, slots, k)
        self._v_flat[layer].index_copy_(0, slots, v)

    def gather(
        self, layer: int, block_table: Sequence[int], length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `length` keys and values, each (length, n_kv_heads, head_dim), in order."""
        n = blocks_needed(length, self.block_size)
        if n > len(block_table):
            raise ValueError(f"{length} positions need {n} blocks; the block table has {len(block_table)}")
        import torch

        index = torch.tensor(block_table[:n], dtype=torch.long, device=self._storage.device)
        k = self.k[layer].index_select(0, index).flatten(0, 1)[:length]
        v = self.v[layer].index_select(0, index).flatten(0, 1)[:length]
        return k, v


def slot_ids(block_table: Sequence[int], start_pos: int, num_tokens: int, block_size: int) -> list[int]:
    """Flat cache slots of positions `start_pos .. start_pos + num_tokens - 1` of one sequence."""
    end = start_pos + num_tokens
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start_pos, end)]
