"""Edge enrollment tokens: create (plaintext shown once), list, revoke, look up, and check usability.

A token is `sbe_` + 43 URL-safe characters (256 random bits), so it can never pass for a team key (`sk-sb-`).
Only its sha256 is stored, next to a short public id, a name, labels and an expiry. The labels a token carries
override those its nodes report (an admin scopes a token to `site=plant-7`). Functions are synchronous SQL
(for the CLI; the gateway runs them in a worker thread); `states` answers for many tokens in one query.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.errors import InvalidRequest
from gateway.store.audit import Audited
from gateway.store.db import edge_tokens
from gateway.store.keys import has_secret_shape, hash_key, new_secret

TOKEN_PREFIX = "sbe_"
ID_PREFIX = "et_"
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_LABELS = 32
CREATE_HINT = "new one: `switchboard edge token create`"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    token_id: str
    name: str
    labels: Mapping[str, str]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None

    def problem(self, now: dt.datetime) -> str | None:
        """Why a node may not use this token now (None: it may), naming what to do about it."""
        if self.revoked_at is not None:
            return f"edge token {self.token_id} was revoked ({CREATE_HINT})"
        if self.expires_at is not None and self.expires_at <= now:
            expired = self.expires_at.isoformat(timespec="seconds")
            return f"edge token {self.token_id} expired at {expired} ({CREATE_HINT})"
        return None


@dataclass(frozen=True, slots=True)
class CreatedToken:
    """A new token. `plaintext` exists only here: show it once, it cannot be recovered."""

    info: TokenInfo
    plaintext: str


hash_token = hash_key  # tokens are stored as API keys are: the SHA-256 hex of the plaintext


def looks_like_token(plaintext: str) -> bool:
    """A cheap shape check, so garbage never reaches the database."""
    return has_secret_shape(plaintext, TOKEN_PREFIX)


MAX_DURATION_S = 10 * 366 * 86_400


def parse_duration_s(text: str, *, param: str = "expires_in") -> float:
    """`90s`, `30m`, `12h`, `7d`, `2w` -> seconds (positive)."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise InvalidRequest(
            f"{param}: `{text}` is not a duration; use a number and a unit, e.g. 30m, 12h, 7d or 2w",
            param=param,
        )
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > MAX_DURATION_S:
        raise InvalidRequest(
            f"{param}: `{text}` is longer than 10 years; use a shorter duration, or no expiry", param=param
        )
    return seconds


def parse_labels(pairs: Collection[str], *, param: str = "label") -> dict[str, str]:
    """`["site=plant-7", "region=eu"]` -> {"site": "plant-7", "region": "eu"}."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidRequest(f"{param}: `{pair}` is not key=value (e.g. site=plant-7)", param=param)
        labels[key.strip()] = value.strip()
    return check_labels(labels, param=param)


def check_labels(labels: Mapping[str, str], *, param: str = "labels") -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"{param}: at most {MAX_LABELS} labels", param=param)
    for key, value in labels.items():
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise InvalidRequest(
                f"{param}: label `{key}` = `{value}` is not allowed (keys: letters, digits, '_', '.', '-'; "
                "values: the same plus ':' and '/', 1-128 characters)",
                param=param,
            )
    return dict(labels)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _info(row: sa.Row[tuple[object, ...]]) -> TokenInfo:
    m = row._mapping
    return TokenInfo(
        token_id=m["id"],
        name=m["name"],
        labels=MappingProxyType(dict(m["labels"] or {})),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
    )


def create_token(
    engine: Engine,
    *,
    name: str,
    labels: Mapping[str, str] | None = None,
    expires_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
    audited: Audited[CreatedToken] | None = None,
) -> CreatedToken:
    """A new enrollment token; `audited` writes the audit row in the same transaction."""
    now = now or _utcnow()
    if not name.strip() or len(name) > 200:
        raise InvalidRequest(
            "name: give the token a name of 1-200 characters (e.g. plant-7-line-2)", param="name"
        )
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidRequest(
                "expires_at needs a timezone (e.g. 2030-01-01T00:00:00Z)", param="expires_at"
            )
        if expires_at <= now:
            raise InvalidRequest(f"expires_at {expires_at.isoformat()} is in the past", param="expires_at")
    checked = check_labels(labels or {})
    plaintext = new_secret(TOKEN_PREFIX)
    token_id = ID_PREFIX + secrets.token_hex(6)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(edge_tokens).values(
                id=token_id,
                token_hash=hash_token(plaintext),
                name=name,
                labels=checked,
                created_at=now,
                expires_at=expires_at,
            )
        )
        info = TokenInfo(token_id, name, MappingProxyType(checked), now, expires_at, None)
        created = CreatedToken(info, plaintext)
        if audited is not None:
            audited(conn, created)
    return created


def list_tokens(engine: Engine) -> list[TokenInfo]:
    query = sa.select(edge_tokens).order_by(edge_tokens.c.created_at, edge_tokens.c.id)
    with engine.connect() as conn:
        return [_info(r) for r in conn.execute(query)]


def revoke_token(
    engine: Engine,
    token_id: str,
    *,
    now: dt.datetime | None = None,
    audited: Audited[TokenInfo] | None = None,
) -> TokenInfo | None:
    """Revoke by id; idempotent (the first revocation time is kept). None when no token has that id.
    `audited` writes the audit row in the same transaction when the token exists."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(edge_tokens)
            .where(edge_tokens.c.id == token_id, edge_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now or _utcnow())
        )
        row = conn.execute(sa.select(edge_tokens).where(edge_tokens.c.id == token_id)).first()
        info = None if row is None else _info(row)
        if info is not None and audited is not None:
            audited(conn, info)
    return info


def lookup_token(engine: Engine, plaintext: str) -> TokenInfo | None:
    """The token with this plaintext (maybe revoked or expired: see `TokenInfo.problem`), or None."""
    if not looks_like_token(plaintext):
        return None
    query = sa.select(edge_tokens).where(edge_tokens.c.token_hash == hash_token(plaintext))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else _info(row)


def states(engine: Engine, token_ids: Collection[str]) -> dict[str, TokenInfo]:
    """The tokens with these ids, in one query; a deleted token is simply absent."""
    if not token_ids:
        return {}
    query = sa.select(edge_tokens).where(edge_tokens.c.id.in_(sorted(set(token_ids))))
    with engine.connect() as conn:
        return {info.token_id: info for info in map(_info, conn.execute(query))}
