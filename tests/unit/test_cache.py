"""Response cache core: key normalisation, cache rules, Cache-Control, entries and replay, MemoryCache."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from backends.base import ChatResult, StreamChunk, Usage
from gateway.cache.keys import cache_key as key_of
from gateway.cache.keys import cache_namespace, cacheable
from gateway.cache.store import (
    CacheDirectives,
    CachedResponse,
    MemoryCache,
    RedisCache,
    decode_entry,
    directives,
    encode_entry,
    entry_from_chunks,
    entry_from_result,
    merge_deltas,
)
from gateway.translate.openai_chat import ChatCompletionBody, chat_request, parse_chat_body
from tests.support.timing import CUT_OFF_S

NS = cache_namespace("research")
BASE: dict[str, Any] = {
    "model": "chat-small",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "temperature": 0,
}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def body(**changes: Any) -> ChatCompletionBody:
    raw = {**BASE, **changes}
    return parse_chat_body(orjson.dumps({k: v for k, v in raw.items() if v is not ...}))


def cache_key(namespace: str, b: ChatCompletionBody) -> str:
    """The key of a chat body, as the pipeline computes it from the translated request."""
    return key_of(namespace, chat_request(b, "r", 1.0), b.switchboard)


def key(**changes: Any) -> str:
    return cache_key(NS, body(**changes))


# ---- keys ------------------------------------------------------------------------------------------------


def test_key_is_namespaced_sha256() -> None:
    k = key()
    prefix, _, digest = k.rpartition(":")
    assert prefix == "team:research" and len(digest) == 64 and int(digest, 16) >= 0
    assert key() == k


def test_key_is_computed_from_what_backends_are_sent() -> None:
    # Keys come from the internal request, so a neutral field that no backend is sent cannot split them;
    # one that a backend honours some day joins `ChatRequest`, and the key, with it.
    assert key(presence_penalty=0) == key()


def test_key_ignores_dict_order_and_none_fields() -> None:
    reordered = parse_chat_body(
        b'{"temperature": 0, "messages": [{"content": "Be brief.", "role": "system"},'
        b' {"name": null, "content": "Hi", "role": "user"}],'
        b' "model": "chat-small", "seed": null, "stop": null}'
    )
    assert cache_key(NS, reordered) == key()


def test_key_normalises_equivalent_forms() -> None:
    assert key(max_tokens=50) == key(max_completion_tokens=50)
    assert key(stop="END") == key(stop=["END"])
    assert key(stop=["a", "b"]) == key(stop=["b", "a", "a"])
    assert key(stop=[]) == key()
    assert key(temperature=0) == key(temperature=0.0)
    assert key(switchboard={"only": ["gpu0", "cloud"]}) == key(switchboard={"only": ["cloud", "gpu0"]})


@pytest.mark.parametrize(
    "change",
    [
        {"model": "chat-large"},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi", "name": "x"},
            ]
        },
        {"max_tokens": 10},
        {"max_completion_tokens": 10},
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"stop": "END"},
        {"seed": 7},
        {"tools": [TOOL]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"switchboard": {"only": ["gpu0"]}},
        {"switchboard": {"ignore": ["cloud"]}},
    ],
    ids=lambda c: next(iter(c)) + "=" + str(next(iter(c.values())))[:30],
)
def test_every_output_affecting_field_changes_the_key(change: dict[str, Any]) -> None:
    assert key(**change) != key()


@pytest.mark.parametrize(
    "change",
    [
        {"user": "alice"},
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"n": 1},
        {"switchboard": {"sort": "cost", "max_latency_ms": 100, "allow_fallbacks": False}},
        {"switchboard": {"order": ["gpu0"], "max_price": {"prompt": 1}}},
    ],
    ids=str,
)
def test_fields_that_do_not_change_the_output_leave_the_key(change: dict[str, Any]) -> None:
    assert key(**change) == key()


def test_raw_prompt_and_passthrough_headers_change_the_key() -> None:
    """A legacy completion differs from its chat translation, and an anthropic-beta may change the answer."""
    import dataclasses

    call = chat_request(body(), "req-1", 60.0)
    base = key_of(NS, call)
    assert key_of(NS, dataclasses.replace(call, prompt="Hi")) != base
    beta = dataclasses.replace(call, passthrough_headers=(("anthropic-beta", "prompt-caching-2024-07-31"),))
    assert key_of(NS, beta) != base
    assert key_of(NS, dataclasses.replace(call, passthrough_headers=())) == base


def test_teams_get_different_keys_and_shared_namespaces_meet() -> None:
    b = body()
    assert cache_key(cache_namespace("research"), b) != cache_key(cache_namespace("sales"), b)
    shared_a = cache_key(cache_namespace("research", shared_as="org"), b)
    shared_b = cache_key(cache_namespace("sales", shared_as="org"), b)
    assert shared_a == shared_b and shared_a.startswith("shared:org:")


# ---- rules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "seed", "opt_in", "expected"),
    [
        (0, ..., False, True),
        (0.0, ..., False, True),
        (0.7, 42, False, True),
        (..., 0, False, True),
        (0.7, ..., False, False),
        (..., ..., False, False),  # unset temperature means the backend default, not 0
        (1.0, ..., True, True),
    ],
)
def test_cacheable(temperature: Any, seed: Any, opt_in: bool, expected: bool) -> None:
    assert cacheable(body(temperature=temperature, seed=seed), opt_in=opt_in) is expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, CacheDirectives()),
        ("", CacheDirectives()),
        ("no-cache", CacheDirectives(no_cache=True)),
        ("No-Store", CacheDirectives(no_store=True)),
        ("no-cache, no-store", CacheDirectives(no_cache=True, no_store=True)),
        (" no-store ,private", CacheDirectives(no_store=True)),
        ("max-age=0", CacheDirectives(no_cache=True)),
        ("max-age=60", CacheDirectives()),
        ("no-cachex, store", CacheDirectives()),
    ],
)
def test_cache_control_directives(header: str | None, expected: CacheDirectives) -> None:
    assert directives(header) == expected


# ---- entries ---------------------------------------------------------------------------------------------

USAGE = Usage(prompt_tokens=12, completion_tokens=5)
RESULT = ChatResult({"role": "assistant", "content": "Hello there!"}, "stop", USAGE, "smollm2-135m")
STREAM = [
    StreamChunk(delta={"role": "assistant"}, served_model="smollm2-135m"),
    StreamChunk(delta={"content": "Hello"}),
    StreamChunk(delta={"content": " there"}),
    StreamChunk(delta={"content": "!"}),
    StreamChunk(finish_reason="stop"),
    StreamChunk(usage=USAGE),
]
TOOL_STREAM = [
    StreamChunk(delta={"role": "assistant"}),
    StreamChunk(
        delta={"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}]}
    ),
    StreamChunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
    StreamChunk(
        delta={"tool_calls": [{"index": 1, "id": "c2", "type": "function", "function": {"name": "g"}}]}
    ),
    StreamChunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
    StreamChunk(finish_reason="tool_calls", usage=USAGE, served_model="m"),
]


def replayed_text(entry: CachedResponse) -> str:
    return "".join(c.delta.get("content", "") for c in entry.replay())


def test_entry_round_trips_through_bytes() -> None:
    entry = entry_from_result(RESULT, backend="gpu0", cost_micro_usd=1234)
    back = decode_entry(encode_entry(entry))
    assert back == entry
    assert back is not None and back.to_result() == RESULT


def test_stream_entry_replays_the_same_deltas() -> None:
    entry = entry_from_chunks(STREAM, backend="gpu0", cost_micro_usd=99)
    assert entry is not None
    back = decode_entry(encode_entry(entry))
    assert back == entry
    chunks = tuple(back.replay())
    assert [dict(c.delta) for c in chunks[:-1]] == [dict(c.delta) for c in STREAM if c.delta]
    assert chunks[-1] == StreamChunk(finish_reason="stop", usage=USAGE, served_model="smollm2-135m")
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])


def test_stream_and_whole_entries_serve_each_other_with_identical_content() -> None:
    from_stream = entry_from_chunks(STREAM, backend="gpu0", cost_micro_usd=99)
    from_whole = entry_from_result(RESULT, backend="gpu0", cost_micro_usd=99)
    assert from_stream is not None
    assert from_stream.to_result() == RESULT
    assert replayed_text(from_whole) == replayed_text(from_stream) == "Hello there!"
    whole_chunks = tuple(from_whole.replay())
    assert merge_deltas([c.delta for c in whole_chunks]) == dict(RESULT.message)
    assert whole_chunks[-1].finish_reason == "stop" and whole_chunks[-1].usage == USAGE


def test_tool_call_stream_merges_like_a_whole_answer() -> None:
    entry = entry_from_chunks(TOOL_STREAM, backend="cloud", cost_micro_usd=1)
    assert entry is not None
    assert entry.message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}},
        ],
    }
    whole = entry_from_result(entry.to_result(), backend="cloud", cost_micro_usd=1)
    assert merge_deltas([c.delta for c in whole.replay()]) == entry.message


def test_unfinished_stream_is_not_an_entry() -> None:
    assert entry_from_chunks(STREAM[:3], backend="gpu0", cost_micro_usd=0) is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'{"v": 999}', b'{"v": 1, "message": {}}', b'{"v":1,"usage":"x"}'],
)
def test_unreadable_entries_are_misses(raw: bytes) -> None:
    assert decode_entry(raw) is None


# ---- MemoryCache -----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


ENTRY = entry_from_result(RESULT, backend="gpu0", cost_micro_usd=7)
ENTRY_BYTES = len(encode_entry(ENTRY))


async def test_memory_cache_ttl_with_injected_clock() -> None:
    clock = FakeClock()
    cache = MemoryCache(max_entries=10, max_bytes=1 << 20, clock=clock)
    await cache.put("k", ENTRY, ttl_s=30)
    assert await cache.get("k") == ENTRY
    clock.now_s += 29.9
    assert await cache.get("k") == ENTRY
    clock.now_s += 0.1
    assert await cache.get("k") is None
    assert len(cache) == 0 and cache.bytes_used == 0


async def test_memory_cache_evicts_least_recently_used() -> None:
    cache = MemoryCache(max_entries=2, max_bytes=1 << 20, clock=FakeClock())
    await cache.put("a", ENTRY, 60)
    await cache.put("b", ENTRY, 60)
    assert await cache.get("a") is not None  # "b" is now the least recently used
    await cache.put("c", ENTRY, 60)
    assert await cache.get("b") is None
    assert await cache.get("a") is not None and await cache.get("c") is not None


async def test_memory_cache_byte_budget_and_entry_cap() -> None:
    cache = MemoryCache(max_entries=100, max_bytes=2 * ENTRY_BYTES, clock=FakeClock())
    for k in "abc":
        await cache.put(k, ENTRY, 60)
    assert len(cache) == 2 and cache.bytes_used == 2 * ENTRY_BYTES and await cache.get("a") is None
    await cache.put("b", ENTRY, 60)  # replacing does not double count
    assert cache.bytes_used == 2 * ENTRY_BYTES
    small = MemoryCache(
        max_entries=100, max_bytes=1 << 20, max_entry_bytes=ENTRY_BYTES - 1, clock=FakeClock()
    )
    await small.put("big", ENTRY, 60)
    assert await small.get("big") is None and small.bytes_used == 0


async def test_memory_cache_holds_about_the_bytes_it_counts() -> None:
    """What a full cache really keeps (traced by tracemalloc) is near `bytes_used`, not orjson's 4 KiB
    output buffer per entry: with that, 400 entries of ~200 bytes held 1.7 MB and max_bytes meant little."""
    n = 400
    cache = MemoryCache(max_entries=n, max_bytes=1 << 24, clock=FakeClock())
    keys = [f"k{i:04d}" for i in range(n)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in keys:
            await cache.put(k, ENTRY, 60)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == n and cache.bytes_used == n * ENTRY_BYTES
    # The (expiry, bytes) tuple, the float, the dict slot and its resizes, the bytes header: ~200 bytes
    # measured; 400 leaves room for allocator noise and still fails the 4 KiB-per-entry bug by 10x.
    per_entry_overhead = 400
    assert held < cache.bytes_used + n * per_entry_overhead, (held, cache.bytes_used)


async def test_memory_cache_skips_non_positive_ttl_and_hands_out_copies() -> None:
    cache = MemoryCache(max_entries=10, max_bytes=1 << 20, clock=FakeClock())
    await cache.put("zero", ENTRY, 0)
    assert await cache.get("zero") is None
    await cache.put("k", ENTRY, 60)
    first = await cache.get("k")
    assert first is not None
    first.message["content"] = "mutated"  # type: ignore[index]
    assert await cache.get("k") == ENTRY


# ---- RedisCache failure handling, on a fake client (the real server is in tests/integration) -------------


class FakeRedis:
    """Stands in for `redis.asyncio.Redis`: fails while `error` is set, hangs while `hang` is set."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls = 0
        self.error: Exception | None = None
        self.hang = False

    async def _io(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(10)
        if self.error is not None:
            raise self.error

    async def get(self, name: str) -> bytes | None:
        await self._io()
        return self.data.get(name)

    async def set(self, name: str, value: bytes, *, px: int) -> bool:
        await self._io()
        self.data[name] = value
        return True


def redis_cache(fake: FakeRedis, clock: FakeClock, **kwargs: Any) -> RedisCache:
    return RedisCache(fake, prefix="p:", timeout_s=0.02, retry_after_s=1.0, clock=clock, **kwargs)


async def test_redis_outage_is_a_miss_logged_once_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    fake, clock = FakeRedis(), FakeClock()
    cache = redis_cache(fake, clock)
    await cache.put("k", ENTRY, 60)
    assert fake.data == {"p:k": encode_entry(ENTRY)}
    fake.error = RedisConnectionError("connection refused")
    with caplog.at_level(logging.INFO, logger="gateway.cache.store"):
        assert await cache.get("k") is None
        await cache.put("k2", ENTRY, 60)  # inside the backoff: Redis is not called at all
        assert fake.calls == 2
        for _ in range(3):
            clock.now_s += 1.0
            assert await cache.get("k") is None
        assert fake.calls == 5
        fake.error = None
        clock.now_s += 1.0
        assert await cache.get("k") == ENTRY
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gateway.cache.store"]
    assert [level for level, _ in logged] == [logging.WARNING, logging.INFO], logged
    assert "ConnectionError" in logged[0][1] and "bypassing the cache" in logged[0][1]


async def test_a_hanging_redis_times_out_as_a_miss() -> None:
    fake, clock = FakeRedis(), FakeClock()
    fake.hang = True
    cache = redis_cache(fake, clock)
    started = asyncio.get_running_loop().time()
    assert await cache.get("k") is None
    clock.now_s += 2.0
    await cache.put("k", ENTRY, 60)
    assert asyncio.get_running_loop().time() - started < CUT_OFF_S
    assert fake.data == {}


async def test_redis_skips_oversized_and_expired_writes_and_misses_on_garbage() -> None:
    fake = FakeRedis()
    cache = redis_cache(fake, FakeClock(), max_entry_bytes=ENTRY_BYTES - 1)
    await cache.put("big", ENTRY, 60)
    await redis_cache(fake, FakeClock()).put("now", ENTRY, 0.0004)  # rounds to 0 ms: not written
    assert fake.calls == 0
    fake.data["p:junk"] = b"\x00not an entry"
    assert await cache.get("junk") is None
