"""RedisCache on the real Redis (each test under its own key prefix), an unreachable Redis, hit latency."""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis import asyncio as aioredis

from backends.base import ChatResult, StreamChunk, Usage
from gateway.cache.store import RedisCache, encode_entry, entry_from_chunks, entry_from_result
from tests.support.services import REDIS_URL
from tests.support.timing import CUT_OFF_S

USAGE = Usage(prompt_tokens=40, completion_tokens=12)
ENTRY = entry_from_result(
    ChatResult({"role": "assistant", "content": "Paris is the capital of France."}, "stop", USAGE, "m"),
    backend="gpu0",
    cost_micro_usd=321,
)


@asynccontextmanager
async def redis_client(url: str = REDIS_URL, **kwargs: Any) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url, **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def live_cache(**kwargs: float) -> AsyncIterator[tuple[RedisCache, aioredis.Redis, str]]:
    """A RedisCache on the real server under a fresh prefix; its keys are deleted afterwards."""
    prefix = f"test:cache:{uuid.uuid4().hex}:"
    async with redis_client() as client:
        # Never skipped: these tests must run against a real Redis (README: how to start one).
        await client.ping()
        try:
            yield RedisCache(client, prefix=prefix, timeout_s=kwargs.get("timeout_s", 0.5)), client, prefix
        finally:
            keys = [k async for k in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(*keys)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentiles_us(samples_s: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples_s, n=100)
    return cuts[49] * 1e6, cuts[98] * 1e6


async def test_put_then_get_round_trips_under_the_prefix() -> None:
    async with live_cache() as (cache, client, prefix):
        assert await cache.get("team:a:k1") is None
        await cache.put("team:a:k1", ENTRY, ttl_s=60)
        assert await cache.get("team:a:k1") == ENTRY
        assert await client.get(prefix + "team:a:k1") == encode_entry(ENTRY)
        assert 59_000 < await client.pttl(prefix + "team:a:k1") <= 60_000


async def test_stream_entry_survives_redis() -> None:
    chunks = [StreamChunk(delta={"role": "assistant"}), StreamChunk(delta={"content": "Hi"})]
    entry = entry_from_chunks(
        [*chunks, StreamChunk(finish_reason="stop", usage=USAGE)], backend="b", cost_micro_usd=5
    )
    assert entry is not None
    async with live_cache() as (cache, _, _):
        await cache.put("s", entry, ttl_s=60)
        back = await cache.get("s")
        assert back == entry and back is not None
        assert [dict(c.delta) for c in tuple(back.replay())[:-1]] == [dict(c.delta) for c in chunks]


async def test_short_ttl_expires() -> None:
    async with live_cache() as (cache, _, _):
        await cache.put("short", ENTRY, ttl_s=0.2)
        assert await cache.get("short") == ENTRY
        await asyncio.sleep(0.35)
        assert await cache.get("short") is None


async def test_closed_port_is_a_quick_miss_and_a_skipped_write(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    now_s = [0.0]
    async with redis_client(url, socket_connect_timeout=0.05, socket_timeout=0.05) as client:
        cache = RedisCache(client, prefix="x:", timeout_s=0.1, retry_after_s=1.0, clock=lambda: now_s[0])
        with caplog.at_level(logging.INFO, logger="gateway.cache.store"):
            started = time.perf_counter()
            assert await cache.get("k") is None
            await cache.put("k", ENTRY, ttl_s=60)
            first_s = time.perf_counter() - started
            now_s[0] = 5.0  # past the backoff: Redis is tried again, and fails again
            started = time.perf_counter()
            assert await cache.get("k") is None
            await cache.put("k", ENTRY, ttl_s=60)
            again_s = time.perf_counter() - started
    assert first_s < CUT_OFF_S and again_s < CUT_OFF_S, (first_s, again_s)
    warnings = [r for r in caplog.records if r.name == "gateway.cache.store"]
    assert len(warnings) == 1 and "bypassing the cache" in warnings[0].getMessage()
