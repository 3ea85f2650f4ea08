"""A live gateway (uvicorn) in front of the loopback fake provider, on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.config import Config, parse_config
from gateway.http.app import create_app
from gateway.store import keys
from gateway.store.db import make_engine
from tests.conftest import PG_URL
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.usage import wait_for_usage_row

ADMIN_KEY = "admin-" + uuid.uuid4().hex
FAKE_UPSTREAM_KEY = "sk-fake-upstream-" + uuid.uuid4().hex

# Upstream model names on the fake provider, one per behaviour, so tests never share knobs.
FAST_MODELS = ("fast", "m429", "m500", "m401", "mhang", "mcut", "mslow")


def gateway_config(fake_root: str, db: dict[str, Any]) -> Config:
    fake_v1 = fake_root + "/v1"
    models: dict[str, Any] = {
        name: {"backend": "fakeoai", "input_usd_per_mtok": "1.5", "output_usd_per_mtok": "6"}
        for name in FAST_MODELS
    }
    models["mhang"]["backend"] = "fakeshort"
    models["notools"] = {"backend": "notools", "upstream_model": "fast"}
    models["cloud-gpt"] = {
        "backend": "cloud_openai",
        "upstream_model": "gpt-4o-mini",
        "input_usd_per_mtok": "0.15",
        "output_usd_per_mtok": "0.60",
    }
    models["cloud-claude"] = {
        "backend": "cloud_anthropic",
        "upstream_model": "claude-haiku-4-5",
    }
    return parse_config(
        {
            "server": {"admin_key_env": "SB_TEST_ADMIN_KEY", "key_cache_ttl_s": 0.5, "max_body_bytes": 65536},
            "database": {"flush_interval_s": 0.02, "replay_interval_s": 0.2, **db},
            "backends": {
                "fakeoai": {"kind": "openai", "base_url": fake_v1, "api_key_env": "SB_TEST_FAKE_KEY"},
                "fakeshort": {"kind": "openai", "base_url": fake_v1, "timeout_s": 0.5},
                "notools": {
                    "kind": "openai",
                    "base_url": fake_v1,
                    "supports_tools": False,
                    "supports_response_format": False,
                },
                "cloud_openai": {
                    "kind": "cloud",
                    "provider": "openai",
                    "api_base": fake_v1,
                    "api_key_env": "SB_TEST_FAKE_KEY",
                    "timeout_s": 10,
                },
                "cloud_anthropic": {
                    "kind": "cloud",
                    "provider": "anthropic",
                    "api_base": fake_root,
                    "api_key_env": "SB_TEST_FAKE_KEY",
                    "timeout_s": 10,
                },
            },
            "models": models,
            "teams": {"alpha": {"models": ["*"]}, "beta": {"models": ["fast", "cloud-gpt"]}},
            # Error-injection tests fail the same deployments again and again; circuits have their own tests.
            "routing": {"breaker_failures": 1_000_000},
        }
    )


@dataclass
class Gateway:
    base_url: str
    config: Config
    db: Engine
    fake: FakeProvider

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def key(self, team: str = "alpha", **kwargs: Any) -> str:
        kwargs.setdefault("name", "test")
        kwargs.setdefault("models", None)
        kwargs.setdefault("expires_at", None)
        return keys.create_key(self.db, team, **kwargs).plaintext

    def usage_row(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The ledger row for a request, once the writer has flushed it."""
        return wait_for_usage_row(self.db, request_id, timeout_s)

    def count_rows(self, request_id: str) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM usage WHERE request_id = :r"), {"r": request_id}
                ).scalar()
            )


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
            yield Gateway(server.base_url, config, engine, fake)
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


@pytest.fixture(params=["sqlite", "postgresql"])
def any_gateway(request: pytest.FixtureRequest) -> Gateway:
    gw: Gateway = request.getfixturevalue("gateway" if request.param == "sqlite" else "pg_gateway")
    return gw


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
