"""`build_services(config)`: turn config into the live objects of one gateway replica, by concern.

Storage (SQL engine, ledger writer) first, then backends and deployments, live routing state, the shared
stores (Redis cache and limits, or in-process ones), edge nodes, the limits gate, and last the request
pipeline that ties them together. Secrets are read here, from the environment variables config names.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

from redis.asyncio import Redis
from sqlalchemy.engine import Engine

from backends.base import Backend
from gateway.batch.execute import BatchTranslator, ItemRunner
from gateway.batch.placement import Placer
from gateway.batch.service import BatchService
from gateway.batch.worker import BatchWorker
from gateway.cache.policy import CacheStep
from gateway.cache.store import ResponseCache
from gateway.config import CloudBackendConfig, Config, EdgeBackendConfig
from gateway.edge.hub import EdgeHub
from gateway.edge.link import NodeTimeouts
from gateway.files.service import FileService, build_storage
from gateway.limits.base import BudgetRule
from gateway.limits.gate import Gate, QuotaStore
from gateway.live.gauges import DeploymentGauges
from gateway.live.state import RoutingState, build_specs
from gateway.live.sync import RoutingSync
from gateway.metrics import CapacityOf, GatewayMetrics
from gateway.pipeline.access import ModelAccess
from gateway.pipeline.dispatch import Dispatcher, RetrySettings
from gateway.pipeline.flow import Pipeline
from gateway.pipeline.plan import Planner
from gateway.pipeline.record import RecordSink
from gateway.reports.runner import ReportRunner
from gateway.services import Services
from gateway.services.backends import (
    build_backend,
    build_batch_prices,
    build_deployments,
    capacity_classes,
)
from gateway.services.shared import build_health, build_quota, build_redis, build_registry, build_relay
from gateway.store.batches import BatchStore
from gateway.store.db import make_engine, migrate
from gateway.store.files import FileStore
from gateway.store.journal import Journal, journal_tag
from gateway.store.keys import KeyStore, upsert_teams
from gateway.store.ledger import LedgerWriter
from gateway.store.responses import ResponsePruneJob, ResponseStore
from gateway.store.spend import spent_micro_usd
from gateway.store.upkeep import RollupJob
from gateway.telemetry.setup import build_tracer
from gateway.translate.openai_chat import ChatCompletions
from gateway.translate.openai_embeddings import Embeddings
from gateway.translate.openai_responses import Responses


def should_migrate(config: Config) -> bool:
    if config.database.auto_migrate is not None:
        return config.database.auto_migrate
    return config.database.url.startswith("sqlite")


def build_store(config: Config) -> tuple[Engine, LedgerWriter]:
    db_cfg = config.database
    if should_migrate(config):
        migrate(db_cfg.url, db_cfg.schema_name)
    engine = make_engine(db_cfg.url, db_cfg.schema_name)
    upsert_teams(engine, {name: team.models for name, team in config.teams.items()})
    ledger = LedgerWriter(
        engine,
        spill_path=db_cfg.spill_path,
        queue_max=db_cfg.queue_max,
        batch_max=db_cfg.batch_max,
        flush_interval_s=db_cfg.flush_interval_s,
        replay_interval_s=db_cfg.replay_interval_s,
        journal=build_journal(config) if db_cfg.journal else None,
    )
    return engine, ledger


def build_journal(config: Config) -> Journal:
    db_cfg = config.database
    return Journal(
        db_cfg.journal_dir,
        tag=journal_tag(db_cfg.url, db_cfg.schema_name),
        segment_bytes=db_cfg.journal_segment_bytes,
        fsync_interval_s=db_cfg.journal_fsync_interval_s,
    )


async def build_backends(config: Config) -> dict[str, Backend]:
    """The configured backends (edge backends have none of their own: their nodes come from the hub)."""
    backends: dict[str, Backend] = {}
    try:
        for name, bcfg in config.backends.items():
            if not isinstance(bcfg, EdgeBackendConfig):
                backends[name] = build_backend(name, bcfg)
    except BaseException:
        for b in backends.values():
            await b.aclose()
        raise
    return backends


def build_metrics(ledger: LedgerWriter, capacity_of: CapacityOf) -> GatewayMetrics:
    metrics = GatewayMetrics(capacity_of)
    gauges = (
        ("switchboard_ledger_queued", "Usage records waiting to be written", lambda: ledger.queued),
        ("switchboard_ledger_spilled", "Usage records spilled to file", lambda: ledger.spilled),
        ("switchboard_ledger_rejected", "Usage records the database refused", lambda: ledger.rejected),
        ("switchboard_ledger_lost", "Usage records that could not be kept", lambda: ledger.lost),
        (
            "switchboard_ledger_recovered",
            "Rows replayed from killed processes' journals",
            lambda: ledger.recovered,
        ),
        (
            "switchboard_ledger_journal_failed",
            "Usage records not written to the journal",
            lambda: ledger.journal_failed,
        ),
        (
            "switchboard_database_up",
            "1 while the ledger database is reachable",
            lambda: 0.0 if ledger.db_down else 1.0,
        ),
    )
    for name, doc, read in gauges:
        metrics.add_gauge(name, doc, read)
    metrics.add_runtime_gauges(asyncio.get_running_loop())
    return metrics


def build_edge(
    config: Config,
    engine: Engine,
    redis: Redis | None,
    routing: RoutingState,
    backends: dict[str, Backend],
    metrics: GatewayMetrics,
    replica_id: str,
) -> EdgeHub | None:
    if not config.edge_enabled:
        return None
    registry = build_registry(config, redis)
    relay = build_relay(config, redis, registry, replica_id)
    edge = EdgeHub(config, engine, registry, routing, backends, replica_id=replica_id, relay=relay)
    edge.start()
    metrics.add_gauge(
        "switchboard_edge_nodes_connected",
        "Edge nodes connected to this replica",
        lambda: float(len(edge.links)),
    )
    return edge


def build_routing_sync(
    config: Config, redis: Redis | None, routing: RoutingState, replica_id: str
) -> RoutingSync | None:
    if redis is None:
        return None
    rc = config.redis
    sync = RoutingSync(
        redis,
        routing,
        replica_id=replica_id,
        prefix=rc.prefix,
        interval_s=rc.routing_sync_s,
        timeout_s=rc.timeout_ms / 1000,
        retry_after_s=rc.retry_after_s,
    )
    sync.start()
    return sync


async def build_gate(config: Config, store: QuotaStore, engine: Engine, metrics: GatewayMetrics) -> Gate:
    def on_soft_limit(rule: BudgetRule, period: str, spent_micro_usd: int) -> None:
        metrics.budget_alerts.labels(rule.scope, period).inc()

    def spend(scope: str, period: str) -> int:
        return spent_micro_usd(engine, scope, period)

    gate = Gate(store, config, spend=spend, on_soft_limit=on_soft_limit)
    await gate.preload()
    return gate


def build_pipeline(
    config: Config,
    access: ModelAccess,
    routing: RoutingState,
    gate: Gate,
    cache: ResponseCache,
    dispatcher: Dispatcher,
    sink: RecordSink,
) -> Pipeline:
    return Pipeline(Planner(routing, access), gate, CacheStep(config, cache), dispatcher, sink)


def build_responses(config: Config, engine: Engine) -> tuple[ResponseStore, ResponsePruneJob]:
    """The `/v1/responses` store and the job that enforces responses.retention_days."""
    allows = {name: team.store_responses for name, team in config.teams.items()}
    store = ResponseStore(engine, config.responses, allows)
    prune = ResponsePruneJob(store, config.responses.prune_interval_s)
    prune.start()
    return store, prune


def build_batch_worker(
    config: Config,
    store: BatchStore,
    files: FileService,
    pipeline: Pipeline,
    routing: RoutingState,
    responses: ResponseStore,
    metrics: GatewayMetrics,
    replica_id: str,
) -> BatchWorker | None:
    """This replica's batch worker (every replica runs one; they share the work through SQL leases)."""
    if not config.batch.enabled:
        return None
    translators: dict[str, BatchTranslator] = {
        t.path: t for t in (ChatCompletions(), Responses(), Embeddings())
    }
    runner = ItemRunner(
        pipeline,
        translators,
        Placer(routing, config.batch),
        responses,
        timeout_s=config.server.request_timeout_s,
        max_attempts=config.batch.max_attempts,
    )
    worker = BatchWorker(store, files, runner, config.batch, owner=replica_id[:64])
    metrics.add_gauge(
        "switchboard_batch_items_queued", "Batch items waiting to run (all replicas)", lambda: worker.queued
    )
    metrics.add_gauge(
        "switchboard_batch_items_running", "Batch items running now (all replicas)", lambda: worker.running
    )
    worker.start()
    return worker


