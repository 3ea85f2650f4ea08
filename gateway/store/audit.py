"""The audit log: one row per admin write, whoever made it (console, CLI, `/admin` API) and from where.

Invariant: a row names its target by id or name (a team, a key id, an edge token id) and never holds a key's
or a token's plaintext; `detail` carries the write's settings only. Functions are synchronous SQL (the
gateway runs them in a worker thread). A write's row goes in the write's own transaction (`writer`: the
store function calls it before committing), so no write commits without its audit row, nor a row without
its write.
"""

from __future__ import annotations

import datetime as dt
import getpass
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.store.db import audit_log

ADMIN_ACTOR = "admin"  # the admin key (it has no id of its own)
MAX_LISTED = 500
T = TypeVar("T")
# What a store write takes to audit itself: called with its open transaction and what it wrote.
Audited = Callable[[Connection, T], None]


class AuditSource(StrEnum):
    CONSOLE = "console"
    API = "api"
    CLI = "cli"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a write and from where: `name` is "admin", "key:<key id>" or "cli:<os user>"."""

    name: str
    source: AuditSource
    address: str  # the client's address, or "cli"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    entry_id: int
    at: dt.datetime
    actor: str
    source: str
    address: str
    action: str
    target: str
    detail: Mapping[str, Any] | None


def cli_actor() -> Actor:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without /etc/passwd entry)
        user = "unknown"
    return Actor(f"cli:{user}"[:64], AuditSource.CLI, "cli")


def writer(
    actor: Actor,
    action: str,
    target: Callable[[T], str],
    detail: Callable[[T], Mapping[str, Any] | None] | None = None,
) -> Audited[T]:
    """The hook a store write (keys, edge tokens, sessions) calls inside its transaction with what it wrote:
    it adds the audit row naming `target(result)`, with `detail(result)`."""

    def write_row(conn: Connection, result: T) -> None:
        write(conn, actor, action, target(result), None if detail is None else detail(result))

    return write_row


def write(
    conn: Connection,
    actor: Actor,
    action: str,
    target: str,
    detail: Mapping[str, Any] | None = None,
    *,
    now: dt.datetime | None = None,
) -> None:
    """One audit row, in the caller's transaction."""
    conn.execute(
        audit_log.insert().values(
            at=now or dt.datetime.now(dt.UTC),
            actor=actor.name[:64],
            source=str(actor.source),
            address=actor.address[:64],
            action=action[:64],
            target=target[:200],
            detail=dict(detail) if detail else None,
        )
    )


def record(
    engine: Engine,
    actor: Actor,
    action: str,
    target: str,
    detail: Mapping[str, Any] | None = None,
    *,
    now: dt.datetime | None = None,
) -> None:
    """An audit row in a transaction of its own (for an action that writes nothing else)."""
    with engine.begin() as conn:
        write(conn, actor, action, target, detail, now=now)


def list_entries(
    engine: Engine, *, limit: int = 100, before_id: int | None = None, action: str | None = None
) -> list[AuditEntry]:
    """Newest first; `before_id` pages back."""
    a = audit_log.c
    stmt = sa.select(audit_log).order_by(a.id.desc()).limit(max(1, min(limit, MAX_LISTED)))
    if before_id is not None:
        stmt = stmt.where(a.id < before_id)
    if action:
        stmt = stmt.where(a.action == action)
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [AuditEntry(r["id"], r["at"], r["actor"], r["source"], r["address"], *_what(r)) for r in rows]


def _what(r: sa.RowMapping) -> tuple[str, str, Mapping[str, Any] | None]:
    return r["action"], r["target"], r["detail"]
