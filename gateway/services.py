"""Everything a running gateway holds, built from config in the app's lifespan and closed in reverse order.

`build_services` is the only place that turns config into live objects (database engine, key store, ledger
writer, backends, deployments). Secrets are read here, from the environment variables config names.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, runtime_checkable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy.engine import Engine

from backends.base import Backend, BackendKind
from gateway.cache.store import MemoryCache, RedisCache, ResponseCache
from gateway.config import (
    CloudBackendConfig,
    Config,
    ConfigError,
    DeploymentConfig,
    EdgeBackendConfig,
    OpenAIBackendConfig,
)
from gateway.edge.hub import EdgeHub
from gateway.edge.link import NodeTimeouts
from gateway.edge.registry import MemoryRegistry, RedisRegistry, Registry
from gateway.edge.relay import Relay
from gateway.limits.base import BudgetRule
from gateway.limits.gate import Gate, QuotaStore
from gateway.limits.memory import MemoryLimiter
from gateway.limits.redis_store import RedisLimiter
from gateway.live.health import HealthProber
from gateway.live.state import RoutingState, build_specs, is_edge
from gateway.live.sync import RoutingSync
from gateway.metrics import GatewayMetrics
from gateway.store.db import make_engine, migrate
from gateway.store.keys import KeyStore, upsert_teams
from gateway.store.ledger import LedgerWriter
from gateway.store.spend import spent_micro_usd
from gateway.store.upkeep import RollupJob
from routing.decision import FREE, Deployment, Price

log = logging.getLogger("switchboard")


@runtime_checkable
class PriceSource(Protocol):
    """A backend that knows list prices (the cloud backend reads litellm's local cost map)."""

    def price_usd_per_mtok(self, model: str) -> tuple[Decimal, Decimal] | None: ...


@dataclass(slots=True)
class Services:
    config: Config
    db: Engine
    keys: KeyStore
    ledger: LedgerWriter
    backends: dict[str, Backend]
    deployments: dict[str, tuple[Deployment, ...]]
    backend_timeouts_s: Mapping[str, float]  # a node's backend (`edge/node-1`) takes its edge backend's
    metrics: GatewayMetrics
    admin_key: str | None
    routing: RoutingState
    gate: Gate
    cache: ResponseCache
    redis: Redis | None = None  # None: cache, limits and budgets live in this process
    routing_sync: RoutingSync | None = None  # shares routing stats and circuits through Redis
    rollup: RollupJob | None = None
    edge: EdgeHub | None = None  # None: edge nodes are off (config: edge.enabled)
    health: HealthProber | None = None

    @property
    def dispatch_backends(self) -> Mapping[str, Backend]:
        """Backends by the name a deployment carries: configured ones, and `edge/<node>` for edge nodes."""
        return self.backends if self.edge is None else self.edge.backends

    async def aclose(self) -> None:
        if self.rollup is not None:
            await self.rollup.aclose()
        if self.routing_sync is not None:
            await self.routing_sync.aclose()  # first: it removes this replica's key with the client
        if self.edge is not None:
            await self.edge.aclose()  # before Redis: it marks its nodes disconnected in the registry
        if self.health is not None:
            await self.health.aclose()
        await self.routing.aclose()
        for backend in reversed(list(self.backends.values())):
            await backend.aclose()
        await self.gate.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.ledger.aclose()
        self.db.dispose()

    async def redis_ok(self) -> bool | None:
        """None without Redis; else whether it answers a PING within the configured timeout."""
        if self.redis is None:
            return None
        try:
            async with asyncio.timeout(self.config.redis.timeout_ms / 1000):
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False


def missing_secrets(config: Config) -> list[str]:
    """One line per backend whose `api_key_env` names an unset variable (checked before serving)."""
    return [
        f"backends.{name}.api_key_env: environment variable {b.api_key_env} is not set (export it)"
        for name, b in config.backends.items()
        if b.api_key_env and not os.environ.get(b.api_key_env)
    ]


def _secret(env_name: str | None, path: str) -> str | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError("environment", [f"{path}: environment variable {env_name} is not set (export it)"])
    return value


def build_backend(name: str, cfg: CloudBackendConfig | OpenAIBackendConfig) -> Backend:
    """A configured backend (kind "edge" has none: its nodes' backends come from the edge hub)."""
    api_key = _secret(cfg.api_key_env, f"backends.{name}.api_key_env")
    if isinstance(cfg, CloudBackendConfig):
        from backends.cloud import CloudBackend  # imports litellm: only when a cloud backend is configured

        return CloudBackend(
            name, cfg.provider, api_key=api_key, api_base=cfg.api_base, timeout_s=cfg.timeout_s
        )
    from backends.openai_compat import OpenAICompatBackend

    return OpenAICompatBackend(
        name,
        cfg.base_url,
        api_key=api_key,
        timeout_s=cfg.timeout_s,
        connect_timeout_s=cfg.connect_timeout_s,
        max_connections=cfg.max_connections,
        supports_tools=cfg.supports_tools,
        supports_response_format=cfg.supports_response_format,
    )


def _price(public: str, dep: DeploymentConfig, upstream: str, backend: Backend) -> Price:
    if dep.input_usd_per_mtok is not None and dep.output_usd_per_mtok is not None:
        return Price(dep.input_usd_per_mtok, dep.output_usd_per_mtok)
    if isinstance(backend, PriceSource):
        listed = backend.price_usd_per_mtok(upstream)
        if listed is not None:
            return Price(
                dep.input_usd_per_mtok if dep.input_usd_per_mtok is not None else listed[0],
                dep.output_usd_per_mtok if dep.output_usd_per_mtok is not None else listed[1],
            )
    if backend.info.kind is BackendKind.CLOUD:
        log.warning(
            "model %s on backend %s: no price known; cost is recorded as 0 "
            "(set input_usd_per_mtok and output_usd_per_mtok under models.%s)",
            public,
            dep.backend,
            public,
        )
    return FREE


def build_deployments(config: Config, backends: Mapping[str, Backend]) -> dict[str, tuple[Deployment, ...]]:
    out: dict[str, tuple[Deployment, ...]] = {}
    for public, model in config.models.items():
        deps = []
        for dep in model.all_deployments():
            if is_edge(config.backends[dep.backend]):
                continue  # one deployment per live node, made at snapshot time (gateway/edge/pool.py)
            backend = backends[dep.backend]
            upstream = dep.upstream_model or public
            deps.append(
                Deployment(
                    public_model=public,
                    backend=dep.backend,
                    backend_kind=backend.info.kind,
                    upstream_model=upstream,
                    price=_price(public, dep, upstream, backend),
                    supports_tools=backend.info.supports_tools,
                    supports_response_format=backend.info.supports_response_format,
                    context_tokens=dep.context_tokens,
                )
            )
        out[public] = tuple(deps)
    return out


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


def should_migrate(config: Config) -> bool:
    if config.database.auto_migrate is not None:
        return config.database.auto_migrate
    return config.database.url.startswith("sqlite")


async def build_services(config: Config) -> Services:
    db_cfg = config.database
    if should_migrate(config):
        migrate(db_cfg.url, db_cfg.schema_name)
    engine = make_engine(db_cfg.url, db_cfg.schema_name)
    upsert_teams(engine, {name: team.models for name, team in config.teams.items()})
    backends: dict[str, Backend] = {}
    try:
        for name, bcfg in config.backends.items():
            if not isinstance(bcfg, EdgeBackendConfig):
                backends[name] = build_backend(name, bcfg)
    except BaseException:
        for b in backends.values():
            await b.aclose()
        engine.dispose()
        raise
    ledger = LedgerWriter(
        engine,
        spill_path=db_cfg.spill_path,
        queue_max=db_cfg.queue_max,
        batch_max=db_cfg.batch_max,
        flush_interval_s=db_cfg.flush_interval_s,
        replay_interval_s=db_cfg.replay_interval_s,
    )
    ledger.start()
    metrics = GatewayMetrics()
    metrics.add_gauge(
        "switchboard_ledger_queued", "Usage records waiting to be written", lambda: ledger.queued
    )
    metrics.add_gauge("switchboard_ledger_spilled", "Usage records spilled to file", lambda: ledger.spilled)
    metrics.add_gauge(
        "switchboard_ledger_rejected", "Usage records the database refused", lambda: ledger.rejected
    )
    metrics.add_gauge("switchboard_ledger_lost", "Usage records that could not be kept", lambda: ledger.lost)
    metrics.add_gauge(
        "switchboard_database_up",
        "1 while the ledger database is reachable",
        lambda: 0.0 if ledger.db_down else 1.0,
    )
    deployments = build_deployments(config, backends)
    routing = RoutingState(config, build_specs(config, backends, deployments))
    routing.start_pollers(time.monotonic)
    health = build_health(config, backends, routing)
    redis = build_redis(config)
    store, cache = build_quota(config, redis)
    replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    edge = None
    if config.edge_enabled:
        registry = build_registry(config, redis)
        relay = build_relay(config, redis, registry, replica_id)
        edge = EdgeHub(config, engine, registry, routing, backends, replica_id=replica_id, relay=relay)
        edge.start()
        metrics.add_gauge(
            "switchboard_edge_nodes_connected",
            "Edge nodes connected to this replica",
            lambda: float(len(edge.links)) if edge is not None else 0.0,
        )
    routing_sync = None
    if redis is not None:
        rc = config.redis
        routing_sync = RoutingSync(
            redis,
            routing,
            replica_id=replica_id,
            prefix=rc.prefix,
            interval_s=rc.routing_sync_s,
            timeout_s=rc.timeout_ms / 1000,
            retry_after_s=rc.retry_after_s,
        )
        routing_sync.start()

    def on_soft_limit(rule: BudgetRule, period: str, spent_micro_usd: int) -> None:
        metrics.budget_alerts.labels(rule.scope, period).inc()

    def spend(scope: str, period: str) -> int:
        return spent_micro_usd(engine, scope, period)

    gate = Gate(store, config, spend=spend, on_soft_limit=on_soft_limit)
    await gate.preload()
    rollup = RollupJob(engine, config.reports)
    rollup.start()
    return Services(
        config=config,
        db=engine,
        keys=KeyStore(engine, ttl_s=config.server.key_cache_ttl_s),
        ledger=ledger,
        backends=backends,
        deployments=deployments,
        backend_timeouts_s=NodeTimeouts({name: b.timeout_s for name, b in config.backends.items()}),
        metrics=metrics,
        admin_key=os.environ.get(config.server.admin_key_env) or None,
        routing=routing,
        gate=gate,
        cache=cache,
        redis=redis,
        routing_sync=routing_sync,
        rollup=rollup,
        edge=edge,
        health=health,
    )


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
