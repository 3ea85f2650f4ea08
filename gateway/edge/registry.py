"""Live edge nodes, for the admin listing: in this process (`MemoryRegistry`) or in Redis (`RedisRegistry`).

A record is written when a node says hello and again at each heartbeat; it expires `expire_s` after the last
write (Redis `PEXPIRE`: every replica lists every node, and a dead replica's nodes vanish by themselves).
Times are wall-clock epoch seconds, because records cross replicas. A node is `connected` while heartbeats
arrive within `ttl_s`, `stale` after that, `disconnected` once its connection closed. Other replicas route to
a node through the relay (gateway/edge/relay.py) from its record here, on the same `ttl_s` rule.
Each connection has its own `link_id`: a node that moved to another replica is never marked gone by the old.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.outage import OutageGuard

log = logging.getLogger(__name__)


class NodeState(StrEnum):
    CONNECTED = "connected"
    STALE = "stale"  # connected, but no heartbeat within edge.ttl_s: out of routing
    DISCONNECTED = "disconnected"  # its connection closed; listed until the record expires


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    replica: str  # the gateway replica holding its connection
    link_id: str  # one per connection
    token_id: str
    models: tuple[str, ...]
    labels: Mapping[str, str]  # effective: the token's override the node's
    max_batch: int
    kv_cache_mb: float
    tokens_per_s: float
    usd_per_hour: float
    version: str
    connected_at: float  # epoch s
    last_seen: float  # epoch s of the hello or latest heartbeat
    in_flight: int = 0
    queue_depth: int = 0
    kv_used_frac: float = 0.0
    closed: bool = False

    def state(self, now: float, ttl_s: float) -> NodeState:
        if self.closed:
            return NodeState.DISCONNECTED
        return NodeState.CONNECTED if now - self.last_seen <= ttl_s else NodeState.STALE


_INTS = ("max_batch", "in_flight", "queue_depth")
_FLOATS = ("kv_cache_mb", "tokens_per_s", "usd_per_hour", "connected_at", "last_seen", "kv_used_frac")
_TEXTS = ("node_id", "replica", "link_id", "token_id", "version")


def encode_record(record: NodeRecord) -> dict[str, str]:
    """A record as the fields of one Redis hash."""
    out = {name: str(getattr(record, name)) for name in (*_TEXTS, *_INTS)}
    out |= {name: repr(float(getattr(record, name))) for name in _FLOATS}
    out["models"] = orjson.dumps(list(record.models)).decode()
    out["labels"] = orjson.dumps(dict(record.labels)).decode()
    out["closed"] = "1" if record.closed else "0"
    return out


def decode_record(fields: Mapping[bytes | str, bytes | str]) -> NodeRecord | None:
    """The record in a Redis hash; None when it is incomplete or unreadable (skipped, never fatal)."""
    raw = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
           for k, v in fields.items()}  # fmt: skip
    try:
        values: dict[str, Any] = {name: raw[name] for name in _TEXTS}
        values |= {name: int(raw[name]) for name in _INTS}
        values |= {name: float(raw[name]) for name in _FLOATS}
        models, labels = orjson.loads(raw["models"]), orjson.loads(raw["labels"])
        if not isinstance(models, list) or not isinstance(labels, dict):
            return None
        values["models"] = tuple(str(m) for m in models)
        values["labels"] = MappingProxyType({str(k): str(v) for k, v in labels.items()})
        values["closed"] = raw["closed"] == "1"
        return NodeRecord(**values)
    except (KeyError, ValueError, orjson.JSONDecodeError):
        return None


class Registry(Protocol):
    ttl_s: float

    async def put(self, record: NodeRecord) -> None:
        """Write (or refresh) a node's record; never raises for the store."""
        ...

    async def close(self, node_id: str, link_id: str, now: float) -> None:
        """Mark the node disconnected if `link_id` still holds it; never raises for the store."""
        ...

    async def nodes(self, now: float) -> list[NodeRecord]:
        """Every unexpired record, sorted by node id. May raise (the caller answers 503)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class MemoryRegistry:
    """One replica's nodes, in this process."""

    ttl_s: float
    expire_s: float
    _records: dict[str, NodeRecord] = field(default_factory=dict)

    async def put(self, record: NodeRecord) -> None:
        self._records[record.node_id] = record

    async def close(self, node_id: str, link_id: str, now: float) -> None:
        record = self._records.get(node_id)
        if record is not None and record.link_id == link_id:
            # Expiry counts from the close, so the listing shows a dropped node for expire_s.
            self._records[node_id] = replace(record, closed=True, last_seen=max(record.last_seen, now))

    async def nodes(self, now: float) -> list[NodeRecord]:
        for node_id in [n for n, r in self._records.items() if now - r.last_seen > self.expire_s]:
            del self._records[node_id]
        return sorted(self._records.values(), key=lambda r: r.node_id)

    async def aclose(self) -> None:
        self._records.clear()


# KEYS[1]: the node's hash. ARGV: link id, expiry ms. Marks it closed only if this link still holds it.
_CLOSE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'link_id') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'closed', '1')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class RedisRegistry:
    """Every replica's nodes: one hash per node (`{prefix}node:{id}`, PEXPIRE expire_s) and a set of ids."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        ttl_s: float,
        expire_s: float,
        timeout_s: float,
        retry_after_s: float,
    ) -> None:
        self.ttl_s = ttl_s
        self._redis = redis
        self._prefix = prefix
        self._set = prefix + "nodes"
        self._expire_ms = max(1, round(expire_s * 1000))
        self._timeout_s = timeout_s
        self._outage = OutageGuard(
            log,
            "edge registry",
            retry_after_s=retry_after_s,
            clock=time.monotonic,
            while_down="the node listing and other replicas' view of this replica's nodes may lag",
            when_back="node records are written again",
        )

    def _key(self, node_id: str) -> str:
        return f"{self._prefix}node:{node_id}"

    async def put(self, record: NodeRecord) -> None:
        if self._outage.skipping:
            return
        key = self._key(record.node_id)
        try:
            async with asyncio.timeout(self._timeout_s):
                pipe = self._redis.pipeline(transaction=True)
                pipe.hset(key, mapping=encode_record(record))  # type: ignore[arg-type]
                pipe.pexpire(key, self._expire_ms)
                pipe.sadd(self._set, record.node_id)
                pipe.pexpire(self._set, self._expire_ms)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed("write", exc)
            return
        self._outage.succeeded()

    async def close(self, node_id: str, link_id: str, now: float) -> None:
        if self._outage.skipping:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.eval(_CLOSE_SCRIPT, 1, self._key(node_id), link_id, str(self._expire_ms))
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed("write", exc)
            return
        self._outage.succeeded()

    async def nodes(self, now: float) -> list[NodeRecord]:
        async with asyncio.timeout(self._timeout_s * 4):
            ids = sorted(
                m.decode() if isinstance(m, bytes) else str(m) for m in await self._redis.smembers(self._set)
            )
            if not ids:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for node_id in ids:
                pipe.hgetall(self._key(node_id))
            rows = await pipe.execute()
            gone = [node_id for node_id, row in zip(ids, rows, strict=True) if not row]
            if gone:
                await self._redis.srem(self._set, *gone)
        records = [decode_record(row) for row in rows if row]
        return [r for r in records if r is not None]

    async def aclose(self) -> None:
        """The Redis client belongs to `Services`, which closes it."""
