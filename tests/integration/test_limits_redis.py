"""RedisLimiter on the real Redis: the shared contract, exactness across replicas, outages, admit latency.

Each test works under its own key prefix and deletes only its own keys. "Replicas" are RedisLimiter
instances with their own clients (their own connection pools), driven concurrently by asyncio tasks.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from gateway.errors import LimiterUnavailable
from gateway.limits.base import (
    BudgetPeriod,
    BudgetRule,
    LimitKind,
    LimitRule,
)
from gateway.limits.redis_store import RedisLimiter
from tests.support.limiter_contract import LimiterContract
from tests.support.services import REDIS_URL
from tests.support.timing import CUT_OFF_S

REPLICAS = 3


@asynccontextmanager
async def replicas(n: int = 1, *, timeout_s: float = 2.0) -> AsyncIterator[list[RedisLimiter]]:
    """`n` limiters sharing a fresh prefix, each with its own client; the prefix's keys are deleted after."""
    prefix = f"test:limits:{uuid.uuid4().hex}:"
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(n)]
    try:
        await clients[0].ping()  # never skipped: these tests need a real Redis (README: how to start one)
        yield [RedisLimiter(c, prefix=prefix, timeout_s=timeout_s) for c in clients]
    finally:
        keys = [k async for k in clients[0].scan_iter(match=prefix + "*")]
        if keys:
            await clients[0].delete(*keys)
        for client in clients:
            await client.aclose()


class TestRedisLimiter(LimiterContract):
    @pytest_asyncio.fixture(loop_scope="function")  # the tests' own loop: the client's pool lives on it
    async def store(self) -> AsyncIterator[RedisLimiter]:
        async with replicas() as (limiter,):
            yield limiter


async def _gather(n: int, call: Callable[[int], Awaitable[Any]]) -> list[Any]:
    return await asyncio.gather(*(call(i) for i in range(n)))


async def test_replicas_admit_exactly_n_on_the_server_clock() -> None:
    # An hour's window refills one request per 72 s and one token per 3.6 s: none during the test.
    rule = LimitRule("team:hammer", LimitKind.REQUESTS, 50, 3600)
    token_rule = LimitRule("team:hammer", LimitKind.TOKENS, 1_000, 3600)
    async with replicas(REPLICAS) as ls:
        results = await _gather(300, lambda i: ls[i % REPLICAS].admit([rule], cost_tokens=0))
        token_results = await _gather(300, lambda i: ls[i % REPLICAS].admit([token_rule], cost_tokens=7))
    assert sum(a.allowed for a in results) == 50
    assert sorted(a.statuses[0].remaining for a in results if a.allowed) == list(range(50))
    assert sum(a.allowed for a in token_results) == 1_000 // 7


async def test_replicas_never_exceed_the_concurrency_cap() -> None:
    async with replicas(REPLICAS) as ls:
        grants = await _gather(100, lambda i: ls[i % REPLICAS].concurrency_acquire("team:cap", 7))
        held = [g for g in grants if g.acquired]
        assert len(held) == 7
        await _gather(7, lambda i: ls[i % REPLICAS].concurrency_release(held[i]))
        again = await _gather(100, lambda i: ls[i % REPLICAS].concurrency_acquire("team:cap", 7))
    assert sum(g.acquired for g in again) == 7


async def test_replicas_spend_a_budget_exactly_when_estimates_are_right() -> None:
    rule = BudgetRule("team:exact", BudgetPeriod.DAY, 10_000)
    async with replicas(REPLICAS) as limiters:

        async def request(i: int) -> bool:
            limiter = limiters[i % REPLICAS]
            reservation = await limiter.reserve_budget([rule], 100)
            if reservation.allowed:
                await limiter.settle_budget(reservation, 100)
            return reservation.allowed

        admitted = sum(await _gather(150, request))
        final = await limiters[0].reserve_budget([rule], 0)
    assert admitted == 100
    assert (final.statuses[0].spent_micro_usd, final.statuses[0].reserved_micro_usd) == (10_000, 0)


async def test_replicas_overshoot_a_budget_only_by_what_was_in_flight() -> None:
    rule, excess = BudgetRule("team:over", BudgetPeriod.DAY, 10_000), 20
    rng = random.Random(7)
    delays_s = [rng.uniform(0, 0.005) for _ in range(200)]
    in_flight = max_in_flight = 0
    async with replicas(REPLICAS) as limiters:

        async def request(i: int) -> None:
            nonlocal in_flight, max_in_flight
            limiter = limiters[i % REPLICAS]
            in_flight += 1  # counted from before the reservation until after the settlement
            max_in_flight = max(max_in_flight, in_flight)
            reservation = await limiter.reserve_budget([rule], 100)
            if reservation.allowed:
                await asyncio.sleep(delays_s[i])  # the upstream call
                await limiter.settle_budget(reservation, 100 + excess)  # each costs more than estimated
            in_flight -= 1

        await _gather(200, request)
        spent = (await limiters[0].reserve_budget([rule], 0)).statuses[0].spent_micro_usd
    assert 10_000 < spent <= 10_000 + excess * max_in_flight


