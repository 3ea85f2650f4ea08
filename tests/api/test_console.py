"""The admin console over plain HTTP (httpx against the live gateway): login and sessions, expiry, CSRF,
team scoping in the pages and the JSON behind them, and the audit rows of console, CLI and API writes.
The browser tests are tests/api/test_console_browser.py."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import sqlalchemy as sa
from openai import OpenAI
from typer.testing import CliRunner

from gateway.cli import app as cli_app
from gateway.store import audit
from gateway.store.db import console_sessions
from tests.support.api_gateway import ADMIN_KEY, Gateway
from tests.support.console import csrf_of, login

_RECENT = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%d")


def _audit_rows(gw: Gateway, action: str, target: str) -> list[audit.AuditEntry]:
    return [e for e in audit.list_entries(gw.db, limit=500, action=action) if e.target == target]


def test_pages_need_a_session_and_login_never_echoes_the_key(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.base_url) as anon:
        for page in ("/console/overview", "/console/teams", "/console/audit", "/console/usage"):
            resp = anon.get(page)
            assert resp.status_code == 303 and resp.headers["location"] == "/console/login", page
        assert anon.get("/console/api/keys").status_code == 401
        wrong = "sk-sb-" + "x" * 43
        for key in (wrong, "not-the-admin-key-" + uuid.uuid4().hex):
            resp = anon.post("/console/login", data={"key": key})
            assert resp.status_code == 401
            assert key not in resp.text and "not accepted" in resp.text
            assert "set-cookie" not in resp.headers


def test_admin_session_cookie_is_http_only_strict_and_expires(gateway: Gateway) -> None:
    resp = httpx.post(gateway.base_url + "/console/login", data={"key": ADMIN_KEY})
    assert resp.status_code == 303
    cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert f"max-age={int(gateway.config.console.session_ttl_s)}" in cookie
    assert "secure" not in cookie  # plain HTTP here; over TLS the cookie is Secure
    with login(gateway.base_url, ADMIN_KEY) as c:
        assert c.get("/console/overview").status_code == 200
        # The server decides expiry: push this session's end into the past and the next page refuses it.
        token_hash = _session_hash(c)
        with gateway.db.begin() as conn:
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            conn.execute(
                console_sessions.update()
                .where(console_sessions.c.token_hash == token_hash)
                .values(expires_at=past)
            )
        resp = c.get("/console/overview")
        assert resp.status_code == 303 and resp.headers["location"] == "/console/login"


def _session_hash(client: httpx.Client) -> str:
    from gateway.store.keys import hash_key

    return hash_key(client.cookies["sb_console"])


def test_writes_need_the_csrf_token(gateway: Gateway) -> None:
    team = "csrf-" + uuid.uuid4().hex[:8]
    with login(gateway.base_url, ADMIN_KEY) as c:
        token = csrf_of(c)
        assert c.post("/console/teams", data={"name": team}).status_code == 403
        assert c.post("/console/teams", data={"name": team, "csrf": "forged"}).status_code == 403
        cross = c.post(
            "/console/teams", data={"name": team, "csrf": token}, headers={"origin": "http://evil"}
        )
        assert cross.status_code == 403
        assert not _audit_rows(gateway, "team.create", team)
        ok = c.post("/console/teams", data={"name": team, "csrf": token})
        assert ok.status_code == 303, ok.text
        via_header = c.post("/console/teams", data={"name": team + "b"}, headers={"x-csrf-token": token})
        assert via_header.status_code == 303
        # Logging out is a write too.
        assert c.post("/console/logout").status_code == 403
    rows = _audit_rows(gateway, "team.create", team)
    assert [(r.actor, r.source) for r in rows] == [("admin", "console")]
    assert rows[0].address == "127.0.0.1"


def test_console_key_create_and_revoke_audited_and_effective(gateway: Gateway) -> None:
    with login(gateway.base_url, ADMIN_KEY) as c:
        csrf = csrf_of(c)
        resp = c.post("/console/keys", data={"csrf": csrf, "team": "alpha", "name": "console-made"})
        assert resp.status_code == 201, resp.text
        plaintext = resp.text.split('id="new-key" type="text" readonly value="')[1].split('"')[0]
        key_id = resp.text.split("<strong>New key ")[1].split(".</strong>")[0]
        sdk = OpenAI(base_url=gateway.v1, api_key=plaintext, max_retries=0)
        assert sdk.models.list().data
        # Shown once: the listing afterwards has its id and prefix, never the key.
        listing = c.get("/console/teams").text
        assert key_id in listing and plaintext not in listing
        assert plaintext not in c.get("/console/api/keys").text
        assert c.post(f"/console/keys/{key_id}/revoke", data={"csrf": csrf}).status_code == 303
    created = _audit_rows(gateway, "key.create", key_id)
    revoked = _audit_rows(gateway, "key.revoke", key_id)
    assert len(created) == 1 and len(revoked) == 1
    assert created[0].detail is not None and created[0].detail["team"] == "alpha"
    with gateway.db.connect() as conn:
        texts = [str(r) for r in conn.execute(sa.text("SELECT * FROM audit_log"))]
    assert not any(plaintext in t for t in texts)


def test_api_and_cli_writes_are_audited(gateway: Gateway, tmp_path: object) -> None:
    team = "api-" + uuid.uuid4().hex[:8]
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers) as c:
        assert c.post("/admin/teams", json={"name": team}).status_code == 201
        created = c.post("/admin/keys", json={"team": team, "name": "api"}).json()
        assert c.post(f"/admin/keys/{created['key_id']}/revoke").status_code == 200
    for action, target in (("team.create", team), ("key.create", created["key_id"])):
        (row,) = _audit_rows(gateway, action, target)
        assert (row.actor, row.source, row.address) == ("admin", "api", "127.0.0.1")
    assert _audit_rows(gateway, "key.revoke", created["key_id"])
    # The CLI writes to the same database; its rows say "cli".
    cfg = tmp_path / "sb.toml"  # type: ignore[operator]
    cfg.write_text(f'[database]\nurl = "{gateway.config.database.url}"\n')
    runner = CliRunner()
    cli_team = "cli-" + uuid.uuid4().hex[:8]
    assert runner.invoke(cli_app, ["teams", "create", cli_team, "-c", str(cfg)]).exit_code == 0
    result = runner.invoke(cli_app, ["keys", "create", cli_team, "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    key_id = result.output.split("key id ")[1].split()[0]
    assert runner.invoke(cli_app, ["keys", "revoke", key_id, "-c", str(cfg)]).exit_code == 0
    for action, target in (("team.create", cli_team), ("key.create", key_id), ("key.revoke", key_id)):
        (row,) = _audit_rows(gateway, action, target)
        assert row.source == "cli" and row.address == "cli" and row.actor.startswith("cli:")
    with login(gateway.base_url, ADMIN_KEY) as c:
        page = c.get("/console/audit").text
        assert cli_team in page and key_id in page and team in page


def test_team_session_sees_its_own_team_only(gateway: Gateway) -> None:
    alpha_key, beta_key = gateway.key("alpha"), gateway.key("beta")
    for key, team in ((alpha_key, "alpha"), (beta_key, "beta")):
        sdk = OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
        sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": f"hi {team}"}])
    with gateway.db.connect() as conn:
        beta_id = conn.execute(sa.text("SELECT id FROM api_keys WHERE team='beta'")).scalars().all()
    with login(gateway.base_url, beta_key) as c:
        keys_json = c.get("/console/api/keys").json()["data"]
        assert keys_json and {k["team"] for k in keys_json} == {"beta"}
        overview = c.get("/console/api/overview", params={"range": "24h"}).json()
        assert overview["team"] == "beta"
        assert [r["group"] for r in overview["by_team"]] == [["beta"]]
        decisions = c.get("/console/api/decisions").json()["data"]
        assert decisions and {d["team"] for d in decisions} == {"beta"}
        usage = c.get("/console/usage", params={"group_by": "team", "since": _RECENT, "format": "json"})
        assert [r["team"] for r in usage.json()["rows"]] == ["beta"]
        assert c.get("/console/usage", params={"team": "alpha"}).status_code == 403
        pages = {p: c.get(p) for p in ("/console/overview", "/console/teams", "/console/usage")}
        for page, resp in pages.items():
            assert resp.status_code == 200, page
            assert "alpha" not in resp.text, page
        for page in ("audit", "backends", "edge", "batches", "savings"):
            assert c.get(f"/console/{page}").status_code == 403, page
        csrf = csrf_of(c, "/console/overview")
        assert c.post("/console/teams", data={"name": "sneaky", "csrf": csrf}).status_code == 403
        assert c.post(f"/console/keys/{beta_id[0]}/revoke", data={"csrf": csrf}).status_code == 403


def test_revoking_the_key_ends_its_team_session(gateway: Gateway) -> None:
    key = gateway.key("beta", name="short-lived")
    with login(gateway.base_url, key) as c:
        assert c.get("/console/overview").status_code == 200
        with httpx.Client(base_url=gateway.base_url, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as a:
            key_id = [k for k in a.get("/admin/keys?team=beta").json()["data"] if k["name"] == "short-lived"]
            assert a.post(f"/admin/keys/{key_id[-1]['key_id']}/revoke").status_code == 200
        assert c.get("/console/overview").status_code == 303


def test_every_admin_page_renders(gateway: Gateway) -> None:
    with login(gateway.base_url, ADMIN_KEY) as c:
        for page in ("overview", "teams", "usage", "backends", "edge", "batches", "audit"):
            resp = c.get(f"/console/{page}")
            assert resp.status_code == 200, (page, resp.text[:500])
            assert "content-security-policy" in resp.headers
        # This config has no reference price: the page says what to set instead of a report.
        savings = c.get("/console/savings")
        assert savings.status_code == 400 and "reports.reference" in savings.text
        for params in ({"range": "24h"}, {"range": "7d"}, {"range": "30d"}, {"since": _RECENT}):
            assert c.get("/console/overview", params=params).status_code == 200, params
        assert c.get("/console/overview", params={"range": "bogus"}).status_code == 400
        live = c.get("/console/overview", params={"range": "1h", "part": "live"})
        assert live.text.lstrip().startswith('<p class="caption">')
        resp = c.get("/console/backends/explain", params={"team": "alpha", "model": "fast"})
        assert resp.status_code == 200 and "explain-candidates" in resp.text
        resp = c.get("/console/usage", params={"group_by": "nope"})
        assert resp.status_code == 400 and "unknown group-by dimension" in resp.text
        csv = c.get("/console/usage", params={"group_by": "team", "since": _RECENT, "format": "csv"})
        assert csv.status_code == 200 and csv.text.startswith("team,")
        assert c.get("/console/static/console.css").status_code == 200
