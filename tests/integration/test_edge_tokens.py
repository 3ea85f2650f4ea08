"""Edge enrollment tokens in SQL (SQLite and PostgreSQL), the `switchboard edge token` CLI, migration 0005."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from gateway.cli import app
from gateway.edge import tokens
from gateway.errors import InvalidRequest
from gateway.store import db
from tests.support.db import DbTarget

NOW = dt.datetime(2030, 5, 1, 12, 0, tzinfo=dt.UTC)


def test_create_stores_only_a_hash_and_looks_up_by_plaintext(engine: Engine) -> None:
    created = tokens.create_token(engine, name="plant-7", labels={"site": "plant-7"}, now=NOW)
    plain = created.plaintext
    assert plain.startswith("sbe_") and tokens.looks_like_token(plain)
    assert created.info.token_id.startswith("et_") and dict(created.info.labels) == {"site": "plant-7"}
    with engine.connect() as conn:
        row = conn.execute(sa.select(db.edge_tokens)).mappings().one()
    assert row["token_hash"] == tokens.hash_token(plain) and plain not in str(dict(row))
    found = tokens.lookup_token(engine, plain)
    assert found == created.info
    assert tokens.lookup_token(engine, "sbe_" + "x" * 43) is None
    assert tokens.lookup_token(engine, "sk-sb-" + "x" * 43) is None  # a team key is never an edge token
    other = tokens.create_token(engine, name="other", now=NOW + dt.timedelta(seconds=1))
    assert [t.token_id for t in tokens.list_tokens(engine)] == [created.info.token_id, other.info.token_id]


def test_expiry_and_revocation(engine: Engine) -> None:
    expiring = tokens.create_token(engine, name="e", expires_at=NOW + dt.timedelta(days=7), now=NOW)
    info = tokens.lookup_token(engine, expiring.plaintext)
    assert info is not None and info.expires_at == NOW + dt.timedelta(days=7)
    assert info.problem(NOW) is None
    assert "expired at" in (info.problem(NOW + dt.timedelta(days=8)) or "")
    revoked = tokens.revoke_token(engine, expiring.info.token_id, now=NOW)
    assert revoked is not None and revoked.revoked_at == NOW and "was revoked" in (revoked.problem(NOW) or "")
    again = tokens.revoke_token(engine, expiring.info.token_id, now=NOW + dt.timedelta(hours=1))
    assert again is not None and again.revoked_at == NOW  # idempotent: the first time is kept
    assert tokens.revoke_token(engine, "et_missing") is None
    with pytest.raises(InvalidRequest, match="in the past"):
        tokens.create_token(engine, name="late", expires_at=NOW - dt.timedelta(seconds=1), now=NOW)
    with pytest.raises(InvalidRequest, match="timezone"):
        tokens.create_token(engine, name="naive", expires_at=dt.datetime(2031, 1, 1), now=NOW)
    with pytest.raises(InvalidRequest, match="name"):
        tokens.create_token(engine, name=" ", now=NOW)


def test_states_answers_for_many_tokens_in_one_query(engine: Engine) -> None:
    made = [tokens.create_token(engine, name=f"n{i}", now=NOW) for i in range(3)]
    tokens.revoke_token(engine, made[1].info.token_id, now=NOW)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    found = tokens.states(engine, [m.info.token_id for m in made] + ["et_deleted"])
    assert len(statements) == 1
    assert set(found) == {m.info.token_id for m in made}
    assert found[made[1].info.token_id].revoked_at == NOW and found[made[0].info.token_id].revoked_at is None
    assert tokens.states(engine, []) == {}


def test_migration_0005_goes_down_and_up(db_target: DbTarget) -> None:
    db.migrate(db_target.url, db_target.schema)
    cfg = db.alembic_config(db_target.url, db_target.schema)
    command.downgrade(cfg, "0004")
    eng = db_target.make_engine()
    try:
        assert "edge_tokens" not in sa.inspect(eng).get_table_names()
        command.upgrade(cfg, "head")
        assert "edge_tokens" in sa.inspect(eng).get_table_names()
        tokens.create_token(eng, name="after", now=NOW)
    finally:
        eng.dispose()


def test_cli_token_lifecycle(tmp_path: Path) -> None:
    config = tmp_path / "sb.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/cli.db"\n')
    runner = CliRunner()
    made = runner.invoke(
        app,
        [
            "edge",
            "token",
            "create",
            "--name",
            "p7",
            "--label",
            "site=plant-7",
            "--expires-in",
            "7d",
            "-c",
            str(config),
        ],
    )
    assert made.exit_code == 0, made.output
    plain = made.stdout.strip().splitlines()[-1]
    assert plain.startswith("sbe_") and made.stdout.strip() == plain  # stdout holds the token alone
    listed = runner.invoke(app, ["edge", "token", "list", "-c", str(config)])
    assert listed.exit_code == 0 and "p7" in listed.stdout and "site=plant-7" in listed.stdout
    assert plain not in listed.stdout and "active" in listed.stdout
    token_id = next(w for w in listed.stdout.split() if w.startswith("et_"))
    revoked = runner.invoke(app, ["edge", "token", "revoke", token_id, "-c", str(config)])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert "revoked" in runner.invoke(app, ["edge", "token", "list", "-c", str(config)]).stdout
    missing = runner.invoke(app, ["edge", "token", "revoke", "et_nope", "-c", str(config)])
    assert missing.exit_code == 1 and "no edge token with id et_nope" in missing.output
    bad = runner.invoke(
        app, ["edge", "token", "create", "--name", "x", "--expires-in", "soon", "-c", str(config)]
    )
    assert bad.exit_code == 2 and "--expires-in" in bad.output
    bad = runner.invoke(app, ["edge", "token", "create", "--name", "x", "--label", "site", "-c", str(config)])
    assert bad.exit_code == 2 and "--label" in bad.output


def test_cli_edge_serve_refuses_bad_options_before_loading_anything() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["edge", "serve", "--gateway", "ftp://x", "--token", "sbe_x"])
    assert result.exit_code == 2 and "--gateway" in result.output
    result = runner.invoke(
        app, ["edge", "serve", "--gateway", "http://x", "--token", "t", "--label", "nolabel"]
    )
    assert result.exit_code == 2 and "--label" in result.output
    assert runner.invoke(app, ["edge", "--help"]).exit_code == 0
