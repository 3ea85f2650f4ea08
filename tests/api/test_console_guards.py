"""The console's guards over plain HTTP: login attempts are rate-limited per client address and per account
(a 429 page, or JSON for a script, with Retry-After, before the key is checked), and requests the gateway
refused (429, 403, a privacy floor with no eligible deployment) appear in its recent decisions with the
refusal as their reason."""

from __future__ import annotations

import html
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, Gateway, gateway_config
from tests.support.console import login
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer

PER_ADDRESS, PER_ACCOUNT = 3, 5
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def guarded(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The API tests' gateway with small login limits."""
    tmp: Path = tmp_path_factory.mktemp("gw-login")
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    config = gateway_config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "s")})
    limits = {
        "login_attempts_per_address_per_minute": PER_ADDRESS,
        "login_attempts_per_account_per_minute": PER_ACCOUNT,
    }
    config = config.model_copy(update={"console": config.console.model_copy(update=limits)})
    with LiveServer(create_app(config)) as server:
        db = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, db, fake)
        finally:
            db.dispose()


def attempt(gw: Gateway, key: str, address: str, **headers: str) -> httpx.Response:
    """A login from `address` (uvicorn takes X-Forwarded-For from loopback, as behind a local proxy)."""
    return httpx.post(
        gw.base_url + "/console/login", data={"key": key}, headers={"x-forwarded-for": address, **headers}
    )


def wrong_team_key(prefix: str = "") -> str:
    return ("sk-sb-" + prefix + uuid.uuid4().hex + "x" * 43)[:49]


def test_login_attempts_per_address_are_limited_with_a_clear_429(guarded: Gateway) -> None:
    address = "10.1.0.1"
    for _ in range(PER_ADDRESS):
        assert attempt(guarded, wrong_team_key(), address).status_code == 401
    page = attempt(guarded, ADMIN_KEY, address)  # the right key too: refused before it is checked
    assert page.status_code == 429 and int(page.headers["retry-after"]) >= 1
    assert "Too many login attempts from your address" in page.text
    assert "console.login_attempts_per_address_per_minute" in page.text and "set-cookie" not in page.headers
    script = attempt(guarded, ADMIN_KEY, address, accept="application/json")
    assert script.status_code == 429 and script.headers["retry-after"]
    error = script.json()["error"]
    assert "login_attempts_per_address_per_minute" in error["message"] and ADMIN_KEY not in script.text
    assert attempt(guarded, ADMIN_KEY, "10.1.0.2").status_code == 303  # another address is not limited


def test_login_attempts_per_account_are_limited_across_addresses(guarded: Gateway) -> None:
    prefix = uuid.uuid4().hex[:6]  # one team key's display prefix: one account
    for i in range(PER_ACCOUNT):
        assert attempt(guarded, wrong_team_key(prefix), f"10.2.0.{i}").status_code == 401
    refused = attempt(guarded, wrong_team_key(prefix), "10.2.1.1", accept="application/json")
    assert refused.status_code == 429
    assert "login_attempts_per_account_per_minute" in refused.json()["error"]["message"]
    assert attempt(guarded, wrong_team_key(), "10.2.1.2").status_code == 401  # another account


def test_successful_logins_are_not_counted(guarded: Gateway) -> None:
    for _ in range(PER_ADDRESS + 2):
        assert attempt(guarded, ADMIN_KEY, "10.3.0.1").status_code == 303


def chat(gw: Gateway, key: str, model: str, **headers: str) -> httpx.Response:
    body = {"model": model, "max_tokens": 4, "messages": HELLO}
    return httpx.post(
        gw.v1 + "/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=20,
    )


def decision(gw: Gateway, reply: httpx.Response) -> dict[str, Any]:
    request_id = reply.headers["x-request-id"]
    gw.usage_row(request_id)
    with login(gw.base_url, ADMIN_KEY) as c:
        rows = c.get("/console/api/decisions").json()["data"]
        page = c.get("/console/backends").text
    (row,) = [r for r in rows if r["request_id"] == request_id]
    assert request_id in page and row["route_reason"] in html.unescape(page)
    return row


def test_refused_requests_show_in_recent_decisions_with_their_reason(guarded: Gateway) -> None:
    gw = guarded
    limited = gw.key("alpha", name="one-a-minute", limit_requests=1)
    assert chat(gw, limited, "fast").status_code == 200
    reply = chat(gw, limited, "fast")
    assert reply.status_code == 429
    row = decision(gw, reply)
    assert row["status"] == "error" and row["http_status"] == 429
    assert row["route_reason"].startswith("refused 429 rate_limit_exceeded: ")

    reply = chat(gw, gw.key("beta"), "cloud-claude")  # not among team beta's models
    assert reply.status_code == 403
    assert decision(gw, reply)["route_reason"].startswith("refused 403 model_not_allowed: ")

    reply = chat(gw, gw.key("alpha"), "fast", **{"x-switchboard-privacy": "edge"})  # no edge deployment
    assert reply.status_code == 400
    row = decision(gw, reply)
    assert (
        row["route_reason"].startswith("refused 400 no_eligible_deployment: ")
        and "floor" in row["route_reason"]
    )
    rejected = [c for c in row["candidates"] if c.get("rejected")]
    assert rejected and all("edge" in c["rejected"] for c in rejected), row["candidates"]
