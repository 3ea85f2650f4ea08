"""Redis goes away under two gateway replicas and comes back, without restarting them.

Replica 0 fails closed (limits.fail_open = false), replica 1 fails open (true); both share a private
redis-server (so stopping it touches nothing else) and the session's PostgreSQL schema. Team `out_lim` has a
request limit (6 per window); `out_free` has no limits, so it needs Redis only for the cache. No request may
hang: each ends within `BOUND_S`, whether Redis refuses connections (killed) or accepts and never answers
(frozen with SIGSTOP).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from tests.support.replica_rig import (
    ENV,
    WINDOW_S,
    Reply,
    Rig,
    chat_body,
    check_ledger_matches,
    gateway_config,
    post_chat,
)
from tests.support.replicas import FakeUpstream, GatewayReplicas, RedisServer

BOUND_S = 2.0  # no request may take longer, Redis up, down or frozen
CLOSED, OPEN = 0, 1
LIMIT = 6  # teams.out_lim.limits.requests


@pytest.fixture(scope="module")
def private_redis(workdir: Path) -> Iterator[RedisServer]:
    with RedisServer(workdir) as server:
        yield server


@pytest.fixture(scope="module")
def outage_rig(
    workdir: Path, upstream: FakeUpstream, pg: tuple[str, Engine], private_redis: RedisServer
) -> Iterator[Rig]:
    schema, engine = pg
    prefix = f"test:outage:{uuid.uuid4().hex[:12]}:"
    config = gateway_config(
        upstream.base_url, schema, private_redis.url, prefix, timeout_ms=250, connect_timeout_ms=1000
    )
    fail_open = {"limits": {"fail_open": True, "budgets_fail_open": True}}
    replicas = GatewayReplicas(config, workdir, n=2, name="outage", overrides=[{}, fail_open], env=ENV)
    with replicas:
        yield Rig(replicas, engine, upstream, schema, prefix)


@pytest.fixture
def redis_up(private_redis: RedisServer) -> RedisServer:
    """A running, empty private Redis at the start of each test."""
    private_redis.start()
    private_redis.flushall()
    return private_redis


def slot_crossings(started: float, ended: float) -> int:
    """GCRA slot boundaries (window/limit each, on the shared clock) between two wall times: a sequence
    of requests spanning k of them may be admitted k more times than the limit."""
    slot_s = WINDOW_S / LIMIT
    return int(ended // slot_s - started // slot_s)


async def limits_enforced(
    http: httpx.AsyncClient,
    rig: Rig,
    key: str,
    *,
    n: int = 10,
    used: int = 0,
    since: float | None = None,
    exact: bool = True,
) -> list[Reply]:
    """`n` sequential `out_lim` requests alternating replicas, `used` of the window's LIMIT already taken
    (since wall time `since`): the rest pass (one more per slot boundary crossed), the others get 429.
    Not `exact`: the counter may hold charges nobody saw (at most the rest pass, and some get 429)."""
    started = time.time() if since is None else since
    replies = [await post_chat(http, rig.urls, i % 2, key, chat_body("fast")) for i in range(n)]
    ok = sum(r.status == 200 for r in replies)
    most = LIMIT - used + slot_crossings(started, time.time())
    least = LIMIT - used if exact else 0
    assert least <= ok <= most and ok < n, [r.describe() for r in replies]
    assert all(r.status == 429 for r in replies if r.status != 200), [r.describe() for r in replies]
    return replies


async def cache_works(http: httpx.AsyncClient, rig: Rig, key: str, body: dict[str, Any]) -> list[Reply]:
    """Stored by one replica, served by the other."""
    miss = await post_chat(http, rig.urls, CLOSED, key, body)
    hit = await post_chat(http, rig.urls, OPEN, key, body)
    assert miss.status == 200 and miss.headers.get("x-switchboard-cache") == "miss", miss.describe()
    assert hit.status == 200 and hit.headers.get("x-switchboard-cache") == "hit", hit.describe()
    return [miss, hit]


async def readyz_redis(http: httpx.AsyncClient, url: str, expected: str, within_s: float = 3.0) -> int:
    """Poll /readyz until its `redis` field says `expected`; returns the last HTTP status."""
    deadline = time.monotonic() + within_s
    while True:
        started = time.monotonic()
        resp = await http.get(url + "/readyz")
        took_s = time.monotonic() - started
        assert took_s < BOUND_S, f"{url}/readyz took {took_s:.2f} s"
        if resp.json().get("redis") == expected or time.monotonic() > deadline:
            assert resp.json().get("redis") == expected, f"{url}/readyz: {resp.status_code} {resp.text}"
            return resp.status_code
        await asyncio.sleep(0.1)


async def while_down(
    http: httpx.AsyncClient, rig: Rig, lim: str, free: str, cached: dict[str, Any]
) -> list[Reply]:
    """What each replica answers with Redis gone: closed refuses `out_lim` with 503, open admits it
    unchecked; `out_free` is served by both (the cache misses); /readyz says Redis is unreachable."""
    replies = []
    for _ in range(3):
        refused = await post_chat(http, rig.urls, CLOSED, lim, chat_body("fast"))
        assert (refused.status, refused.error_code) == (503, "limiter_unavailable"), refused.describe()
        admitted = await post_chat(http, rig.urls, OPEN, lim, chat_body("fast"))
        assert admitted.status == 200, admitted.describe()
        replies += [refused, admitted]
        for replica in (CLOSED, OPEN):
            for body in (chat_body("fast"), cached):
                served = await post_chat(http, rig.urls, replica, free, body)
                assert served.status == 200, served.describe()
                assert served.headers.get("x-switchboard-cache") != "hit", served.describe()
                replies.append(served)
    assert await readyz_redis(http, rig.urls[CLOSED], "unreachable") == 503  # fail closed: not ready
    assert await readyz_redis(http, rig.urls[OPEN], "unreachable") == 200  # fail open: still serving
    return replies


async def recovered(
    http: httpx.AsyncClient, rig: Rig, lim: str, within_s: float = 5.0
) -> tuple[list[Reply], float]:
    """Poll the fail-closed replica until it admits again (Redis is empty: the first poll that is not a
    503 is a 200), then wait out the open replica's back-off so both check Redis again. Also returns the
    wall time the admitted poll was sent."""
    replies = []
    deadline = time.monotonic() + within_s
    while True:
        sent_at = time.time()
        reply = await post_chat(http, rig.urls, CLOSED, lim, chat_body("fast"))
        replies.append(reply)
        if reply.status != 503:
            assert reply.status == 200, reply.describe()
            break
        assert time.monotonic() < deadline, f"still refusing {within_s} s after Redis came back"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # > redis.retry_after_s
    for url in rig.urls:
        assert await readyz_redis(http, url, "ok") == 200
    return replies, sent_at


async def background(
    http: httpx.AsyncClient, rig: Rig, plan: Sequence[tuple[str, str, dict[str, Any]]], stop: asyncio.Event
) -> list[tuple[float, str, Reply]]:
    """Four clients sending the plan's (team, key, body) round-robin over the replicas until `stop`;
    returns (wall time sent, team, reply) for each request."""
    out: list[tuple[float, str, Reply]] = []

    async def client(first: int) -> None:
        i = first
        while not stop.is_set():
            team, key, body = plan[i % len(plan)]
            sent_at = time.time()
            out.append((sent_at, team, await post_chat(http, rig.urls, i % 2, key, body)))
            i += 4
            await asyncio.sleep(0.01)

    await asyncio.gather(*(client(w) for w in range(4)))
    return out


def assert_no_hang(replies: Sequence[Reply]) -> None:
    slow = [(r.describe(), round(r.elapsed_s, 3)) for r in replies if r.elapsed_s >= BOUND_S]
    assert not slow, f"{len(slow)} requests took {BOUND_S} s or more: {slow[:5]}"


async def test_redis_killed_mid_traffic_then_restarted(outage_rig: Rig, redis_up: RedisServer) -> None:
    """Background traffic on both replicas while Redis is killed: nothing hangs; meanwhile the closed
    replica refuses `out_lim` with 503 limiter_unavailable, the open one serves it, `out_free` is served by
    both. Restarted on the same port (empty), Redis is used again: limits hold and the cache hits."""
    rig = outage_rig
    lim, free = rig.key("out_lim"), rig.key("out_free")
    cached = chat_body("fast", prompt="Outage cache " + uuid.uuid4().hex, temperature=0)
    plan = [
        ("out_lim", lim, chat_body("fast")),
        ("out_free", free, chat_body("fast")),
        ("out_free", free, cached),
    ]
    async with httpx.AsyncClient(timeout=10) as http:
        replies = await limits_enforced(http, rig, lim)  # and leaves out_lim exhausted for the window
        replies += await cache_works(http, rig, free, cached)

        stop = asyncio.Event()
        traffic = asyncio.create_task(background(http, rig, plan, stop))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_up.stop)
        killed_at = time.time()
        replies += await while_down(http, rig, lim, free, cached)
        stop.set()
        sent = await traffic
        stopped_at = time.time()

        await asyncio.to_thread(redis_up.start)  # same port, empty: counters and cache entries are gone
        polls, first_admitted_at = await recovered(http, rig, lim)
        replies += polls
        replies += await limits_enforced(http, rig, lim, n=LIMIT + 2, used=1, since=first_admitted_at)
        replies += await cache_works(http, rig, free, cached)

    background_replies = [r for _, _, r in sent]
    assert_no_hang([*replies, *background_replies])
    for sent_at, team, r in sent:
        if killed_at + 0.05 < sent_at < stopped_at:  # sent while Redis was surely down
            refused = team == "out_lim" and r.replica == CLOSED
            expected = (503, "limiter_unavailable") if refused else (200, None)
            assert (r.status, r.error_code) == expected, f"{team} {r.describe()}"
        else:
            assert r.status in (200, 429, 503), f"{team} {r.describe()}"
    assert any(r.status == 503 for r in background_replies), "no background request saw the outage"
    check_ledger_matches(rig, None, [*replies, *background_replies])


async def test_frozen_redis_times_out_instead_of_hanging(outage_rig: Rig, redis_up: RedisServer) -> None:
    """Redis stopped with SIGSTOP accepts connections and never answers: every call must time out, with
    the same answers as when it is gone; after SIGCONT both replicas use it again."""
    rig = outage_rig
    lim, free = rig.key("out_lim"), rig.key("out_free")
    cached = chat_body("fast", prompt="Frozen cache " + uuid.uuid4().hex, temperature=0)
    async with httpx.AsyncClient(timeout=10) as http:
        replies = await cache_works(http, rig, free, cached)
        redis_up.pause()
        try:
            replies += await while_down(http, rig, lim, free, cached)
        finally:
            redis_up.resume()
        polls, first_admitted_at = await recovered(http, rig, lim)
        replies += polls
        # Calls that timed out while Redis was frozen still run when it thaws (they sat in its socket
        # buffers), so requests refused or admitted unchecked meanwhile may have been charged too.
        replies += await limits_enforced(
            http, rig, lim, n=LIMIT + 2, used=1, since=first_admitted_at, exact=False
        )
        fresh = chat_body("fast", prompt="After thaw " + uuid.uuid4().hex, temperature=0)
        replies += await cache_works(http, rig, free, fresh)
    assert_no_hang(replies)
    check_ledger_matches(rig, None, replies)
