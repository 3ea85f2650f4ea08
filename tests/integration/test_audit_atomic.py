"""Every admin write and its audit row commit together (SQLite and PostgreSQL): with the audit table gone,
each store write fails and leaves nothing behind; with it back, the same write lands with exactly one audit
row. The hooks are the ones the console, the `/admin` API and the CLI pass (gateway/store/audit.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.edge import tokens
from gateway.store import audit, keys, sessions
from gateway.store.db import api_keys, audit_log, console_sessions, edge_tokens, teams

NOW = dt.datetime(2031, 5, 1, 12, 0, tzinfo=dt.UTC)
ACTOR = audit.Actor("admin", audit.AuditSource.API, "10.0.0.9")


@contextmanager
def audit_table_gone(engine: Engine) -> Iterator[None]:
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_log RENAME TO audit_log_away")
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE audit_log_away RENAME TO audit_log")


def count(engine: Engine, table: sa.Table, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


def audit_rows(engine: Engine, action: str) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(audit_log).where(audit_log.c.action == action)))


def hook(action: str, target: Callable[[Any], str]) -> audit.Audited[Any]:
    return audit.writer(ACTOR, action, target, lambda _result: {"why": "test"})


def both_or_neither(engine: Engine, action: str, write: Callable[[], Any], landed: Callable[[], bool]) -> Any:
    """`write` fails without the audit table and changes nothing; then lands with one audit row."""
    with audit_table_gone(engine), pytest.raises(sa.exc.DBAPIError):
        write()
    assert not landed(), action
    result = write()
    assert landed(), action
    (row,) = audit_rows(engine, action)
    assert (row.actor, row.source, row.address, row.detail) == ("admin", "api", "10.0.0.9", {"why": "test"})
    return result


def test_team_and_key_writes_commit_with_their_audit_rows(engine: Engine) -> None:
    both_or_neither(
        engine,
        "team.create",
        lambda: keys.create_team(engine, "ops", None, audited=hook("team.create", lambda t: t.name)),
        lambda: count(engine, teams, teams.c.name == "ops") == 1,
    )
    created = both_or_neither(
        engine,
        "key.create",
        lambda: keys.create_key(
            engine,
            "ops",
            name="k",
            models=None,
            expires_at=None,
            audited=hook("key.create", lambda c: c.key_id),
        ),
        lambda: count(engine, api_keys, api_keys.c.team == "ops") == 1,
    )
    assert audit_rows(engine, "key.create")[0].target == created.key_id
    both_or_neither(
        engine,
        "key.revoke",
        lambda: keys.revoke_key(engine, created.display_prefix, audited=hook("key.revoke", lambda i: i)),
        lambda: count(engine, api_keys, api_keys.c.revoked_at.is_not(None)) == 1,
    )
    assert audit_rows(engine, "key.revoke")[0].target == created.key_id  # the id, also when revoked by prefix


def test_edge_token_and_session_writes_commit_with_their_audit_rows(engine: Engine) -> None:
    made = both_or_neither(
        engine,
        "edge_token.create",
        lambda: tokens.create_token(
            engine, name="line-2", audited=hook("edge_token.create", lambda c: c.info.token_id)
        ),
        lambda: count(engine, edge_tokens) == 1,
    )
    both_or_neither(
        engine,
        "edge_token.revoke",
        lambda: tokens.revoke_token(
            engine, made.info.token_id, audited=hook("edge_token.revoke", lambda i: i.token_id)
        ),
        lambda: count(engine, edge_tokens, edge_tokens.c.revoked_at.is_not(None)) == 1,
    )
    token, _ = both_or_neither(
        engine,
        "console.login",
        lambda: sessions.create(
            engine,
            role="admin",
            team=None,
            key_id=None,
            ttl_s=60,
            now=NOW,
            audited=hook("console.login", lambda s: "admin"),
        ),
        lambda: count(engine, console_sessions) == 1,
    )
    both_or_neither(
        engine,
        "console.logout",
        lambda: sessions.end(engine, token, hook("console.logout", lambda _h: "admin")),
        lambda: count(engine, console_sessions) == 0,
    )
