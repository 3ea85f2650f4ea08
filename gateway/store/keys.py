"""Per-team API keys: generation, admin operations (sync, for the CLI) and the cached `KeyStore`.

Only the sha256 of a key is stored; the plaintext is shown once, in `CreatedKey`. `KeyStore.resolve` answers
from memory: valid keys are cached for `ttl_s`, unknown keys for `NEGATIVE_TTL_S` (bounded), and concurrent
lookups of one key share one query. So a key revoked by another process keeps working there for up to
`ttl_s`; `KeyStore.invalidate` makes a revoke in this process take effect at once. While the database is
unreachable, keys already cached keep resolving (stale) and unknown ones raise ServiceUnavailable. Revoked
and expired keys resolve to a `KeyIdentity` carrying their flags; `check_usable` turns those into errors.
A key's own rate limits and budget are stored here and travel in its `KeyIdentity`; gateway/limits enforces.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, ServiceUnavailable
from gateway.records import KeyBudget, KeyIdentity
from gateway.store.audit import Audited
from gateway.store.db import api_keys, teams
from gateway.store.spend import micro_to_usd_text

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-sb-"
KEY_RANDOM_CHARS = 43  # secrets.token_urlsafe(32): 32 random bytes in unpadded base64url
DISPLAY_PREFIX_CHARS = 12
NEGATIVE_TTL_S = 1.0
NEGATIVE_CACHE_MAX = 10_000
MAX_CONCURRENT_LOOKUPS = 4
ALL_MODELS = "*"
MAX_KEY_LIMIT = 2**31 - 1  # api_keys.limit_* are 32-bit INTEGER columns
MAX_BUDGET_MICRO_USD = 2**63 - 1  # BIGINT
_KEY_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")


@dataclass(frozen=True, slots=True)
class TeamInfo:
    name: str
    models: tuple[str, ...] | None  # None: every configured model
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    team: str
    name: str
    display_prefix: str
    models: tuple[str, ...] | None  # None: whatever the team allows
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    limit_requests: int | None = None
    limit_tokens: int | None = None
    budget: KeyBudget | None = None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key. `plaintext` exists only here: show it once, it cannot be recovered."""

    key_id: str
    team: str
    name: str
    display_prefix: str
    plaintext: str
    models: tuple[str, ...] | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    limit_requests: int | None = None
    limit_tokens: int | None = None
    budget: KeyBudget | None = None


