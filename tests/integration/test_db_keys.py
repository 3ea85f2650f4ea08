"""Schema migration, API key generation and admin operations, and the KeyStore cache, on SQLite and PG."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import string

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine

from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, ServiceUnavailable
from gateway.records import KeyBudget
from gateway.store import db
from gateway.store import keys as keys_module
from gateway.store.keys import (
    OUTAGE_RETRY_S,
    KeyStore,
    check_usable,
    create_key,
    create_team,
    generate_key,
    hash_key,
    list_keys,
    list_teams,
    revoke_key,
    upsert_teams,
)
from tests.support.db import DbTarget, QueryLog
from tests.support.tcp_proxy import TcpProxy

NOW = dt.datetime(2030, 5, 1, 12, 0, tzinfo=dt.UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_migrate_creates_schema_and_is_idempotent(db_target: DbTarget) -> None:
    db.migrate(db_target.url, db_target.schema)
    db.migrate(db_target.url, db_target.schema)
    eng = db_target.make_engine()
    try:
        inspector = sa.inspect(eng)
        tables = {
            "teams",
            "api_keys",
            "usage",
            "usage_hourly",
            "usage_daily",
            "usage_hourly_coarse",
            "usage_daily_coarse",
            "backend_busy_hourly",
            "rollup_state",
            "edge_tokens",
            "responses",
            "files",
            "batches",
            "batch_items",
            "audit_log",
            "console_sessions",
        }
        assert tables | {"alembic_version"} <= set(inspector.get_table_names())
        for table in db.metadata.sorted_tables:
            # The hand-written migration must match gateway/store/db.py column for column.
            columns = inspector.get_columns(table.name)
            assert [c["name"] for c in columns] == [c.name for c in table.columns]
            assert [c["nullable"] for c in columns] == [c.nullable for c in table.columns]
            primary_key = inspector.get_pk_constraint(table.name)["constrained_columns"]
            assert primary_key == [c.name for c in table.primary_key.columns]
            indexes = {
                ix["name"]: ix["column_names"]
                for ix in inspector.get_indexes(table.name)
                if not ix.get("duplicates_constraint")  # PostgreSQL's index behind UNIQUE(key_hash)
            }
            assert indexes == {ix.name: [c.name for c in ix.columns] for ix in table.indexes}
        usage_indexes = {ix["name"]: ix["column_names"] for ix in inspector.get_indexes("usage")}
        assert usage_indexes["ix_usage_created_at"] == ["created_at"]
        assert usage_indexes["ix_usage_team_created_at"] == ["team", "created_at"]
        assert usage_indexes["ix_usage_key_id_created_at"] == ["key_id", "created_at"]
        assert usage_indexes["ix_usage_written_at"] == ["written_at"]
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == "0014"
    finally:
        eng.dispose()


_NEW_KEY_COLUMNS = [
    "limit_requests",
    "limit_tokens",
    "budget_period",
    "budget_micro_usd",
    "soft_budget_micro_usd",
]


def _columns(eng: Engine, table: str) -> list[str]:
    return [c["name"] for c in sa.inspect(eng).get_columns(table)]


def test_migration_0008_to_0009_adds_batches_and_back(db_target: DbTarget) -> None:
    """Usage rows written before batches have no batch_id; downgrade drops the batch tables, keeps rows."""
    if db_target.schema is not None:
        admin = db.make_engine(db_target.url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{db_target.schema}"')
        admin.dispose()
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.upgrade(cfg, "0008")
    eng = db_target.make_engine()
    try:
        with eng.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO usage (request_id, created_at, team, requested_model, prompt_tokens, "
                    "completion_tokens, cost_micro_usd, latency_ms, status, http_status, stream, cache_hit) "
                    "VALUES ('r1', :t, 'research', 'm', 1, 2, 30, 4.5, 'ok', 200, false, false)"
                ),
                {"t": NOW.replace(tzinfo=None)},
            )
        command.upgrade(cfg, "0009")
        assert _columns(eng, "usage")[-1] == "batch_id"
        assert {"batches", "batch_items"} <= set(sa.inspect(eng).get_table_names())
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT batch_id FROM usage")).scalar_one() is None
        command.downgrade(cfg, "0008")
        assert "batch_id" not in _columns(eng, "usage")
        assert not {"batches", "batch_items"} & set(sa.inspect(eng).get_table_names())
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT cost_micro_usd FROM usage")).scalar_one() == 30
    finally:
        eng.dispose()


def test_migration_0009_to_0010_adds_owned_share_and_back(db_target: DbTarget) -> None:
    """Rows written before owned capacity was split out get owned_micro_usd 0, in the ledger and rollups."""
    if db_target.schema is not None:
        admin = db.make_engine(db_target.url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{db_target.schema}"')
        admin.dispose()
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.upgrade(cfg, "0009")
    eng = db_target.make_engine()
    try:
        with eng.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO usage (request_id, created_at, team, requested_model, prompt_tokens, "
                    "completion_tokens, cost_micro_usd, latency_ms, status, http_status, stream, cache_hit) "
                    "VALUES ('r1', :t, 'research', 'm', 1, 2, 30, 4.5, 'ok', 200, false, false)"
                ),
                {"t": NOW.replace(tzinfo=None)},
            )
        command.upgrade(cfg, "0010")
        assert _columns(eng, "usage")[-1] == "owned_micro_usd"
        assert _columns(eng, "usage_hourly")[-1] == "owned_micro_usd"
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT owned_micro_usd FROM usage")).scalar_one() == 0
        command.downgrade(cfg, "0009")
        assert "owned_micro_usd" not in _columns(eng, "usage") + _columns(eng, "usage_hourly")
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT cost_micro_usd FROM usage")).scalar_one() == 30
    finally:
        eng.dispose()


def test_migration_0002_to_0003_keeps_rows_and_adds_defaults(db_target: DbTarget) -> None:
    if db_target.schema is not None:
        admin = db.make_engine(db_target.url)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{db_target.schema}"')
        admin.dispose()
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.upgrade(cfg, "0002")
    eng = db_target.make_engine()
    try:
        assert "cost_saved_micro_usd" not in _columns(eng, "usage")
        create_team(eng, "research", None)  # works on 0002: it names only old columns
        with eng.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (id, team, name, key_hash, display_prefix, created_at) "
                    "VALUES ('old', 'research', 'legacy', :h, 'sk-sb-old', :t)"
                ),
                {"h": hash_key("sk-sb-legacy"), "t": NOW.replace(tzinfo=None)},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO usage (request_id, created_at, team, key_id, requested_model, "
                    "prompt_tokens, completion_tokens, cost_micro_usd, latency_ms, status, http_status, "
                    "stream, cache_hit) "
                    "VALUES ('r1', :t, 'research', 'old', 'm', 1, 2, 30, 4.5, 'ok', 200, false, true)"
                ),
                {"t": NOW.replace(tzinfo=None)},
            )
        db.migrate(db_target.url, db_target.schema)  # 0002 -> 0003
        assert _columns(eng, "api_keys")[-5:] == _NEW_KEY_COLUMNS
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT cost_micro_usd, cost_saved_micro_usd FROM usage")).one() == (
                30,
                0,
            )
        (legacy,) = list_keys(eng)
        assert (legacy.key_id, legacy.limit_requests, legacy.limit_tokens, legacy.budget) == (
            "old",
            None,
            None,
            None,
        )

        command.downgrade(cfg, "0002")
        assert "cost_saved_micro_usd" not in _columns(eng, "usage")
        assert not set(_NEW_KEY_COLUMNS) & set(_columns(eng, "api_keys"))
        assert "ix_usage_key_id_created_at" not in {ix["name"] for ix in sa.inspect(eng).get_indexes("usage")}
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one() == 1
            assert conn.execute(sa.text("SELECT id FROM api_keys")).scalar_one() == "old"
        db.migrate(db_target.url, db_target.schema)
        assert _columns(eng, "api_keys")[-5:] == _NEW_KEY_COLUMNS
    finally:
        eng.dispose()


def test_generated_keys_have_the_documented_shape() -> None:
    keys = [generate_key() for _ in range(500)]
    alphabet = set(string.ascii_letters + string.digits + "-_")
    for plaintext, key_hash, prefix in keys:
        assert plaintext.startswith("sk-sb-")
        assert len(plaintext) == 6 + 43  # 32 random bytes, base64url
        assert set(plaintext[6:]) <= alphabet
        assert key_hash == hashlib.sha256(plaintext.encode()).hexdigest() == hash_key(plaintext)
        assert prefix == plaintext[:12]
    assert len({k[0] for k in keys}) == 500
    assert len({k[2] for k in keys}) > 490  # the display prefixes carry 36 random bits


def test_only_the_hash_is_stored(engine: Engine) -> None:
    create_team(engine, "research", None)
    created = create_key(engine, "research", name="ci", models=None, expires_at=None)
    with engine.connect() as conn:
        row = conn.execute(sa.select(db.api_keys)).one()
    values = [str(v) for v in row]
    assert not any(created.plaintext[6:20] in v for v in values)
    assert row.key_hash == hash_key(created.plaintext)
    assert row.display_prefix == created.plaintext[:12] == created.display_prefix
    assert row.id == created.key_id


def test_teams_create_list_and_upsert(engine: Engine) -> None:
    create_team(engine, "manual", ["b", "a", "a"], now=NOW)
    with pytest.raises(InvalidRequest, match="already exists"):
        create_team(engine, "manual", None)
    with pytest.raises(InvalidRequest, match="not allowed"):
        create_team(engine, "bad name!", None)
    upsert_teams(engine, {"demo": ["*"], "research": ["a"]}, now=NOW)
    upsert_teams(engine, {"demo": ["*"], "research": ["a", "b"]}, now=NOW)
    teams = {t.name: t for t in list_teams(engine)}
    assert set(teams) == {"demo", "manual", "research"}  # upsert leaves CLI-made teams alone
    assert teams["demo"].models is None
    assert teams["research"].models == ("a", "b")
    assert teams["manual"].models == ("a", "b")
    assert teams["manual"].created_at == NOW and teams["manual"].created_at.tzinfo == dt.UTC


def test_create_list_revoke_keys(engine: Engine) -> None:
    create_team(engine, "research", ["a", "b"])
    k1 = create_key(engine, "research", name="one", models=["a"], expires_at=None, now=NOW)
    k2 = create_key(
        engine, "research", name="two", models=None, expires_at=NOW + dt.timedelta(days=1), now=NOW
    )
    listed = {k.key_id: k for k in list_keys(engine, "research")}
    assert set(listed) == {k1.key_id, k2.key_id}
    assert listed[k1.key_id].models == ("a",) and listed[k2.key_id].models is None
    assert listed[k2.key_id].expires_at == NOW + dt.timedelta(days=1)
    assert listed[k1.key_id].revoked_at is None
    assert list_keys(engine, "other") == []
    assert len(list_keys(engine)) == 2

    assert revoke_key(engine, k1.key_id, now=NOW) is True
    assert revoke_key(engine, k1.key_id) is True  # idempotent, keeps the first revocation time
    assert revoke_key(engine, k2.display_prefix) is True
    assert revoke_key(engine, "sk-sb-nothere") is False
    revoked = {k.key_id: k.revoked_at for k in list_keys(engine)}
    assert revoked[k1.key_id] == NOW and revoked[k2.key_id] is not None


def test_key_validation_messages(engine: Engine) -> None:
    with pytest.raises(NotFound, match="switchboard teams create"):
        create_key(engine, "ghost", name="x", models=None, expires_at=None)
    create_team(engine, "research", ["a", "b"])
    create_team(engine, "open", None)
    with pytest.raises(InvalidRequest, match=r"models c are not allowed for team `research`; allowed: a, b"):
        create_key(engine, "research", name="x", models=["a", "c"], expires_at=None)
    with pytest.raises(InvalidRequest, match="at least one model"):
        create_key(engine, "research", name="x", models=[], expires_at=None)
    with pytest.raises(InvalidRequest, match="in the past"):
        create_key(
            engine, "research", name="x", models=None, expires_at=NOW - dt.timedelta(seconds=1), now=NOW
        )
    with pytest.raises(InvalidRequest, match="timezone"):
        create_key(engine, "research", name="x", models=None, expires_at=dt.datetime(2040, 1, 1))
    assert create_key(engine, "open", name="x", models=["anything"], expires_at=None).models == ("anything",)
    assert create_key(engine, "research", name="x", models=["b", "a"], expires_at=None).models == ("a", "b")


async def test_key_limits_and_budget_round_trip(engine: Engine) -> None:
    create_team(engine, "research", None)
    budget = KeyBudget("day", 12_500_000, 10_000_000)
    created = create_key(
        engine,
        "research",
        name="limited",
        models=None,
        expires_at=None,
        limit_requests=60,
        limit_tokens=2**31 - 1,
        budget=budget,
    )
    plain = create_key(engine, "research", name="plain", models=None, expires_at=None)
    hard_only = create_key(
        engine, "research", name="hard", models=None, expires_at=None, budget=KeyBudget("month", 2**62)
    )
    assert (created.limit_requests, created.limit_tokens, created.budget) == (60, 2**31 - 1, budget)
    listed = {k.key_id: k for k in list_keys(engine)}
    assert (listed[created.key_id].limit_requests, listed[created.key_id].limit_tokens) == (60, 2**31 - 1)
    assert listed[created.key_id].budget == budget
    assert listed[hard_only.key_id].budget == KeyBudget("month", 2**62, None)
    assert (listed[plain.key_id].limit_requests, listed[plain.key_id].budget) == (None, None)

    store = KeyStore(engine, ttl_s=5.0)
    identity = await store.resolve(created.plaintext)
    assert identity is not None
    assert (identity.limit_requests, identity.limit_tokens, identity.budget) == (60, 2**31 - 1, budget)
    other = await store.resolve(plain.plaintext)
    assert other is not None and (other.limit_requests, other.limit_tokens, other.budget) == (
        None,
        None,
        None,
    )


def test_key_limit_validation(engine: Engine) -> None:
    create_team(engine, "research", None)
    for kwargs, param in [
        ({"limit_requests": 0}, "limits.requests"),
        ({"limit_tokens": -5}, "limits.tokens"),
        ({"limit_tokens": 2**31}, "limits.tokens"),
        ({"budget": KeyBudget("month", 2**63)}, "budget.usd"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            create_key(engine, "research", name="x", models=None, expires_at=None, **kwargs)  # type: ignore[arg-type]
        assert info.value.param == param
    with pytest.raises(ValueError, match="period 'week'"):
        KeyBudget("week", 1)
    with pytest.raises(ValueError, match="must be > 0"):
        KeyBudget("day", 0)
    with pytest.raises(ValueError, match="at most the limit"):
        KeyBudget("day", 10, 11)
    assert list_keys(engine) == []


async def test_keystore_caches_positive_and_negative_lookups(engine: Engine) -> None:
    create_team(engine, "research", ["a"])
    created = create_key(engine, "research", name="x", models=None, expires_at=None)
    store = KeyStore(engine, ttl_s=5.0, clock=FakeClock())
    log = QueryLog().attach(engine)
    identity = await store.resolve(created.plaintext)
    assert identity is not None
    assert (identity.key_id, identity.team, identity.display_prefix) == (
        created.key_id,
        "research",
        created.display_prefix,
    )
    assert identity.models is None and identity.revoked is False and identity.expires_at is None
    assert len(log.statements) == 1  # key and team models in one join
    log.clear()
    assert await store.resolve(created.plaintext) == identity
    assert await store.team_models("research") == frozenset({"a"})
    assert log.statements == []

    unknown, _, _ = generate_key()
    assert await store.resolve(unknown) is None
    assert len(log.statements) == 1
    assert await store.resolve(unknown) is None  # negative cache
    assert await store.resolve("sk-sb-short") is None  # malformed: never reaches SQL
    assert await store.resolve("Bearer nonsense") is None
    assert len(log.statements) == 1


async def test_keystore_single_flight(engine: Engine) -> None:
    create_team(engine, "research", None)
    created = create_key(engine, "research", name="x", models=None, expires_at=None)
    store = KeyStore(engine, ttl_s=5.0)
    log = QueryLog().attach(engine)
    results = await asyncio.gather(*(store.resolve(created.plaintext) for _ in range(50)))
    assert {r.key_id for r in results if r is not None} == {created.key_id}
    assert len(log.statements) == 1


async def test_revoked_key_stops_resolving_after_ttl(engine: Engine) -> None:
    create_team(engine, "research", None)
    created = create_key(engine, "research", name="x", models=None, expires_at=None)
    clock = FakeClock()
    store = KeyStore(engine, ttl_s=5.0, clock=clock)
    first = await store.resolve(created.plaintext)
    assert first is not None and not first.revoked
    revoke_key(engine, created.key_id)  # as if by another process: no invalidate()
    clock.now_s += 4.9
    cached = await store.resolve(created.plaintext)
    assert cached is not None and not cached.revoked
    clock.now_s += 0.2
    revoked = await store.resolve(created.plaintext)
    assert revoked is not None and revoked.revoked
    with pytest.raises(AuthenticationFailed, match="revoked"):
        check_usable(revoked, now=NOW)


async def test_invalidate_makes_a_local_revoke_immediate(engine: Engine) -> None:
    create_team(engine, "research", None)
    created = create_key(engine, "research", name="x", models=None, expires_at=None)
    store = KeyStore(engine, ttl_s=300.0, clock=FakeClock())
    assert await store.resolve(created.plaintext) is not None
    revoke_key(engine, created.key_id)
    store.invalidate(created.key_id)
    identity = await store.resolve(created.plaintext)
    assert identity is not None and identity.revoked


async def test_expired_key_resolves_with_its_expiry(engine: Engine) -> None:
    create_team(engine, "research", None)
    expires = NOW + dt.timedelta(hours=1)
    created = create_key(engine, "research", name="x", models=["m"], expires_at=expires, now=NOW)
    identity = await KeyStore(engine, ttl_s=5.0).resolve(created.plaintext)
    assert identity is not None and identity.expires_at == expires and identity.models == frozenset({"m"})
    check_usable(identity, now=NOW)
    with pytest.raises(AuthenticationFailed, match="expired"):
        check_usable(identity, now=expires)


async def test_keystore_database_down() -> None:
    down = db.make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")
    try:
        store = KeyStore(down, ttl_s=5.0)
        with pytest.raises(ServiceUnavailable, match="database is unreachable"):
            await store.resolve(generate_key()[0])
    finally:
        down.dispose()


@pytest.mark.postgres
async def test_keystore_serves_known_keys_through_an_outage(migrated_pg_target: DbTarget) -> None:
    pg_target = migrated_pg_target
    direct = pg_target.make_engine()
    create_team(direct, "research", None)
    created = create_key(direct, "research", name="x", models=None, expires_at=None)
    proxy = TcpProxy("127.0.0.1", sa.make_url(pg_target.url).port or 5432)
    await proxy.start()
    proxied = pg_target.make_engine(
        sa.make_url(pg_target.url)
        .set(host="127.0.0.1", port=proxy.port)
        .render_as_string(hide_password=False)
    )
    try:
        clock = FakeClock()
        store = KeyStore(proxied, ttl_s=5.0, clock=clock)
        assert await store.resolve(created.plaintext) is not None
        await proxy.cut()
        clock.now_s += 60
        stale = await store.resolve(created.plaintext)  # the refresh fails; the known identity is kept
        assert stale is not None and stale.key_id == created.key_id
        # Through the outage the database is asked again once a second, not by every request.
        lookups = 0
        real_fetch = keys_module._fetch_key

        def counting(*args: object) -> object:
            nonlocal lookups
            lookups += 1
            return real_fetch(*args)  # type: ignore[arg-type]

        keys_module._fetch_key = counting  # type: ignore[assignment]
        try:
            for _ in range(20):
                assert await store.resolve(created.plaintext) is not None
            assert lookups == 0
            clock.now_s += OUTAGE_RETRY_S + 0.01
            assert await store.resolve(created.plaintext) is not None
            assert lookups == 1
        finally:
            keys_module._fetch_key = real_fetch  # type: ignore[assignment]
        with pytest.raises(ServiceUnavailable):
            await store.resolve(generate_key()[0])  # an unknown key cannot be checked
        await proxy.restore()
        assert await store.resolve(created.plaintext) is not None
    finally:
        await proxy.aclose()
        proxied.dispose()
        direct.dispose()
