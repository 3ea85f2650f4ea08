"""The narrow dependencies of the HTTP routers: each gets what it uses, never the whole `Services`.

Built once in the app's lifespan (`http.app.create_app`) from `Services`, which still owns every lifetime.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine
from starlette.requests import HTTPConnection

from gateway.batch.service import BatchService
from gateway.config import Config
from gateway.edge.hub import EdgeHub
from gateway.files.service import FileService
from gateway.limits.base import Limiter
from gateway.live.state import RoutingState
from gateway.pipeline.access import ModelAccess
from gateway.reports.runner import ReportRunner
from gateway.services import Services
from gateway.store.keys import KeyStore
from gateway.store.responses import ResponseStore


@dataclass(frozen=True, slots=True)
class ReportDeps:
    """`/v1/usage` and `/admin/reports/*`."""

    access: ModelAccess
    db: Engine
    config: Config  # reports.* settings; savings read backend prices from it
    runner: ReportRunner
    limiter: Limiter  # report calls per key


@dataclass(frozen=True, slots=True)
class AdminDeps:
    """`/admin/...` teams, keys, route explanations and reports."""

    access: ModelAccess
    db: Engine
    keys: KeyStore
    config: Config
    routing: RoutingState
    reports: ReportDeps


@dataclass(frozen=True, slots=True)
class EdgeNodeDeps:
    """`/v1/edge/connect` and `/admin/edge/...`."""

    access: ModelAccess
    db: Engine
    config: Config
    edge: EdgeHub | None


@dataclass(frozen=True, slots=True)
class ResponseDeps:
    """`GET`/`DELETE /v1/responses/{id}` and its input items (the POST is a translator)."""

    access: ModelAccess
    store: ResponseStore


@dataclass(frozen=True, slots=True)
class FileDeps:
    """`/v1/files`."""

    access: ModelAccess
    files: FileService


@dataclass(frozen=True, slots=True)
class BatchDeps:
    """`/v1/batches`."""

    access: ModelAccess
    batches: BatchService


@dataclass(frozen=True, slots=True)
class RouterDeps:
    reports: ReportDeps
    admin: AdminDeps
    edge: EdgeNodeDeps
    responses: ResponseDeps
    files: FileDeps
    batches: BatchDeps

    @classmethod
    def of(cls, svc: Services) -> RouterDeps:
        reports = ReportDeps(svc.access, svc.db, svc.config, svc.reports, svc.gate.store)
        admin = AdminDeps(svc.access, svc.db, svc.keys, svc.config, svc.routing, reports)
        edge = EdgeNodeDeps(svc.access, svc.db, svc.config, svc.edge)
        files = FileDeps(svc.access, svc.files)
        batches = BatchDeps(svc.access, svc.batches)
        return cls(reports, admin, edge, ResponseDeps(svc.access, svc.responses), files, batches)


def router_deps(conn: HTTPConnection) -> RouterDeps:
    deps: RouterDeps = conn.app.state.router_deps
    return deps
