"""Console sessions and the audit log in SQL (SQLite and PostgreSQL): a session is found by its cookie's
value only, never past its expiry or its key's revocation; audit rows list newest first and page back."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.console import overview
from gateway.reports import Dimension, ReportQuery, Source, usage_report
from gateway.reports.runner import Guard
from gateway.store import audit, keys, sessions
from gateway.store.db import console_sessions
from gateway.store.rollups import Rollup
from tests.support.ledger_gen import LedgerSpec, generate_rows, insert_rows

NOW = dt.datetime(2031, 5, 1, 12, 0, tzinfo=dt.UTC)


def test_admin_session_lives_until_its_expiry_and_stores_no_token(engine: Engine) -> None:
    token, made = sessions.create(engine, role="admin", team=None, key_id=None, ttl_s=60, now=NOW)
    found = sessions.lookup(engine, token, now=NOW + dt.timedelta(seconds=59))
    assert found is not None and found.is_admin and found.csrf_token == made.csrf_token
    assert sessions.lookup(engine, token, now=NOW + dt.timedelta(seconds=60)) is None
    assert sessions.lookup(engine, token + "x", now=NOW) is None
    with engine.connect() as conn:
        stored = [str(v) for row in conn.execute(sa.select(console_sessions)) for v in row]
    assert token not in stored and keys.hash_key(token) in stored


def test_team_session_ends_with_its_key(engine: Engine) -> None:
    keys.create_team(engine, "ops", None)
    created = keys.create_key(engine, "ops", name="console", models=None, expires_at=None)
    token, _ = sessions.create(engine, role="team", team="ops", key_id=created.key_id, ttl_s=3600, now=NOW)
    found = sessions.lookup(engine, token, now=NOW)
    assert found is not None and found.team == "ops" and found.actor == f"key:{created.key_id}"
    assert keys.revoke_key(engine, created.key_id)
    assert sessions.lookup(engine, token, now=NOW) is None
    sessions.end(engine, token)


def test_logout_ends_the_session_and_login_prunes_expired_ones(engine: Engine) -> None:
    old, _ = sessions.create(engine, role="admin", team=None, key_id=None, ttl_s=1, now=NOW)
    token, _ = sessions.create(
        engine, role="admin", team=None, key_id=None, ttl_s=60, now=NOW + dt.timedelta(seconds=5)
    )
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(console_sessions)).scalar_one() == 1
    sessions.end(engine, token)
    assert sessions.lookup(engine, token, now=NOW + dt.timedelta(seconds=6)) is None
    del old


def test_audit_rows_newest_first_with_paging_and_filter(engine: Engine) -> None:
    cli = audit.cli_actor()
    api = audit.Actor("admin", audit.AuditSource.API, "10.0.0.7")
    for i in range(5):
        audit.record(engine, api if i % 2 else cli, "key.create", f"k{i}", {"team": "ops"}, now=NOW)
    audit.record(engine, api, "key.revoke", "k0", now=NOW)
    entries = audit.list_entries(engine, limit=3)
    assert [e.target for e in entries] == ["k0", "k4", "k3"] and entries[0].action == "key.revoke"
    older = audit.list_entries(engine, limit=10, before_id=entries[-1].entry_id)
    assert [e.target for e in older] == ["k2", "k1", "k0"]
    created = audit.list_entries(engine, action="key.create")
    assert len(created) == 5 and {e.source for e in created} == {"cli", "api"}
    assert created[0].detail == {"team": "ops"} and created[1].address == "10.0.0.7"
    assert cli.address == "cli" and cli.name.startswith("cli:")


@pytest.mark.slow  # a few thousand generated rows and a rollup, on each database
def test_overview_from_rollups_equals_the_ledger(engine: Engine) -> None:
    """The overview's one pass over rollups (windows past 3 h) sums exactly what the raw ledger holds:
    totals, per team, per backend and per hour; a team's view holds that team only."""
    spec = LedgerSpec(rows=2_000, hours=54)
    rows = list(generate_rows(spec))
    insert_rows(engine, rows)
    end = spec.start + dt.timedelta(hours=spec.hours)
    Rollup(engine, clock=lambda: end + dt.timedelta(days=1)).run_once()
    view = overview.overview(engine, spec.start, end, None, Guard(60))
    assert view.source == "rollup" and view.series_unit == "hour"
    raw = usage_report(engine, ReportQuery((Dimension.TEAM,), spec.start, end, source=Source.RAW))
    assert (view.totals.requests, view.totals.cost_micro_usd, view.totals.errors) == (
        raw.totals.requests, raw.totals.cost_micro_usd, raw.totals.errors,
    )  # fmt: skip
    assert {r.group: r.cost_micro_usd for r in view.by_team} == {r.group: r.cost_micro_usd for r in raw.rows}
    by_backend = usage_report(engine, ReportQuery((Dimension.BACKEND,), spec.start, end, source=Source.RAW))
    assert {r.group: r.requests for r in view.by_backend} == {r.group: r.requests for r in by_backend.rows}
    hourly = usage_report(engine, ReportQuery((Dimension.HOUR,), spec.start, end, source=Source.RAW))
    assert [(b, n, e) for b, n, e in view.series] == [(r.group[0], r.requests, r.errors) for r in hourly.rows]
    assert view.totals.latency_p95_ms is not None
    assert 1 / 1.4 < view.totals.latency_p95_ms / (raw.totals.latency_p95_ms or 1) < 1.4  # histogram bound
    team = spec.teams[0]
    scoped = overview.overview(engine, spec.start, end, team, Guard(60))
    assert [r.group for r in scoped.by_team] == [(team,)]
    assert scoped.totals.requests == next(r.requests for r in raw.rows if r.group == (team,))