def hash_key(plaintext: str) -> str:
    """What the database stores of a secret (API keys and edge enrollment tokens alike)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def new_secret(prefix: str) -> str:
    """`prefix` + 256 random bits in unpadded base64url: the shape `has_secret_shape` accepts."""
    return prefix + secrets.token_urlsafe(32)


def has_secret_shape(plaintext: str, prefix: str) -> bool:
    """A cheap shape check of a `new_secret(prefix)`, so garbage never reaches the database or the caches."""
    body = plaintext[len(prefix) :]
    return (
        plaintext.startswith(prefix)
        and len(body) == KEY_RANDOM_CHARS
        and all(c in _KEY_ALPHABET for c in body)
    )


def generate_key() -> tuple[str, str, str]:
    """(plaintext, sha256 hex, display prefix) for a fresh `sk-sb-...` key with 256 random bits."""
    plaintext = new_secret(KEY_PREFIX)
    return plaintext, hash_key(plaintext), plaintext[:DISPLAY_PREFIX_CHARS]


def looks_like_key(plaintext: str) -> bool:
    return has_secret_shape(plaintext, KEY_PREFIX)


def check_usable(identity: KeyIdentity, *, now: dt.datetime) -> None:
    """Raise `AuthenticationFailed` for a revoked or expired key, with a message saying which."""
    if identity.revoked:
        raise AuthenticationFailed(
            f"API key {identity.display_prefix}... has been revoked "
            "(ask an admin for a new one: `switchboard keys create`)"
        )
    if identity.expires_at is not None and identity.expires_at <= now:
        raise AuthenticationFailed(
            f"API key {identity.display_prefix}... expired at {identity.expires_at.isoformat()} "
            "(ask an admin for a new one: `switchboard keys create`)"
        )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _models_column(models: Sequence[str] | None) -> list[str] | None:
    if models is None or ALL_MODELS in models:
        return None
    return sorted(set(models))


def _models_tuple(value: object) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)  # type: ignore[arg-type]


def _check_team_name(name: str) -> None:
    if not (1 <= len(name) <= 64 and all(c in _NAME_CHARS for c in name)):
        raise InvalidRequest(
            f"team name {name!r} is not allowed (use 1-64 letters, digits, '-', '_' or '.')", param="name"
        )


def create_team(
    engine: Engine,
    name: str,
    models: list[str] | None,
    *,
    now: dt.datetime | None = None,
    audited: Audited[TeamInfo] | None = None,
) -> TeamInfo:
    """A new team; `models` None (or containing "*") allows every configured model. `audited` writes the
    audit row in the same transaction (gateway/store/audit.py)."""
    _check_team_name(name)
    if models is not None and not models:
        raise InvalidRequest(
            f"team `{name}` would allow no model (name at least one, or omit models to allow all)",
            param="models",
        )
    created_at = now or _utcnow()
    column = _models_column(models)
    info = TeamInfo(name, _models_tuple(column), created_at)
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(teams).values(name=name, models=column, created_at=created_at))
            if audited is not None:
                audited(conn, info)
    except IntegrityError as exc:
        raise InvalidRequest(
            f"team `{name}` already exists (see `switchboard teams list`)", param="name"
        ) from exc
    return info


def list_teams(engine: Engine) -> list[TeamInfo]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(teams).order_by(teams.c.name)).all()
    return [TeamInfo(r.name, _models_tuple(r.models), r.created_at) for r in rows]


def upsert_teams(
    engine: Engine, config_teams: Mapping[str, list[str]], *, now: dt.datetime | None = None
) -> None:
    """Make SQL agree with the config's teams (insert or update models). Teams absent from the config are
    left alone: they may have been created with `switchboard teams create`."""
    created_at = now or _utcnow()
    with engine.begin() as conn:
        existing = {r.name: r.models for r in conn.execute(sa.select(teams.c.name, teams.c.models))}
        for name, models in config_teams.items():
            column = _models_column(models)
            if name not in existing:
                _check_team_name(name)
                conn.execute(sa.insert(teams).values(name=name, models=column, created_at=created_at))
            elif existing[name] != column:
                conn.execute(sa.update(teams).where(teams.c.name == name).values(models=column))


def _team_models(conn: sa.Connection, team: str) -> tuple[bool, list[str] | None]:
    row = conn.execute(sa.select(teams.c.models).where(teams.c.name == team)).first()
    return (row is not None, None if row is None else row.models)


def create_key(
    engine: Engine,
    team: str,
    *,
    name: str,
    models: list[str] | None,
    expires_at: dt.datetime | None,
    now: dt.datetime | None = None,
    limit_requests: int | None = None,
    limit_tokens: int | None = None,
    budget: KeyBudget | None = None,
    audited: Audited[CreatedKey] | None = None,
) -> CreatedKey:
    """A new key for `team`. Its `models` must be a subset of the team's, unless the team allows all.
    `limit_requests`/`limit_tokens` (per limits.window_s) and `budget` are the key's own limits; `audited`
    writes the audit row in the same transaction."""
    _check_limits(limit_requests, limit_tokens, budget)
    now = now or _utcnow()
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidRequest(
                "expires_at needs a timezone (e.g. 2030-01-01T00:00:00Z)", param="expires_at"
            )
        if expires_at <= now:
            raise InvalidRequest(f"expires_at {expires_at.isoformat()} is in the past", param="expires_at")
    if models is not None and not models:
        raise InvalidRequest("a key must allow at least one model (omit models to inherit the team's)")
    column = _models_column(models)
    plaintext, key_hash, display_prefix = generate_key()
    key_id = secrets.token_hex(8)
    with engine.begin() as conn:
        found, team_models = _team_models(conn, team)
        if not found:
            raise NotFound(f"team `{team}` does not exist (create it with `switchboard teams create {team}`)")
        if column is not None and team_models is not None:
            extra = sorted(set(column) - set(team_models))
            if extra:
                raise InvalidRequest(
                    f"models {', '.join(extra)} are not allowed for team `{team}`; "
                    f"allowed: {', '.join(team_models)} (config: teams.{team}.models)",
                    param="models",
                )
        conn.execute(
            sa.insert(api_keys).values(
                id=key_id,
                team=team,
                name=name,
                key_hash=key_hash,
                display_prefix=display_prefix,
                models=column,
                created_at=now,
                expires_at=expires_at,
                limit_requests=limit_requests,
                limit_tokens=limit_tokens,
                **_budget_columns(budget),
            )
        )
        created = CreatedKey(
            key_id,
            team,
            name,
            display_prefix,
            plaintext,
            _models_tuple(column),
            now,
            expires_at,
            limit_requests,
            limit_tokens,
            budget,
        )
        if audited is not None:
            audited(conn, created)
    return created


def _check_limits(limit_requests: int | None, limit_tokens: int | None, budget: KeyBudget | None) -> None:
    """Bounds the columns can hold; `KeyBudget` itself checks period, > 0 and soft <= hard."""
    for value, param in ((limit_requests, "limits.requests"), (limit_tokens, "limits.tokens")):
        if value is not None and not 1 <= value <= MAX_KEY_LIMIT:
            raise InvalidRequest(f"{param} must be between 1 and {MAX_KEY_LIMIT}, not {value}", param=param)
    if budget is not None and budget.limit_micro_usd > MAX_BUDGET_MICRO_USD:
        most = micro_to_usd_text(MAX_BUDGET_MICRO_USD)
        raise InvalidRequest(f"budget.usd must be at most {most} (USD)", param="budget.usd")


def _budget_columns(budget: KeyBudget | None) -> dict[str, object]:
    if budget is None:
        return {"budget_period": None, "budget_micro_usd": None, "soft_budget_micro_usd": None}
    return {
        "budget_period": budget.period,
        "budget_micro_usd": budget.limit_micro_usd,
        "soft_budget_micro_usd": budget.soft_limit_micro_usd,
    }


def _budget_of(m: sa.RowMapping) -> KeyBudget | None:
    period, limit, soft = m["budget_period"], m["budget_micro_usd"], m["soft_budget_micro_usd"]
    if period is None or limit is None:
        return None
    return KeyBudget(period, int(limit), None if soft is None else int(soft))


def _key_info(r: sa.Row[tuple[object, ...]]) -> KeyInfo:
    m = r._mapping
    return KeyInfo(
        key_id=m["id"],
        team=m["team"],
        name=m["name"],
        display_prefix=m["display_prefix"],
        models=_models_tuple(m["models"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        limit_requests=m["limit_requests"],
        limit_tokens=m["limit_tokens"],
        budget=_budget_of(m),
    )


def list_keys(engine: Engine, team: str | None = None) -> list[KeyInfo]:
    query = sa.select(api_keys).order_by(api_keys.c.team, api_keys.c.created_at, api_keys.c.id)
    if team is not None:
        query = query.where(api_keys.c.team == team)
    with engine.connect() as conn:
        return [_key_info(r) for r in conn.execute(query)]


def revoke_key(
    engine: Engine,
    key_id_or_prefix: str,
    *,
    now: dt.datetime | None = None,
    audited: Audited[str] | None = None,
) -> bool:
    """Revoke by key id or display prefix; idempotent. False when no key matches; InvalidRequest when a
    prefix matches several keys. Other processes notice within their KeyStore's ttl_s. `audited` gets the
    key's id, in the same transaction, when a key matched."""
    ref = key_id_or_prefix
    with engine.begin() as conn:
        rows = conn.execute(
            sa.select(api_keys.c.id, api_keys.c.revoked_at).where(
                sa.or_(api_keys.c.id == ref, api_keys.c.display_prefix == ref)
            )
        ).all()
        if len(rows) > 1:
            ids = ", ".join(sorted(r.id for r in rows))
            raise InvalidRequest(f"prefix `{ref}` matches several keys ({ids}); revoke by key id")
        if rows and rows[0].revoked_at is None:
            conn.execute(
                sa.update(api_keys).where(api_keys.c.id == rows[0].id).values(revoked_at=now or _utcnow())
            )
        if rows and audited is not None:
            audited(conn, rows[0].id)
    return bool(rows)


