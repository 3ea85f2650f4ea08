"""A wire API defined only in this test rides the shared pipeline: auth, routing, limits, cache, ledger.

`Echo` is a translator like gateway/translate/openai_chat.py, for a made-up API with its own body and error
envelope. Nothing in gateway/ knows it: if it needs a change to the pipeline, the pipeline is not shared.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from backends.base import ChatRequest
from backends.errors import SwitchboardError
from gateway.errors import InvalidRequest
from gateway.http.app import create_app
from gateway.pipeline.flow import Answer, ChunkStream
from gateway.pipeline.request import GatewayRequest, RequestContext
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, Gateway, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer

pytestmark = pytest.mark.slow


class Echo:
    endpoint = "test.echo"
    path = "/v1/test/echo"

    def parse(self, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("say"), str):
            raise InvalidRequest("`say` must be a string", param="say")
        return body

    def to_request(self, body: dict[str, Any], ctx: RequestContext) -> GatewayRequest:
        call = ChatRequest(
            model=body.get("model", "fast"),
            messages=({"role": "user", "content": body["say"]},),
            request_id=ctx.request_id,
            temperature=0,  # deterministic: the cache may answer
            timeout_s=ctx.timeout_s,
        )
        return GatewayRequest(
            self.endpoint, call, ctx.identity, ctx.received_at, bool(body.get("stream")), ctx.hints
        )

    def render(self, answer: Answer, body: dict[str, Any], request: GatewayRequest) -> bytes:
        usage = answer.result.usage
        return orjson.dumps({"heard": answer.result.message.get("content"), "tokens": usage.total_tokens})

    async def render_stream(
        self, stream: ChunkStream, body: dict[str, Any], request: GatewayRequest
    ) -> AsyncIterator[bytes]:
        async for chunk in stream:
            if chunk.delta.get("content"):
                yield orjson.dumps({"piece": chunk.delta["content"]}) + b"\n"

    def error_body(self, exc: SwitchboardError) -> bytes:
        return orjson.dumps({"echo_error": exc.code})


@pytest.fixture(scope="module")
def echo_gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    import os

    from gateway.store.db import make_engine

    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    tmp = tmp_path_factory.mktemp("echo")
    config = gateway_config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "s")})
    app = create_app(config)
    app.add_translator(Echo())
    with LiveServer(app) as server:
        engine = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, engine, fake)
        finally:
            engine.dispose()


def echo(gw: Gateway, key: str | None, body: dict[str, Any]) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gw.base_url + Echo.path, json=body, headers=headers, timeout=30)


def test_auth_and_errors_use_the_endpoints_own_envelope(echo_gateway: Gateway) -> None:
    no_key = echo(echo_gateway, None, {"say": "hi"})
    assert no_key.status_code == 401 and no_key.json() == {"echo_error": "invalid_api_key"}
    bad = echo(echo_gateway, echo_gateway.key(), {"say": 3})
    assert bad.status_code == 400 and bad.json() == {"echo_error": "invalid_request"}
    unknown = echo(echo_gateway, echo_gateway.key(), {"say": "hi", "model": "nope"})
    assert unknown.status_code == 404 and unknown.json() == {"echo_error": "model_not_found"}


def test_routing_ledger_and_cache(echo_gateway: Gateway) -> None:
    key = echo_gateway.key()
    first = echo(echo_gateway, key, {"say": "ping the echo"})
    assert first.status_code == 200, first.text
    assert first.json()["tokens"] > 0
    assert first.headers["x-switchboard-backend"] == "fakeoai"
    assert first.headers["x-switchboard-cache"] == "miss" and "x-switchboard-route" in first.headers
    row = echo_gateway.usage_row(first.headers["x-request-id"])
    assert row["team"] == "alpha" and row["requested_model"] == "fast" and row["status"] == "ok"
    assert row["prompt_tokens"] > 0 and row["cost_micro_usd"] > 0 and not row["cache_hit"]
    assert row["endpoint"] == "test.echo"  # the translator's label, in the ledger
    again = echo(echo_gateway, key, {"say": "ping the echo"})
    assert again.status_code == 200 and again.headers["x-switchboard-cache"] == "hit"
    assert again.json() == first.json()
    hit = echo_gateway.usage_row(again.headers["x-request-id"])
    assert hit["cache_hit"] and hit["cost_micro_usd"] == 0 and hit["cost_saved_micro_usd"] > 0
    assert hit["endpoint"] == "test.echo"


def test_metrics_and_reports_carry_the_endpoint(echo_gateway: Gateway) -> None:
    key = echo_gateway.key("beta")
    assert echo(echo_gateway, key, {"say": "count me"}).status_code == 200
    chat = httpx.post(
        echo_gateway.v1 + "/chat/completions",
        json={"model": "fast", "messages": [{"role": "user", "content": "and me"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    assert chat.status_code == 200
    echo_gateway.usage_row(chat.headers["x-request-id"])  # written: reports will see it
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    text = httpx.get(echo_gateway.base_url + "/metrics", headers=admin).text
    for endpoint in ("test.echo", "chat.completions"):
        labels = f'backend="fakeoai",endpoint="{endpoint}",model="fast",status="ok",team="beta"'
        assert f"switchboard_requests_total{{{labels}}}" in text, endpoint
    report = httpx.get(
        echo_gateway.base_url + "/v1/usage",
        params={"group_by": "endpoint", "source": "raw"},
        headers={"authorization": f"Bearer {key}"},
    ).json()
    by_endpoint = {r["endpoint"]: r["requests"] for r in report["rows"]}
    assert by_endpoint["test.echo"] >= 1 and by_endpoint["chat.completions"] >= 1
    only = httpx.get(
        echo_gateway.base_url + "/v1/usage",
        params={"endpoint": "test.echo", "source": "raw"},
        headers={"authorization": f"Bearer {key}"},
    ).json()
    assert only["totals"]["requests"] == by_endpoint["test.echo"]


def test_limits_apply(echo_gateway: Gateway) -> None:
    key = echo_gateway.key(limit_requests=2)
    statuses = [echo(echo_gateway, key, {"say": f"limit {i}"}).status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    refused = echo(echo_gateway, key, {"say": "limit 9"})
    assert refused.json() == {"echo_error": "rate_limit_exceeded"} and "retry-after" in refused.headers
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert echo_gateway.usage_row(refused.headers["x-request-id"])["http_status"] == 429


def test_streams(echo_gateway: Gateway) -> None:
    headers = {"authorization": f"Bearer {echo_gateway.key()}"}
    with httpx.stream(
        "POST", echo_gateway.base_url + Echo.path, json={"say": "stream me", "stream": True}, headers=headers
    ) as response:
        assert response.status_code == 200
        lines = [orjson.loads(line) for line in response.iter_lines() if line]
    assert lines and all("piece" in line for line in lines)
    row = echo_gateway.usage_row(response.headers["x-request-id"])
    assert row["stream"] and row["status"] == "ok" and row["completion_tokens"] > 0
