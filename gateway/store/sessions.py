"""Console login sessions, stored in SQL so every replica and worker process sees them.

Invariant: only the SHA-256 of a session's cookie value is stored (a database reader cannot log in); a
session past `expires_at` is never returned, and a team session whose key has been revoked or has expired
is not either (revoking a key ends its console sessions at once). Synchronous SQL: run in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store.audit import Audited
from gateway.store.db import api_keys, console_sessions
from gateway.store.keys import hash_key

ADMIN_ROLE = "admin"
TEAM_ROLE = "team"


@dataclass(frozen=True, slots=True)
class Session:
    role: str  # admin | team
    team: str | None  # a team session's team
    key_id: str | None
    csrf_token: str
    expires_at: dt.datetime

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN_ROLE

    @property
    def actor(self) -> str:
        return "admin" if self.is_admin else f"key:{self.key_id}"


def create(
    engine: Engine,
    *,
    role: str,
    team: str | None,
    key_id: str | None,
    ttl_s: float,
    now: dt.datetime,
    audited: Audited[Session] | None = None,
) -> tuple[str, Session]:
    """A new session: (the cookie's value, shown to the browser only, and the session); `audited` writes
    the login's audit row in the same transaction."""
    token = secrets.token_urlsafe(32)
    session = Session(role, team, key_id, secrets.token_urlsafe(32), now + dt.timedelta(seconds=ttl_s))
    with engine.begin() as conn:
        conn.execute(console_sessions.delete().where(console_sessions.c.expires_at <= now))
        conn.execute(
            console_sessions.insert().values(
                token_hash=hash_key(token),
                role=role,
                team=team,
                key_id=key_id,
                csrf_token=session.csrf_token,
                created_at=now,
                expires_at=session.expires_at,
            )
        )
        if audited is not None:
            audited(conn, session)
    return token, session


def lookup(engine: Engine, token: str, *, now: dt.datetime) -> Session | None:
    """The live session `token` opens, else None (unknown, expired, or its key revoked or expired)."""
    s, k = console_sessions.c, api_keys.c
    stmt = (
        sa.select(s.role, s.team, s.key_id, s.csrf_token, s.expires_at, k.revoked_at)
        .add_columns(k.expires_at.label("kx"))
        .select_from(console_sessions.outerjoin(api_keys, api_keys.c.id == s.key_id))
        .where(s.token_hash == hash_key(token), s.expires_at > now)
    )
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None:
        return None
    if row.role != ADMIN_ROLE and (row.revoked_at is not None or (row.kx is not None and row.kx <= now)):
        return None
    return Session(row.role, row.team, row.key_id, row.csrf_token, row.expires_at)


def end(engine: Engine, token: str, audited: Audited[str] | None = None) -> None:
    """Log out: the session is deleted, and `audited` (given the token's hash) writes its audit row in the
    same transaction."""
    with engine.begin() as conn:
        conn.execute(console_sessions.delete().where(console_sessions.c.token_hash == hash_key(token)))
        if audited is not None:
            audited(conn, hash_key(token))
