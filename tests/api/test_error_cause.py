"""Errors are judged by their cause: a request the backend (or litellm, locally) rejects as malformed is the
request's fault. It is a 400 that is not retried and touches neither the circuit breaker nor the live stats,
so one team's bad input cannot take a deployment that other teams share out of routing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.http.app import create_app
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, Gateway, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer

BREAKER_FAILURES = 2


@pytest.fixture(scope="module")
def strict_gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The API tests' gateway, but a circuit opens after two failures in a row."""
    tmp: Path = tmp_path_factory.mktemp("gw-breaker")
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    config = gateway_config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "s")})
    routing = config.routing.model_copy(update={"breaker_failures": BREAKER_FAILURES})
    config = config.model_copy(update={"routing": routing})
    with LiveServer(create_app(config)) as server:
        db = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, db, fake)
        finally:
            db.dispose()


def post(gw: Gateway, key: str, content: object) -> httpx.Response:
    body = {"model": "cloud-claude", "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
    return httpx.post(
        gw.v1 + "/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=20
    )


def test_bad_input_from_one_team_cannot_open_a_shared_circuit(strict_gateway: Gateway) -> None:
    gw = strict_gateway
    mallory, alice = gw.key("alpha", name="mallory"), gw.key("alpha", name="alice")
    before = len(gw.fake.requests("claude-haiku-4-5"))
    # A file part litellm cannot turn into Anthropic's format: refused by litellm before anything is sent.
    for _ in range(BREAKER_FAILURES * 3):
        reply = post(gw, mallory, [{"type": "file", "file": {"file_data": "not a data url"}}])
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["code"] == "upstream_rejected_request" and error["type"] == "invalid_request_error"
        row = gw.usage_row(reply.headers["x-request-id"])
        assert row["attempts"] == 1 and row["http_status"] == 400  # not retried
    # A content part of a type OpenAI does not define never reaches a backend: refused by name.
    for _ in range(BREAKER_FAILURES * 2):
        reply = post(gw, mallory, [{"type": "no_such_part", "text": "hi"}])
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "messages.0.content.0.type"
    assert len(gw.fake.requests("claude-haiku-4-5")) == before
    ok = post(gw, alice, "hello")
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-switchboard-backend"] == "cloud_anthropic"


def test_a_real_outage_still_opens_the_circuit(strict_gateway: Gateway) -> None:
    """The same breaker does open for failures of the backend itself (the control for the test above)."""
    gw = strict_gateway
    key = gw.key("alpha", name="outage")
    gw.fake.configure("claude-haiku-4-5", fail_status=500)
    try:
        for _ in range(BREAKER_FAILURES):
            assert post(gw, key, "hello").status_code == 503
        refused = post(gw, key, "hello")
        assert refused.status_code == 503 and "circuit open" in refused.json()["error"]["message"]
    finally:
        gw.fake.configure("claude-haiku-4-5", fail_status=None)


def test_content_part_errors_name_the_field(strict_gateway: Gateway) -> None:
    key = strict_gateway.key("alpha", name="parts")
    cases = [
        ([{"type": "text"}], "messages.0.content.0.text"),
        ([{"type": "text", "text": 5}], "messages.0.content.0.text"),
        ([{"type": "image_url"}], "messages.0.content.0.image_url"),
        ([{"text": "no type"}], "messages.0.content.0.type"),
    ]
    for content, param in cases:
        reply = post(strict_gateway, key, content)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
