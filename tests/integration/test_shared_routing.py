"""RoutingSync on the real Redis: two replicas (two RoutingStates from one config) share stats and breakers.

Each test uses its own key prefix and deletes its keys. Time is passed in: every replica has its own
monotonic clock (different offsets, as on different machines) over one shared wall clock, so wall <->
monotonic conversion is exercised. Only the TTL test waits for real time, since Redis expires keys itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest
from redis import asyncio as aioredis

from backends.base import BackendKind
from gateway.config import parse_config
from gateway.live.state import RoutingState
from gateway.live.sync import RoutingSync
from routing.decision import FREE
from routing.privacy import PrivacyTier
from routing.snapshot import DeploymentSpec, DeploymentStats
from tests.support.services import REDIS_URL
from tests.support.tcp_proxy import TcpProxy
from tests.support.timing import CUT_OFF_S

DEP = "m@gpu"
OPEN_S = 2.0
FAILURES = 2
CONFIG = parse_config(
    {
        "backends": {"gpu": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": {"m": {"deployments": [{"backend": "gpu", "upstream_model": "up"}]}},
        "teams": {"t": {}},
        "routing": {"breaker_failures": FAILURES, "breaker_open_s": OPEN_S, "stats_alpha": 0.5},
    }
)
SPECS = {
    DEP: DeploymentSpec(
        public_model="m",
        deployment_id=DEP,
        backend="gpu",
        backend_kind=BackendKind.OPENAI,
        upstream_model="up",
        privacy_tier=PrivacyTier.INTERNAL,
        price=FREE,
    )
}


class World:
    """One wall clock for every replica; each replica's monotonic clock has its own offset."""

    def __init__(self) -> None:
        self.now_s = 1_700_000_000.0

    def wall(self) -> float:
        return self.now_s


@dataclass
class Replica:
    state: RoutingState
    sync: RoutingSync
    offset_s: float
    world: World

    def mono(self) -> float:
        return self.world.now_s + self.offset_s

    def stats(self) -> DeploymentStats:
        return self.state.snapshot(self.mono()).deployments[DEP][1]


def replica(
    client: aioredis.Redis, prefix: str, world: World, name: str, offset_s: float, **kw: float
) -> Replica:
    state = RoutingState(CONFIG, SPECS)
    box: list[Replica] = []
    sync = RoutingSync(
        client,
        state,
        replica_id=name,
        prefix=prefix,
        timeout_s=kw.pop("timeout_s", 0.5),
        clock=lambda: box[0].mono(),
        wall_clock=world.wall,
        **kw,
    )
    box.append(Replica(state, sync, offset_s, world))
    return box[0]


@asynccontextmanager
async def redis_client(url: str = REDIS_URL) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def shared_prefix(client: aioredis.Redis) -> AsyncIterator[str]:
    """A fresh key prefix on the real server (never skipped: these tests need Redis); keys deleted after."""
    prefix = f"test:routing:{uuid.uuid4().hex}:"
    await client.ping()
    try:
        yield prefix
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)


@asynccontextmanager
async def two_replicas(**kw: float) -> AsyncIterator[tuple[Replica, Replica, aioredis.Redis, str]]:
    world = World()
    async with redis_client() as client, shared_prefix(client) as prefix:
        a = replica(client, prefix, world, "a", offset_s=-1_699_000_000.0, **kw)
        b = replica(client, prefix, world, "b", offset_s=-1_699_999_000.0, **kw)
        yield a, b, client, prefix


async def sync_all(*replicas: Replica) -> None:
    for r in replicas:
        assert await r.sync.sync_once()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- circuit breakers -------------------------------------------------------------------------------------


