"""The stores replicas may share: Redis (one pool), the limiter and response cache over it or in process,
the edge-node registry and relay, and the backend health prober.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from backends.base import Backend
from gateway.cache.store import MemoryCache, RedisCache, ResponseCache
from gateway.config import Config, OpenAIBackendConfig
from gateway.edge.registry import MemoryRegistry, RedisRegistry, Registry
from gateway.edge.relay import Relay
from gateway.limits.gate import QuotaStore
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis_store import RedisLimiter
from gateway.live.health import HealthProber
from gateway.live.state import RoutingState


def build_redis(config: Config) -> Redis | None:
    """One pool for cache, limits and routing sync. No client-side retries: every call is bounded by
    `redis.timeout_ms`, and a failed call leaves Redis alone for `redis.retry_after_s` (gateway/outage.py)."""
    rc = config.redis
    if rc.url is None:
        return None
    return Redis.from_url(
        rc.url,
        socket_timeout=rc.timeout_ms / 1000,
        socket_connect_timeout=rc.connect_timeout_ms / 1000,
        max_connections=rc.max_connections,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def build_quota(config: Config, redis: Redis | None) -> tuple[QuotaStore, ResponseCache]:
    rc, cc = config.redis, config.cache
    if redis is None:
        cache: ResponseCache = MemoryCache(
            max_entries=cc.memory_max_entries,
            max_bytes=cc.memory_max_mb << 20,
            max_entry_bytes=cc.max_entry_bytes,
        )
        return MemoryLimiter(), cache
    timeout_s = rc.timeout_ms / 1000
    limiter = RedisLimiter(
        redis,
        prefix=rc.prefix + "limits:",
        timeout_s=timeout_s,
        fail_open=config.limits.fail_open,
        retry_after_s=rc.retry_after_s,
    )
    cache = RedisCache(
        redis,
        prefix=rc.prefix + "cache:",
        timeout_s=timeout_s,
        max_entry_bytes=cc.max_entry_bytes,
        retry_after_s=rc.retry_after_s,
    )
    return limiter, cache


def build_registry(config: Config, redis: Redis | None) -> Registry:
    """Where the node listing lives: Redis when configured (every replica lists every node), else here."""
    ttl_s = config.edge.ttl_s
    expire_s = 3 * ttl_s  # listed as stale, then disconnected, for a while before vanishing
    if redis is None:
        return MemoryRegistry(ttl_s=ttl_s, expire_s=expire_s)
    rc = config.redis
    return RedisRegistry(
        redis,
        prefix=rc.prefix + "edge:",
        ttl_s=ttl_s,
        expire_s=expire_s,
        timeout_s=rc.timeout_ms / 1000,
        retry_after_s=rc.retry_after_s,
    )


def build_relay(config: Config, redis: Redis | None, registry: Registry, replica_id: str) -> Relay | None:
    """The relay to nodes other replicas hold (needs Redis; config: edge.relay)."""
    if redis is None or not config.edge.relay or not isinstance(registry, RedisRegistry):
        return None
    rc = config.redis
    return Relay(
        redis,
        registry,
        prefix=rc.prefix,
        replica_id=replica_id,
        poll_s=config.edge.heartbeat_s,
        relay_timeout_s=config.edge.relay_timeout_s,
        timeout_s=rc.timeout_ms / 1000,
        retry_after_s=rc.retry_after_s,
    )


def build_health(
    config: Config, backends: Mapping[str, Backend], routing: RoutingState
) -> HealthProber | None:
    """Health probes for backends that ask for them (backends.X.health_interval_s; on by default for
    openai-compatible servers with privacy_tier = "edge")."""
    intervals = {
        name: every_s
        for name, b in config.backends.items()
        if isinstance(b, OpenAIBackendConfig) and (every_s := b.probe_interval_s) is not None
    }
    if not intervals:
        return None
    prober = HealthProber(backends, intervals, routing)
    prober.start()
    return prober
