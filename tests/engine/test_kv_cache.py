"""KV cache: block allocation with ref counts, writes landing in the right slots, multi-block read-back.

Also checks, end to end, that the keys and values the runner caches for a prompt equal transformers'
own KV cache for the same prompt, which pins down the slot arithmetic and the post-RoPE key layout.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from backends.local.engine.kv_cache import BlockAllocator, KVCache, blocks_needed, slot_ids
from backends.local.engine.types import SeqChunk, StepPlan
from tests.support.tiny_models import tiny_hf_model, tiny_runner

torch = pytest.importorskip("torch")


def test_allocate_and_free_return_blocks() -> None:
    allocator = BlockAllocator(8)
    first = allocator.allocate(3)
    second = allocator.allocate(5)
    assert first is not None and second is not None
    assert len(set(first) | set(second)) == 8 and allocator.num_free == 0
    assert all(allocator.ref_count(b) == 1 for b in first + second)
    allocator.free(first)
    assert allocator.num_free == 3 and all(allocator.ref_count(b) == 0 for b in first)
    again = allocator.allocate(3)
    assert again is not None and sorted(again) == sorted(first)


def test_allocate_when_short_returns_none_and_takes_nothing() -> None:
    allocator = BlockAllocator(4)
    assert allocator.allocate(3) is not None
    assert not allocator.can_allocate(2)
    assert allocator.allocate(2) is None
    assert allocator.num_free == 1
    assert allocator.allocate(0) == []


def test_shared_blocks_are_freed_by_their_last_holder() -> None:
    allocator = BlockAllocator(4)
    prefix = allocator.allocate(2)
    assert prefix is not None
    allocator.share(prefix)  # a second sequence with the same prompt prefix
    assert [allocator.ref_count(b) for b in prefix] == [2, 2]
    allocator.free(prefix)
    assert allocator.num_free == 2 and [allocator.ref_count(b) for b in prefix] == [1, 1]
    allocator.free(prefix)
    assert allocator.num_free == 4


def test_double_free_and_sharing_a_free_block_are_errors() -> None:
    allocator = BlockAllocator(2)
    blocks = allocator.allocate(1)
    assert blocks is not None
    allocator.free(blocks)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(blocks)
    with pytest.raises(ValueError, match="is free"):
        allocator.share(blocks)


def test_blocks_needed() -> None:
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def _cache(num_blocks: int = 10, block_size: int = 4) -> KVCache:
    return KVCache(n_layers=2, n_kv_heads=2, head_dim=3, num_blocks=num_blocks, block_size=block_size)


def test_writes_land_in_their_slots() -> None:
    cache = _cache()
    table = [7, 2, 5]
    slots = slot_ids(table, start_pos=3, num_tokens=3, block_size=4)  # positions 3, 4, 5
    assert slots == [7 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1]
    k = torch.arange(3 * 2 * 3, dtype=torch.float32).view(3, 2, 3)
    cache.write(1, k, -k, torch.tensor(slots))
    assert torch.equal(cache.k[1][7, 3], k[0]) and torch.equal(cache.k[1][2, 0], k[1])
    assert torch.equal(cache.v[1][2, 1], -k[2])
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    assert int((cache.k[1] != 0).any(-1).any(-1).sum()) == 3  # nothing else written


def test_sequence_spanning_blocks_reads_back_exactly() -> None:
    cache = _cache()
    table = [9, 0, 4, 6]  # scattered on purpose
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(14, 2, 3, generator=g), torch.randn(14, 2, 3, generator=g)
    # Written in two pieces, as a chunked prefill would.
    cache.write(0, k[:6], v[:6], torch.tensor(slot_ids(table, 0, 6, 4)))
    cache.write(0, k[6:], v[6:], torch.tensor(slot_ids(table, 6, 8, 4)))
    got_k, got_v = cache.gather(0, table, 14)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(ValueError, match="need 5 blocks"):
        cache.gather(0, table, 17)


def test_budget_sizes_the_pool() -> None:
    # One block: 2 (K, V) * 2 layers * 16 tokens * 2 heads * 8 dims * 4 bytes = 4096 bytes.
    cache = KVCache.from_budget(kv_cache_mb=1, n_layers=2, n_kv_heads=2, head_dim=8, block_size=16)
    assert cache.num_blocks == 256 and cache.num_bytes == 2**20
    half = KVCache.from_budget(
        kv_cache_mb=1, n_layers=2, n_kv_heads=2, head_dim=8, block_size=16, dtype=torch.bfloat16
    )
    assert half.num_blocks == 512
    with pytest.raises(ValueError, match="holds no block"):
        KVCache.from_budget(kv_cache_mb=0.001, n_layers=2, n_kv_heads=2, head_dim=8)


def test_runner_caches_what_transformers_caches() -> None:
    hf = tiny_hf_model("qwen2")
    runner = tiny_runner(hf, block_size=4)
    prompt = list(range(10, 21))
    table = (5, 1, 8)
    runner.execute(StepPlan((SeqChunk(0, tuple(prompt[:6]), 0, table, 0),)))
    runner.execute(StepPlan((SeqChunk(0, tuple(prompt[6:]), 6, table, 1),)))
    with torch.no_grad():
        past = hf(torch.tensor([prompt]), use_cache=True).past_key_values
    for layer in range(hf.config.num_hidden_layers):
        k, v = runner.kv_cache.gather(layer, table, len(prompt))  # (L, Hkv, D)
        expected_k = past.layers[layer].keys[0].transpose(0, 1)  # (Hkv, L, D) -> (L, Hkv, D)
        expected_v = past.layers[layer].values[0].transpose(0, 1)
        assert (k - expected_k).abs().max() < 1e-5 and (v - expected_v).abs().max() < 1e-5


def test_runner_rejects_a_chunk_its_blocks_cannot_hold() -> None:
    runner = tiny_runner(tiny_hf_model("llama"), block_size=4)
    with pytest.raises(ValueError, match="need 2 blocks"):
        runner.execute(StepPlan((SeqChunk(0, (1, 2, 3, 4, 5), 0, (0,), 1),)))


def test_allocator_imports_without_torch() -> None:
    # The scheduler never imports torch; it takes BlockAllocator from this module.
    code = (
        "import sys; from backends.local.engine.kv_cache import BlockAllocator; "
        "assert 'torch' not in sys.modules, 'kv_cache imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