async def test_a_trip_on_one_replica_opens_the_circuit_on_the_other_until_the_same_moment() -> None:
    async with two_replicas() as (a, b, _, _):
        for _ in range(FAILURES):
            a.state.breakers.record_failure(DEP, a.mono())
        opened_wall_s = a.world.now_s
        assert a.stats().circuit_open_until_s == pytest.approx(a.mono() + OPEN_S)
        assert b.stats().circuit_open_until_s is None

        await sync_all(a, b)
        until_b = b.stats().circuit_open_until_s
        assert until_b is not None and until_b - b.offset_s == pytest.approx(opened_wall_s + OPEN_S, abs=1e-3)
        assert not b.state.breakers.allow(DEP, b.mono())  # dispatch refuses it too, not only routing

        a.world.now_s += OPEN_S  # open period over: A probes, B holds back instead of probing too
        assert b.stats().circuit_open_until_s == math.inf
        assert not b.state.breakers.allow(DEP, b.mono())
        assert a.state.breakers.allow(DEP, a.mono())
        a.state.breakers.record_success(DEP, a.mono())
        assert a.stats().circuit_open_until_s is None

        await sync_all(a, b)
        assert b.stats().circuit_open_until_s is None
        assert b.state.breakers.allow(DEP, b.mono())
        await sync_all(a, b)  # a later sync does not re-open it
        assert b.stats().circuit_open_until_s is None


async def test_a_failed_probe_extends_the_shared_open_period() -> None:
    async with two_replicas() as (a, b, _, _):
        for _ in range(FAILURES):
            a.state.breakers.record_failure(DEP, a.mono())
        await sync_all(a, b)
        a.world.now_s += OPEN_S
        assert a.state.breakers.allow(DEP, a.mono())
        a.state.breakers.record_failure(DEP, a.mono())  # the probe fails: open twice as long
        await sync_all(a, b)
        until_b = b.stats().circuit_open_until_s
        assert until_b is not None and until_b == pytest.approx(b.mono() + 2 * OPEN_S, abs=1e-3)


async def test_the_other_replica_probes_itself_when_the_tripping_one_stays_silent() -> None:
    async with two_replicas(probe_grace_s=1.0) as (a, b, _, _):
        for _ in range(FAILURES):
            a.state.breakers.record_failure(DEP, a.mono())
        await sync_all(a, b)
        a.world.now_s += OPEN_S + 0.5
        assert not b.state.breakers.allow(DEP, b.mono())  # A's probe is still due
        a.world.now_s += 0.5
        assert b.state.breakers.allow(DEP, b.mono())  # A never probed: B does, once
        assert not b.state.breakers.allow(DEP, b.mono())
        b.state.breakers.record_success(DEP, b.mono())
        await sync_all(a, b)  # A still claims its (half-open) trip; B does not follow it again
        assert b.stats().circuit_open_until_s is None


async def test_a_tripping_replica_that_goes_away_leaves_the_circuit_open_not_closed() -> None:
    async with two_replicas() as (a, b, client, _):
        for _ in range(FAILURES):
            a.state.breakers.record_failure(DEP, a.mono())
        await sync_all(a, b)
        await a.sync.aclose()
        assert await client.exists(a.sync.key) == 0
        await sync_all(b)  # A is gone without closing its circuit: B keeps it open, then probes itself
        assert b.stats().circuit_open_until_s == pytest.approx(b.mono() + OPEN_S, abs=1e-3)
        a.world.now_s += OPEN_S + b.sync.probe_grace_s
        assert b.state.breakers.allow(DEP, b.mono())


# ---- statistics -------------------------------------------------------------------------------------------


def observe(r: Replica, n: int, *, ttft_ms: float, latency_ms: float) -> None:
    for _ in range(n):
        r.state.stats.observe_request(
            DEP, now_s=r.mono(), ok=True, latency_ms=latency_ms, ttft_ms=ttft_ms, completion_tokens=21
        )


async def test_observations_on_one_replica_reach_the_other() -> None:
    async with two_replicas() as (a, b, _, _):
        observe(a, 8, ttft_ms=100.0, latency_ms=500.0)
        prior = b.stats()
        assert prior.sample_count == 0 and prior.ttft_ms == CONFIG.backends["gpu"].prior_ttft_ms
        await sync_all(a, b)
        seen = b.stats()
        mine = a.stats()
        # B has no evidence of its own: it takes A's numbers as they are, not pulled toward its priors
        assert seen.ttft_ms == pytest.approx(mine.ttft_ms) and seen.ttft_ms < 110.0
        assert seen.p50_latency_ms == pytest.approx(500.0) and seen.sample_count == 8