async def build_services(config: Config) -> Services:
    tracer = build_tracer(
        config.telemetry,
        {name: b.provider for name, b in config.backends.items() if isinstance(b, CloudBackendConfig)},
    )  # first: a missing `otel` extra stops the start before anything is opened
    engine, ledger = build_store(config)
    try:
        files = FileService(FileStore(engine), build_storage(config.files), config.files)
        backends = await build_backends(config)
    except BaseException:
        engine.dispose()
        raise
    ledger.start()
    metrics = build_metrics(ledger, capacity_classes(config))
    deployments = build_deployments(config, backends)
    routing = RoutingState(config, build_specs(config, backends, deployments))
    routing.start_pollers(time.monotonic)
    metrics.registry.register(DeploymentGauges(routing, time.perf_counter))  # the pipeline's clock
    health = build_health(config, backends, routing)
    redis = build_redis(config)
    store, cache = build_quota(config, redis)
    replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    edge = build_edge(config, engine, redis, routing, backends, metrics, replica_id)
    routing_sync = build_routing_sync(config, redis, routing, replica_id)
    gate = await build_gate(config, store, engine, metrics)
    rollup = RollupJob(engine, config.reports)
    rollup.start()
    responses, responses_prune = build_responses(config, engine)
    keys = KeyStore(engine, ttl_s=config.server.key_cache_ttl_s)
    server = config.server
    access = ModelAccess(
        keys, list(config.models), admin_key=os.environ.get(server.admin_key_env) or None,
        admin_key_env=server.admin_key_env,
    )  # fmt: skip
    timeouts = NodeTimeouts({name: b.timeout_s for name, b in config.backends.items()})
    retry = RetrySettings(
        server.request_timeout_s, config.routing.retry_backoff_s, config.routing.max_retry_wait_s
    )
    dispatcher = Dispatcher(backends if edge is None else edge.backends, timeouts, routing, retry)
    sink = RecordSink(ledger, metrics, build_batch_prices(config, deployments), tracer)
    pipeline = build_pipeline(config, access, routing, gate, cache, dispatcher, sink)
    batch_store = BatchStore(engine)
    worker = build_batch_worker(config, batch_store, files, pipeline, routing, responses, metrics, replica_id)
    return Services(
        config=config,
        db=engine,
        keys=keys,
        ledger=ledger,
        backends=backends,
        deployments=deployments,
        backend_timeouts_s=timeouts,
        metrics=metrics,
        routing=routing,
        gate=gate,
        cache=cache,
        access=access,
        pipeline=pipeline,
        reports=ReportRunner(
            max_concurrent=config.reports.max_concurrent,
            max_queued=config.reports.max_queued,
            timeout_s=config.reports.timeout_s,
        ),
        redis=redis,
        routing_sync=routing_sync,
        rollup=rollup,
        edge=edge,
        health=health,
        responses=responses,
        responses_prune=responses_prune,
        files=files,
        batches=BatchService(batch_store, files, config.batch),
        batch_worker=worker,
        tracer=tracer,
    )
