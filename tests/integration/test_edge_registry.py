"""The edge node registry in memory and in a real Redis (each test under a prefix of its own): records,
states by heartbeat age, expiry, and a stale connection never closing a node that moved to another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from gateway.edge.registry import (
    MemoryRegistry,
    NodeRecord,
    NodeState,
    RedisRegistry,
    Registry,
    decode_record,
    encode_record,
)
from tests.support.edge_records import node_record
from tests.support.services import REDIS_URL, delete_prefix

TTL_S = 0.5
EXPIRE_S = 1.5
T0 = 1_800_000_000.0


def record(node_id: str = "n1", **changes: object) -> NodeRecord:
    return node_record(node_id, at=T0, **changes)


@contextlib.asynccontextmanager
async def open_registry(kind: str) -> AsyncIterator[Registry]:
    """A registry of `kind`; a Redis one under a prefix of its own, deleted afterwards."""
    if kind == "memory":
        yield MemoryRegistry(ttl_s=TTL_S, expire_s=EXPIRE_S)
        return
    prefix = f"test:edge:{uuid.uuid4().hex[:10]}:"
    client = Redis.from_url(REDIS_URL)
    try:
        yield RedisRegistry(
            client, prefix=prefix, ttl_s=TTL_S, expire_s=EXPIRE_S, timeout_s=1.0, retry_after_s=0.2
        )
    finally:
        await client.aclose()
        delete_prefix(REDIS_URL, prefix)


def test_records_survive_the_trip_through_a_hash() -> None:
    rec = record(in_flight=2, queue_depth=1, kv_used_frac=0.25, closed=True)
    decoded = decode_record({k.encode(): v.encode() for k, v in encode_record(rec).items()})
    assert decoded == replace(rec, labels=decoded.labels if decoded else {}) and decoded is not None
    assert dict(decoded.labels) == {"site": "plant-7"}
    assert decode_record({b"node_id": b"x"}) is None  # incomplete: skipped, never fatal


KINDS = pytest.mark.parametrize("kind", ["memory", "redis"])


@KINDS
async def test_put_list_states_and_close(kind: str) -> None:
    async with open_registry(kind) as registry:
        await _put_list_states_and_close(registry)


async def _put_list_states_and_close(registry: Registry) -> None:
    await registry.put(record("n1"))
    await registry.put(record("n2", last_seen=T0 - 1.0))
    nodes = await registry.nodes(T0 + 0.1)
    assert [n.node_id for n in nodes] == ["n1", "n2"]
    assert [n.state(T0 + 0.1, TTL_S) for n in nodes] == [NodeState.CONNECTED, NodeState.STALE]
    await registry.put(record("n1", last_seen=T0 + 0.2, in_flight=3))  # a heartbeat
    assert (await registry.nodes(T0 + 0.3))[0].in_flight == 3
    await registry.close("n1", "another-link", T0 + 0.3)  # an older connection of a node that moved
    assert (await registry.nodes(T0 + 0.3))[0].state(T0 + 0.3, TTL_S) is NodeState.CONNECTED
    await registry.close("n1", "link-1", T0 + 0.3)
    assert (await registry.nodes(T0 + 0.3))[0].state(T0 + 0.3, TTL_S) is NodeState.DISCONNECTED


@KINDS
async def test_records_expire_after_their_last_write(kind: str) -> None:
    async with open_registry(kind) as registry:
        await _records_expire(registry)


async def _records_expire(registry: Registry) -> None:
    if isinstance(registry, MemoryRegistry):
        await registry.put(record("old", last_seen=T0 - EXPIRE_S - 0.1))
        await registry.put(record("new"))
        assert [n.node_id for n in await registry.nodes(T0)] == ["new"]
        return
    await registry.put(record("r1"))  # Redis expires it on its own clock, whatever `last_seen` says
    assert [n.node_id for n in await registry.nodes(T0)] == ["r1"]
    await asyncio.sleep(EXPIRE_S + 0.2)
    assert await registry.nodes(T0) == []


async def test_redis_outage_is_survived_by_writes_and_reported_by_listing() -> None:
    client = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    try:
        dead = RedisRegistry(
            client, prefix="x:", ttl_s=TTL_S, expire_s=EXPIRE_S, timeout_s=0.3, retry_after_s=5
        )
        await dead.put(record())  # logged, not raised: routing never depends on it
        await dead.close("n1", "link-1", T0)
        with pytest.raises((OSError, TimeoutError, Exception)):
            await dead.nodes(T0)
    finally:
        await client.aclose()