async def test_both_replicas_evidence_is_combined_and_never_counted_twice() -> None:
    async with two_replicas() as (a, b, _, _):
        observe(a, 10, ttft_ms=100.0, latency_ms=500.0)
        observe(b, 10, ttft_ms=300.0, latency_ms=1500.0)  # same count, same moment: equal weights
        own_a, own_b = a.stats(), b.stats()
        a.state.stats.request_started(DEP)
        a.state.stats.request_started(DEP)
        b.state.stats.request_started(DEP)
        await sync_all(a, b, a)
        for _ in range(3):  # repeated syncs change nothing: remote numbers never feed back into local ones
            merged_a, merged_b = a.stats(), b.stats()
            assert merged_b.ttft_ms == pytest.approx((own_a.ttft_ms + own_b.ttft_ms) / 2, rel=1e-6)
            assert merged_b.p50_latency_ms == pytest.approx(1000.0, rel=1e-6)
            assert merged_a.ttft_ms == pytest.approx(merged_b.ttft_ms)
            assert merged_a.in_flight == merged_b.in_flight == 3
            assert merged_a.sample_count == merged_b.sample_count == 20
            await sync_all(a, b)
        assert b.state.stats.snapshot(b.mono())[DEP].ttft_ms == pytest.approx(own_b.ttft_ms)


async def test_recent_evidence_outweighs_old() -> None:
    async with two_replicas() as (a, b, _, _):
        observe(b, 10, ttft_ms=300.0, latency_ms=1500.0)
        a.world.now_s += 600.0  # B's evidence is ten minutes old (tau 60 s): A's fresh numbers dominate
        observe(a, 10, ttft_ms=100.0, latency_ms=500.0)
        await sync_all(a, b)
        assert b.stats().ttft_ms == pytest.approx(a.state.stats.snapshot(a.mono())[DEP].ttft_ms, rel=1e-3)


async def test_engine_readings_take_the_freshest() -> None:
    async with two_replicas() as (a, b, _, _):
        b.state.stats.observe_engine(DEP, now_s=b.mono(), queue_depth=1, kv_cache_used_frac=0.1, running=2)
        a.world.now_s += 1.0
        a.state.stats.observe_engine(DEP, now_s=a.mono(), queue_depth=7, kv_cache_used_frac=0.9, running=9)
        await sync_all(a, b)
        assert (b.stats().queue_depth, b.stats().kv_cache_used_frac) == (7, 0.9)
        a.world.now_s += 9.5  # A's reading expires 10 s after it was taken, B's one second earlier
        await sync_all(a, b)
        assert b.stats().queue_depth == 7
        a.world.now_s += 0.6
        assert b.stats().queue_depth == 0  # expired between syncs too
        await sync_all(a, b)
        assert b.stats().queue_depth == 0


async def test_a_stale_view_is_dropped_when_syncs_stop() -> None:
    async with two_replicas() as (a, b, _, _):
        a.state.stats.request_started(DEP)
        await sync_all(a, b)
        assert b.stats().in_flight == 1
        a.world.now_s += b.sync.ttl_s + 0.1  # no sync since (Redis gone, say): A's numbers are as old as
        assert b.stats().in_flight == 0  # Redis would let them get, so B routes on its own


async def test_a_replica_that_stops_publishing_drops_out_after_its_ttl() -> None:
    async with redis_client() as client, shared_prefix(client) as prefix:
        states = [RoutingState(CONFIG, SPECS) for _ in range(2)]
        a, b = (
            RoutingSync(client, s, replica_id=n, prefix=prefix, interval_s=0.1, timeout_s=0.5)
            for s, n in zip(states, "ab", strict=True)
        )
        states[0].stats.request_started(DEP)
        assert await a.sync_once() and await b.sync_once()
        assert states[1].snapshot(time.monotonic()).deployments[DEP][1].in_flight == 1
        assert await client.exists(a.key) == 1
        await asyncio.sleep(a.ttl_s + 0.1)  # A is gone: no more syncs
        assert await client.exists(a.key) == 0
        assert await b.sync_once()
        assert states[1].snapshot(time.monotonic()).deployments[DEP][1].in_flight == 0
        assert await client.smembers(prefix + "routing:replicas") == {b"b"}


