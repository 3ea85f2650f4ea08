"""A live gateway (uvicorn) in front of the loopback fake provider, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, Gateway, gateway_config, plant
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.services import PG_URL


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


def _serve(fake: FakeProvider, db: dict[str, Any]) -> Iterator[Gateway]:
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    config = gateway_config(fake.base_url, db)
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url, config.database.schema_name)
        try:
            gw = Gateway(server.base_url, config, engine, fake)
            plant(gw)  # the log scan's planted prompt text, through paths that log and fail
            yield gw
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw-sqlite")
    yield from _serve(fake, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "spill.jsonl")})


@pytest.fixture(scope="session")
def pg_gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gw-pg")
    schema = "api_" + uuid.uuid4().hex[:10]
    db = {"url": PG_URL, "schema_name": schema, "auto_migrate": True, "spill_path": str(tmp / "spill.jsonl")}
    try:
        yield from _serve(fake, db)
    finally:
        with sa.create_engine(PG_URL).begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_gateway(request: pytest.FixtureRequest) -> Gateway:
    gw: Gateway = request.getfixturevalue("gateway" if request.param == "sqlite" else "pg_gateway")
    return gw
