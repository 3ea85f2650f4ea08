"""Database fixtures, a pytest plugin (tests/conftest.py loads it, so test modules import none of them).

`alembic upgrade head` runs once per session per database kind: into a SQLite file, and into a PostgreSQL
database of its own (dropped at the end). Each test that wants a migrated database gets its own copy: the file
copied into its tmp_path, or a PostgreSQL database cloned from the migrated one (`CREATE DATABASE ...
TEMPLATE`, tens of milliseconds against most of a second for the migrations).

- `migrated_target`: a migrated database of each kind (`migrated_pg_target`: PostgreSQL only);
  `engine` is an engine on it.
- `db_target`: a fresh, not yet migrated database of each kind (`pg_target`: PostgreSQL only; a schema of
  its own in the test database), for tests of the migrations themselves.

PostgreSQL cases are marked `postgres`; when the server is down they fail, never skip (README).
`QueryLog` counts the SQL statements an engine runs, through a SQLAlchemy event listener.
"""

from __future__ import annotations

import shutil
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
from tests.support.services import PG_URL

MIGRATED_SCHEMA = "sb"  # the schema migrations run into, in the template database and so in every clone
PG_PARAM = pytest.param("postgresql", marks=pytest.mark.postgres)


@dataclass(frozen=True, slots=True)
class DbTarget:
    kind: str  # "sqlite" | "postgresql"
    url: str
    schema: str | None

    def make_engine(self, url: str | None = None) -> Engine:
        """An engine on this target; `url` overrides the address (e.g. through a TCP proxy)."""
        return make_engine(url or self.url, self.schema)


def _sqlite_target(directory: Path) -> DbTarget:
    return DbTarget("sqlite", f"sqlite:///{directory / 'switchboard.db'}", None)


def _pg_admin() -> Engine:
    """An autocommit engine on the test database; fails the test (never skips) when PostgreSQL is down."""
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_URL}: {exc}\nStart it (README, Quickstart) or point "
            'SWITCHBOARD_TEST_PG_URL at one; to run without it, leave the tier out: -m "not postgres".',
            pytrace=False,
        )
    return admin


def _database_url(name: str) -> str:
    return sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def _pg_schema() -> Iterator[DbTarget]:
    """A schema of its own in the test database, not migrated; dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    try:
        yield DbTarget("postgresql", PG_URL, schema)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def _pg_clone(template: str) -> Iterator[DbTarget]:
    """A database of its own, cloned from the migrated `template`; dropped afterwards."""
    name = f"sb_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield DbTarget("postgresql", _database_url(name), MIGRATED_SCHEMA)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per session; tests get copies."""
    target = _sqlite_target(tmp_path_factory.mktemp("migrated-sqlite"))
    migrate(target.url)
    return Path(sa.make_url(target.url).database or "")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """The name of a PostgreSQL database migrated once per session; tests get clones. Nothing stays
    connected to it (CREATE DATABASE ... TEMPLATE needs that)."""
    name = f"sb_template_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        migrate(_database_url(name), MIGRATED_SCHEMA)
        yield name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def migrated_copy(request: pytest.FixtureRequest, kind: str, directory: Path) -> Iterator[DbTarget]:
    """A migrated database of `kind` for one test (or module): a copy of the session's migrated one.
    `directory` holds the SQLite copy."""
    if kind == "sqlite":
        target = _sqlite_target(directory)
        shutil.copyfile(request.getfixturevalue("sqlite_template"), directory / "switchboard.db")
        yield target
    else:
        yield from _pg_clone(request.getfixturevalue("pg_template"))


@pytest.fixture(params=["sqlite", PG_PARAM])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbTarget]:
    """A fresh, not yet migrated database of each kind."""
    if request.param == "sqlite":
        yield _sqlite_target(tmp_path)
    else:
        yield from _pg_schema()


@pytest.fixture
def pg_target() -> Iterator[DbTarget]:
    """A fresh, not yet migrated PostgreSQL schema (the test is marked `postgres` by tests/conftest.py)."""
    yield from _pg_schema()


@pytest.fixture(params=["sqlite", PG_PARAM])
def migrated_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbTarget]:
    """A migrated database of each kind, this test's own."""
    yield from migrated_copy(request, request.param, tmp_path)


@pytest.fixture
def migrated_pg_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbTarget]:
    """A migrated PostgreSQL database, this test's own (marked `postgres` by tests/conftest.py)."""
    yield from migrated_copy(request, "postgresql", tmp_path)


@pytest.fixture
def engine(migrated_target: DbTarget) -> Iterator[Engine]:
    """An engine on `migrated_target`."""
    eng = migrated_target.make_engine()
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