async def test_started_syncs_share_in_the_background_and_close_cleanly() -> None:
    async with redis_client() as client, shared_prefix(client) as prefix:
        states = [RoutingState(CONFIG, SPECS) for _ in range(2)]
        a, b = (
            RoutingSync(client, s, replica_id=n, prefix=prefix, interval_s=0.02, timeout_s=0.5)
            for s, n in zip(states, "ab", strict=True)
        )
        states[0].stats.request_started(DEP)
        a.start()
        b.start()
        try:
            deadline = time.monotonic() + 10.0  # a busy CI machine may starve the sync loops for a while
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                if states[1].snapshot(time.monotonic()).deployments[DEP][1].in_flight == 1:
                    break
            assert states[1].snapshot(time.monotonic()).deployments[DEP][1].in_flight == 1
        finally:
            await a.aclose()
            await b.aclose()
        assert await client.exists(a.key, b.key) == 0  # removed at close, not left to expire


# ---- outages ----------------------------------------------------------------------------------------------


async def test_unreachable_redis_costs_one_timeout_logs_once_and_routing_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    async with redis_client(f"redis://127.0.0.1:{closed_port()}/0") as dead:
        a = replica(dead, "test:routing:dead:", world, "a", offset_s=0.0, timeout_s=0.05, retry_after_s=1.0)
        observe(a, 3, ttft_ms=100.0, latency_ms=500.0)
        with caplog.at_level(logging.WARNING, logger="gateway.live.sync"):
            for _ in range(4):
                started = time.perf_counter()
                assert await a.sync.sync_once() is False
                assert time.perf_counter() - started < CUT_OFF_S
                world.now_s += 0.6  # every other call is past retry_after_s: it tries (and fails) again
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "routing sync" in warnings[0].getMessage()
        assert a.stats().p50_latency_ms == pytest.approx(500.0)  # the local view keeps working


async def test_a_hung_redis_is_cut_off_at_the_timeout() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with redis_client(f"redis://127.0.0.1:{port}/0") as hung:
            a = replica(hung, "test:routing:hung:", World(), "a", offset_s=0.0, timeout_s=0.05)
            started = time.perf_counter()
            assert await a.sync.sync_once() is False
            assert time.perf_counter() - started < CUT_OFF_S
    finally:
        server.close()


async def test_sharing_resumes_when_redis_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    world = World()
    target = urlparse(REDIS_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    try:
        async with (
            redis_client() as direct,
            shared_prefix(direct) as prefix,
            redis_client(f"redis://127.0.0.1:{proxy.port}/0") as via_proxy,
        ):
            a = replica(via_proxy, prefix, world, "a", offset_s=0.0, timeout_s=0.2, retry_after_s=1.0)
            b = replica(direct, prefix, world, "b", offset_s=5.0)
            a.state.stats.request_started(DEP)
            await sync_all(a, b)
            assert b.stats().in_flight == 1
            await proxy.cut()
            a.state.stats.request_started(DEP)
            with caplog.at_level(logging.INFO, logger="gateway.live.sync"):
                assert await a.sync.sync_once() is False
                assert a.stats().in_flight == 2  # its own view is intact
                await proxy.restore()
                assert await a.sync.sync_once() is False  # still backing off
                world.now_s += 1.0
                await sync_all(a, b)
            assert b.stats().in_flight == 2
            messages = [r.getMessage() for r in caplog.records]
            assert sum("failed" in m for m in messages) == 1 and sum("is back" in m for m in messages) == 1
    finally:
        await proxy.aclose()