async def test_a_flushed_script_cache_falls_back_to_eval() -> None:
    class ForgetfulClient:
        """Answers NOSCRIPT to the first EVALSHA, as a restarted Redis would."""

        def __init__(self, inner: aioredis.Redis) -> None:
            self.inner = inner
            self.calls: list[str] = []

        async def evalsha(self, sha: str, numkeys: int, *keys_and_args: str) -> Any:
            self.calls.append("evalsha")
            if self.calls.count("evalsha") == 1:
                raise NoScriptError("NOSCRIPT No matching script.")
            return await self.inner.evalsha(sha, numkeys, *keys_and_args)

        async def eval(self, script: str, numkeys: int, *keys_and_args: str) -> Any:
            self.calls.append("eval")
            return await self.inner.eval(script, numkeys, *keys_and_args)

    rule = LimitRule("key:noscript", LimitKind.REQUESTS, 1, 60)
    async with replicas() as (limiter,):
        client = ForgetfulClient(aioredis.Redis.from_url(REDIS_URL))
        try:
            forgetful = RedisLimiter(client, prefix=limiter.prefix, timeout_s=0.5)
            assert (await forgetful.admit([rule], cost_tokens=0)).allowed
            assert not (await forgetful.admit([rule], cost_tokens=0)).allowed
        finally:
            await client.inner.aclose()
    assert client.calls == ["evalsha", "eval", "evalsha"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts connections and never answers: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    try:
        result: Any = await call
    except LimiterUnavailable as exc:
        result = exc
    return result, time.perf_counter() - start


@pytest.mark.parametrize("outage", ["refused", "hung"])
@pytest.mark.parametrize("fail_open", [True, False])
async def test_an_unavailable_redis_fails_open_or_closed_in_time(outage: str, fail_open: bool) -> None:
    rule = LimitRule("key:down", LimitKind.REQUESTS, 1, 60)
    budget = BudgetRule("team:down", BudgetPeriod.DAY, 1)

    async def run(port: int) -> None:
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.05)
        # retry_after_s=0: every call goes to Redis, so each one shows the timeout bound on its own
        limiter = RedisLimiter(client, timeout_s=0.05, fail_open=fail_open, retry_after_s=0)
        try:
            for call in (
                limiter.admit([rule], cost_tokens=5),
                limiter.admit([rule], cost_tokens=5),
                limiter.concurrency_acquire("team:down", 1),
                limiter.reserve_budget([budget], 10),
            ):
                result, elapsed_s = await _timed(call)
                assert elapsed_s < CUT_OFF_S
                if fail_open:
                    assert result.allowed if hasattr(result, "allowed") else result.acquired
                    assert result.degraded
                else:
                    assert isinstance(result, LimiterUnavailable) and result.status_code == 503
                    assert "fail_open" in result.message
        finally:
            await client.aclose()

    if outage == "refused":
        await run(_closed_port())
    else:
        async with silent_server() as port:
            await run(port)


async def test_after_a_failure_redis_is_skipped_for_retry_after_s() -> None:
    now = [0.0]
    # As the gateway builds it (services.build_redis): no client-side retries, so a refused connection is
    # reported as such at once, and one refusal is an outage (a lone timeout is not: see outage.py).
    client = aioredis.Redis(host="127.0.0.1", port=_closed_port(), retry=Retry(NoBackoff(), 0))
    limiter = RedisLimiter(client, timeout_s=0.05, retry_after_s=1.0, monotonic_s=lambda: now[0])
    rule = LimitRule("key:skip", LimitKind.REQUESTS, 1, 60)
    try:
        with pytest.raises(LimiterUnavailable, match=r"failed \(ConnectionError\)"):
            await limiter.admit([rule], cost_tokens=0)
        with pytest.raises(LimiterUnavailable, match="failed moments ago"):
            await limiter.admit([rule], cost_tokens=0)
        now[0] = 1.0  # the window is over: Redis is tried again
        with pytest.raises(LimiterUnavailable, match=r"failed \((ConnectionError|TimeoutError)\)"):
            await limiter.admit([rule], cost_tokens=0)
    finally:
        await client.aclose()
