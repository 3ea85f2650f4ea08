"""Engine construction (SQLite WAL and busy timeout; PostgreSQL connect and keepalive timeouts, a schema
through `search_path`) and Alembic migrations (`migrate`: `alembic upgrade head`, idempotent).

Invariant: a schema name is a plain lower-case identifier before it reaches `search_path` or DDL.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Engine

SQLITE_BUSY_TIMEOUT_MS = 5_000
PG_CONNECT_TIMEOUT_S = 3
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(schema: str) -> str:
    """Schema names go into `search_path` and DDL, so only plain lower-case identifiers are accepted."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema {schema!r} is not a plain identifier (use lower-case letters, digits, _)")
    return schema


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str, schema: str | None = None) -> Engine:
    """A sync engine. SQLite: WAL, busy timeout, usable from worker threads. PostgreSQL: fails fast when
    the server cannot be reached (connect timeout, TCP user timeout, keepalives) and pings pooled
    connections before use, so a restarted server costs no request."""
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        if schema is not None:
            raise ValueError("a schema can only be given for PostgreSQL URLs")
        engine = sa.create_engine(
            sa_url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    connect_args: dict[str, Any] = {}
    if sa_url.get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
            "tcp_user_timeout": 15_000,  # ms: a black-holed server errors instead of hanging a thread
        }
        if schema is not None:
            connect_args["options"] = f"-csearch_path={check_schema_name(schema)}"
    elif schema is not None:
        raise ValueError("a schema can only be given for PostgreSQL URLs")
    return sa.create_engine(sa_url, pool_pre_ping=True, connect_args=connect_args)


def migrations_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str, schema: str | None = None) -> AlembicConfig:
    """An Alembic config built in code; `migrations/env.py` reads the URL and schema from it."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolates `%`, which URL-encoded passwords contain.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if schema is not None:
        cfg.set_main_option("switchboard.schema", check_schema_name(schema))
    return cfg


def migrate(url: str, schema: str | None = None) -> None:
    """`alembic upgrade head`; idempotent. Creates the PostgreSQL `schema` first when one is given."""
    if schema is not None:
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{check_schema_name(schema)}"')
        finally:
            engine.dispose()
    command.upgrade(alembic_config(url, schema), "head")
