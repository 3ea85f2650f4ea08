"""The replicas rig as fixtures: three `switchboard serve` processes sharing Redis and PostgreSQL.

One session starts the fake provider (its own process), migrates one PostgreSQL schema (dropped at the end)
and starts the replicas under a Redis prefix of their own (deleted at the end). Each test uses teams of its
own (all in `TEAMS`), so counters never collide. When a test fails, the replicas' log lines written during
it are attached to the report.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests.support.replica_rig import ENV, TEAMS, UPSTREAM_TTFT_MS, Rig, gateway_config, warm_up
from tests.support.replicas import FakeUpstream, GatewayReplicas, pg_schema
from tests.support.services import PG_URL, REDIS_URL, delete_prefix


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replicas")


@pytest.fixture(scope="session")
def upstream(workdir: Path) -> Iterator[FakeUpstream]:
    fake = FakeUpstream(workdir).spawn()
    try:
        fake.wait_ready()
        for name, ttft_ms in UPSTREAM_TTFT_MS.items():
            fake.configure(name, ttft_ms=ttft_ms, n_tokens=8)
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="session")
def pg(upstream: FakeUpstream) -> Iterator[tuple[str, Engine]]:
    with pg_schema(PG_URL, {name: ["*"] for name in TEAMS}) as (schema, engine):
        yield schema, engine


@pytest.fixture(scope="session")
def rig(workdir: Path, upstream: FakeUpstream, pg: tuple[str, Engine]) -> Iterator[Rig]:
    """Three replicas on the shared Redis under a prefix of their own, warmed up. Timeouts are generous:
    this rig tests exactness, not outages, and on a busy machine a cold replica's burst of new Redis
    connections can outlast the default 200 ms connect timeout and fail closed."""
    schema, engine = pg
    prefix = f"test:replicas:{uuid.uuid4().hex[:12]}:"
    config = gateway_config(
        upstream.base_url, schema, REDIS_URL, prefix, timeout_ms=2000, connect_timeout_ms=5000
    )
    replicas = GatewayReplicas(config, workdir, n=3, name="main", env=ENV).start()
    try:
        built = Rig(replicas, engine, upstream, schema, prefix)
        asyncio.run(warm_up(built))
        yield built
    finally:
        replicas.stop()
        delete_prefix(REDIS_URL, prefix)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Rig):
            value.replicas.mark()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Rig):
                report.sections.append(
                    (f"gateway logs during the test ({name})", value.replicas.logs_since_mark())
                )
