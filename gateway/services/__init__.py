"""Everything a running gateway holds (`Services`), built from config in the app's lifespan.

`build.build_services` is the only place that turns config into live objects; `backends` builds the
configured backends and deployments, `shared` the Redis-backed stores. `Services.aclose` closes them in
reverse order of building.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.engine import Engine

from backends.base import Backend
from gateway.batch.service import BatchService
from gateway.batch.worker import BatchWorker
from gateway.cache.store import ResponseCache
from gateway.config import Config
from gateway.edge.hub import EdgeHub
from gateway.files.service import FileService
from gateway.limits.gate import Gate
from gateway.live.health import HealthProber
from gateway.live.state import RoutingState
from gateway.live.sync import RoutingSync
from gateway.metrics import GatewayMetrics
from gateway.pipeline.access import ModelAccess
from gateway.pipeline.flow import Pipeline
from gateway.reports.runner import ReportRunner
from gateway.store.keys import KeyStore
from gateway.store.ledger import LedgerWriter
from gateway.store.responses import ResponsePruneJob, ResponseStore
from gateway.store.upkeep import RollupJob
from gateway.telemetry.base import RequestTracer
from routing.decision import Deployment


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
    routing: RoutingState
    gate: Gate
    cache: ResponseCache
    access: ModelAccess
    pipeline: Pipeline
    reports: ReportRunner
    responses: ResponseStore  # /v1/responses conversation state (SQL)
    files: FileService  # /v1/files: metadata in SQL, bytes in file storage (files.storage)
    batches: BatchService  # /v1/batches: state in SQL; items run by the workers
    redis: Redis | None = None  # None: cache, limits and budgets live in this process
    routing_sync: RoutingSync | None = None  # shares routing stats and circuits through Redis
    rollup: RollupJob | None = None
    edge: EdgeHub | None = None  # None: edge nodes are off (config: edge.enabled)
    health: HealthProber | None = None
    responses_prune: ResponsePruneJob | None = None
    batch_worker: BatchWorker | None = None  # None: batch.enabled = false on this replica
    tracer: RequestTracer | None = None  # None: telemetry.enabled = false

    async def aclose(self) -> None:
        await self.reports.aclose()  # first: stop reports still running on their threads
        if self.batch_worker is not None:
            await self.batch_worker.aclose()  # before the pipeline's parts: its items use them
        if self.responses_prune is not None:
            await self.responses_prune.aclose()
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
        await self.files.aclose()
        if self.tracer is not None:
            await self.tracer.aclose()  # last: every request's spans are made by now
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
