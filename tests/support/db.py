"""Database fixtures: each test gets a migrated SQLite file in tmp_path or its own PostgreSQL schema.

Import the fixtures explicitly in a test module (`from tests.support.db import db_target, engine`).
`db_target` is parametrized over both databases; `pg_target` is PostgreSQL only. `QueryLog` counts the
SQL statements an engine runs, through a SQLAlchemy event listener.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store.db import make_engine, migrate


def pg_url() -> str:
    return os.environ.get("SWITCHBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True, slots=True)
class DbTarget:
    kind: str  # "sqlite" | "postgresql"
    url: str
    schema: str | None

    def make_engine(self, url: str | None = None) -> Engine:
        """An engine on this target; `url` overrides the address (e.g. through a TCP proxy)."""
        return make_engine(url or self.url, self.schema)


def _sqlite_target(tmp_path: Path) -> DbTarget:
    return DbTarget("sqlite", f"sqlite:///{tmp_path / 'switchboard.db'}", None)


def _pg_schema() -> Iterator[DbTarget]:
    url = pg_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(url)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {url} (set SWITCHBOARD_TEST_PG_URL): {exc}")
    try:
        yield DbTarget("postgresql", url, schema)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbTarget]:
    """A fresh, not yet migrated database of each kind."""
    if request.param == "sqlite":
        yield _sqlite_target(tmp_path)
    else:
        yield from _pg_schema()


@pytest.fixture
def pg_target() -> Iterator[DbTarget]:
    yield from _pg_schema()


@pytest.fixture
def engine(db_target: DbTarget) -> Iterator[Engine]:
    """A migrated engine on `db_target`."""
    migrate(db_target.url, db_target.schema)
    eng = db_target.make_engine()
    yield eng
    eng.dispose()


@dataclass
class QueryLog:
    """Statements run on an engine since `attach` (thread-safe: lookups run in worker threads)."""

    statements: list[str] = field(default_factory=list)
    row_counts: list[int] = field(default_factory=list)  # parameter sets per statement (executemany)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, engine: Engine) -> QueryLog:
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)
        return self

    def detach(self, engine: Engine) -> None:
        sa.event.remove(engine, "before_cursor_execute", self._on_execute)

    def clear(self) -> None:
        with self._lock:
            self.statements.clear()
            self.row_counts.clear()

    def matching(self, fragment: str) -> list[str]:
        with self._lock:
            return [s for s in self.statements if fragment.lower() in s.lower()]

    def _on_execute(
        self, _conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool
    ) -> None:
        with self._lock:
            self.statements.append(statement)
            self.row_counts.append(len(params) if many else 1)