@dataclass(frozen=True, slots=True)
class _Lookup:
    """One key's row and its team's models (None: all), fetched together by one join."""

    identity: KeyIdentity
    team_models: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class _Entry:
    lookup: _Lookup | None  # None: no such key
    fresh_until: float


def _fetch_key(engine: Engine, key_hash: str, *, key_id: str | None = None) -> _Lookup | None:
    which = api_keys.c.key_hash == key_hash if key_id is None else api_keys.c.id == key_id
    query = (
        sa.select(api_keys, teams.c.models.label("team_models"))
        .join(teams, teams.c.name == api_keys.c.team)
        .where(which)
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    info = _key_info(row)
    identity = KeyIdentity(
        key_id=info.key_id,
        team=info.team,
        display_prefix=info.display_prefix,
        models=None if info.models is None else frozenset(info.models),
        expires_at=info.expires_at,
        revoked=info.revoked_at is not None,
        limit_requests=info.limit_requests,
        limit_tokens=info.limit_tokens,
        budget=info.budget,
    )
    team_models = row._mapping["team_models"]
    return _Lookup(identity, None if team_models is None else frozenset(team_models))


def identity_of(engine: Engine, key_id: str) -> KeyIdentity | None:
    """A key's identity by its id (work done later on a key's behalf: a batch's items)."""
    found = _fetch_key(engine, "", key_id=key_id)
    return None if found is None else found.identity


OUTAGE_RETRY_S = 1.0  # a stale key or team entry served through an outage is re-checked this often


class KeyStore:
    """Resolves plaintext keys to `KeyIdentity` from a TTL cache; see the module docstring."""

    def __init__(self, engine: Engine, *, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}  # by key hash
        self._negative: dict[str, float] = {}  # key hash -> fresh until; insertion-ordered for eviction
        self._team_models: dict[str, tuple[frozenset[str] | None, float]] = {}  # team -> (models, until)
        self._inflight: dict[str, asyncio.Task[_Lookup | None]] = {}
        self._lookups = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)

    async def resolve(self, plaintext: str) -> KeyIdentity | None:
        """The key's identity (maybe revoked or expired: see `check_usable`), or None for an unknown key.
        Raises ServiceUnavailable when the database cannot be reached and nothing is cached."""
        if not looks_like_key(plaintext):
            return None
        key_hash = hash_key(plaintext)
        now = self._clock()
        if self._negative.get(key_hash, -1.0) > now:
            return None
        entry = self._entries.get(key_hash)
        if entry is not None and entry.fresh_until > now:
            return entry.lookup.identity if entry.lookup else None
        task = self._inflight.get(key_hash)
        if task is None:
            task = asyncio.ensure_future(self._load(key_hash))
            self._inflight[key_hash] = task
            task.add_done_callback(lambda t: self._lookup_done(key_hash, t))
        # shield: a caller that goes away must not cancel the lookup the others are waiting on.
        lookup = await asyncio.shield(task)
        return lookup.identity if lookup else None

    async def team_models(self, team: str) -> frozenset[str] | None:
        """The team's allowed models (None: all). Filled by key lookups; queried only on a miss."""
        cached = self._team_models.get(team)
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        try:
            found, models = await asyncio.to_thread(self._fetch_team, team)
        except DBAPIError as exc:
            if cached is not None:
                log.warning("team lookup failed (%s); serving the cached models", type(exc).__name__)
                # Asked again in a moment, not by every request while the database is down.
                self._team_models[team] = (cached[0], self._clock() + min(self._ttl_s, OUTAGE_RETRY_S))
                return cached[0]
            raise ServiceUnavailable(
                "cannot check team models: the database is unreachable (see /readyz)"
            ) from exc
        if not found:
            raise NotFound(f"team `{team}` does not exist (create it with `switchboard teams create {team}`)")
        value = None if models is None else frozenset(models)
        self._team_models[team] = (value, self._clock() + self._ttl_s)
        return value

    def invalidate(self, key_id: str | None = None) -> None:
        """Forget cached keys (all of them, or one key id) and team models, e.g. after a local revoke."""
        if key_id is None:
            self._entries.clear()
            self._negative.clear()
        else:
            stale = [h for h, e in self._entries.items() if e.lookup and e.lookup.identity.key_id == key_id]
            for key_hash in stale:
                del self._entries[key_hash]
        self._team_models.clear()

    def _lookup_done(self, key_hash: str, task: asyncio.Task[_Lookup | None]) -> None:
        self._inflight.pop(key_hash, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so a lookup whose waiters all left logs no warning

    def _fetch_team(self, team: str) -> tuple[bool, list[str] | None]:
        with self._engine.connect() as conn:
            return _team_models(conn, team)

    async def _load(self, key_hash: str) -> _Lookup | None:
        try:
            async with self._lookups:
                lookup = await asyncio.to_thread(_fetch_key, self._engine, key_hash)
        except DBAPIError as exc:
            stale = self._entries.get(key_hash)
            if stale is not None and stale.lookup is not None:
                # Keep known keys working through a database blip; this is the documented ttl trade-off.
                log.warning("key lookup failed (%s); serving the cached identity", type(exc).__name__)
                # Asked again in a moment, not by every request while the database is down.
                retry_at = self._clock() + min(self._ttl_s, OUTAGE_RETRY_S)
                self._entries[key_hash] = _Entry(stale.lookup, retry_at)
                return stale.lookup
            raise ServiceUnavailable(
                "cannot check API keys: the database is unreachable (see /readyz)"
            ) from exc
        now = self._clock()
        if lookup is None:
            self._remember_unknown(key_hash, now)
            self._entries.pop(key_hash, None)
        else:
            self._entries[key_hash] = _Entry(lookup, now + self._ttl_s)
            self._team_models[lookup.identity.team] = (lookup.team_models, now + self._ttl_s)
        return lookup

    def _remember_unknown(self, key_hash: str, now: float) -> None:
        if len(self._negative) >= NEGATIVE_CACHE_MAX:
            for h in [h for h, until in self._negative.items() if until <= now]:
                del self._negative[h]
            while len(self._negative) >= NEGATIVE_CACHE_MAX:
                del self._negative[next(iter(self._negative))]  # oldest first
        self._negative[key_hash] = now + NEGATIVE_TTL_S
