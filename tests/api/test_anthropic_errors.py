"""Anthropic's API through a live gateway: errors as the `anthropic` SDK's exception classes in Anthropic's
envelope (never a 500), mid-stream errors as `error` events, count_tokens and the model list."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import pytest

from tests.support.api_gateway import Gateway

HELLO = [{"role": "user", "content": "Say hello"}]


def sdk(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20)


def post(gw: Gateway, body: Any, headers: dict[str, str], path: str = "/v1/messages") -> httpx.Response:
    return httpx.post(gw.base_url + path, json=body, headers=headers, timeout=30)


def envelope(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}
    return dict(body["error"])


def test_auth_failures(gateway: Gateway) -> None:
    with pytest.raises(anthropic.AuthenticationError) as info:
        sdk(gateway, "sk-sb-" + "x" * 43).messages.create(model="fast", max_tokens=5, messages=HELLO)
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        missing = post(gateway, {"model": "fast", "max_tokens": 5, "messages": HELLO}, {}, path)
        assert missing.status_code == 401 and "x-api-key" in envelope(missing)["message"]
    models = httpx.get(gateway.base_url + "/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert models.status_code == 401 and envelope(models)["type"] == "authentication_error"


def test_bad_requests_name_the_field(gateway: Gateway) -> None:
    client = sdk(gateway, gateway.key())
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages", body={"model": "fast", "messages": HELLO}, cast_to=object)
    assert "`max_tokens`" in info.value.message
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="fast", max_tokens=5, messages=HELLO, thinking={"type": "enabled", "budget_tokens": 1024}
        )
    assert "`thinking`" in info.value.message
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="fast", max_tokens=5, messages=[{"role": "user", "content": [image]}])
    assert "`messages.0.content.0.type`" in info.value.message and "images" in info.value.message


def test_statuses_map_to_sdk_classes(gateway: Gateway) -> None:
    gateway.fake.configure("m429", fail_status=429, retry_after_s=7)
    gateway.fake.configure("m500", fail_status=500)
    client = sdk(gateway, gateway.key("beta"))
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="gpt-9", max_tokens=5, messages=HELLO)
    assert "gpt-9" in info.value.message and info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        client.messages.create(model="m500", max_tokens=5, messages=HELLO)
    assert "teams.beta.models" in info.value.message
    alpha = sdk(gateway, gateway.key())
    with pytest.raises(anthropic.RateLimitError) as info:
        alpha.messages.create(model="m429", max_tokens=5, messages=HELLO)
    assert info.value.response.headers["retry-after"] == "7"
    with pytest.raises(
        anthropic.OverloadedError
    ) as info:  # upstream 5xx: Switchboard's 503 is Anthropic's 529
        alpha.messages.create(model="m500", max_tokens=5, messages=HELLO)
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as info:
        alpha.messages.create(
            model="fast", max_tokens=5, messages=[{"role": "user", "content": "a" * 70_000}]
        )
    assert info.value.status_code == 413 and info.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


def test_gateway_rate_limit_is_a_rate_limit_error(gateway: Gateway) -> None:
    client = sdk(gateway, gateway.key(limit_requests=1))
    client.messages.create(model="fast", max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="fast", max_tokens=5, messages=HELLO)
    assert "retry-after" in info.value.response.headers
    assert gateway.usage_row(info.value.response.headers["x-request-id"])["http_status"] == 429


def test_stream_cut_midway_ends_with_error_event(gateway: Gateway) -> None:
    gateway.fake.configure("mcut", cut_after_chunks=2, n_tokens=20)
    key = gateway.key()
    body = {"model": "mcut", "max_tokens": 30, "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST", gateway.base_url + "/v1/messages", json=body, headers={"x-api-key": key}
    ) as resp:
        text = resp.read().decode()
    assert resp.status_code == 200
    last = text.strip().split("\n\n")[-1].split("\n")
    assert last[0] == "event: error" and '"type":"api_error"' in last[1]
    row = gateway.usage_row(resp.headers["x-request-id"])
    assert row["status"] == "error" and row["error_type"] == "upstream_bad_response"
    stream = sdk(gateway, key).messages.stream(model="mcut", max_tokens=30, messages=HELLO)
    with pytest.raises(anthropic.APIStatusError) as info, stream as events:
        for _ in events.text_stream:
            pass
    assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def bad(**fields: Any) -> dict[str, Any]:
    return {"model": "fast", "max_tokens": 5, "messages": HELLO, **fields}


def said(role: str, *blocks: Any) -> list[dict[str, Any]]:
    return [{"role": role, "content": list(blocks)}]


def use(tool_input: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": "t", "name": "f", "input": tool_input}


HOSTILE: list[tuple[Any, str]] = [
    (b"{not json", "not valid JSON"),
    ([], "JSON object"),
    (bad(messages="hi"), "`messages`"),
    (bad(messages=[]), "`messages`"),
    (bad(messages=[{"role": "system", "content": "x"}]), "messages.0.role"),
    (bad(messages=[{"role": "user", "content": 7}]), "messages.0.content"),
    (bad(messages=said("user", {"text": "x"})), "messages.0.content.0"),
    (bad(messages=said("user", {"type": "text"})), "messages.0.content.0.text"),
    (bad(messages=said("assistant", use([1]))), "messages.0.content.0.input"),
    (bad(messages=said("assistant", use({"n": 2**70}))), "messages.0.content.0.input.n"),
    (bad(tools=[{"type": "web_search_20250305", "name": "w"}]), "tools.0.type"),
    (bad(tools=[{"name": "f"}]), "tools.0.input_schema"),
    (bad(tool_choice={"type": "tool"}), "tool_choice.name"),
    (bad(temperature=1.5), "temperature"),
    (bad(stream="yes"), "stream"),
    (bad(max_tokens=True), "max_tokens"),
    (bad(max_tokens=0), "max_tokens"),
    (bad(metadata={"user_id": "u", "x": 1}), "metadata.x"),
    (bad(top_k=5), "top_k"),
    (bad(stop_sequences="END"), "stop_sequences"),
    (bad(system=[{"type": "image"}]), "system.0.type"),
]


@pytest.mark.parametrize(("body", "named"), HOSTILE)
def test_bad_input_gets_anthropics_envelope(gateway: Gateway, body: Any, named: str) -> None:
    headers = {"x-api-key": gateway.key(), "content-type": "application/json"}
    if isinstance(body, bytes):
        reply = httpx.post(gateway.base_url + "/v1/messages", content=body, headers=headers, timeout=30)
    else:
        reply = post(gateway, body, headers)
    assert reply.status_code == 400, reply.text
    error = envelope(reply)
    assert error["type"] == "invalid_request_error" and named in error["message"], error


def test_anthropic_version_must_be_a_date(gateway: Gateway) -> None:
    headers = {"x-api-key": gateway.key(), "anthropic-version": "latest"}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        reply = post(gateway, {"model": "fast", "max_tokens": 5, "messages": HELLO}, headers, path)
        assert reply.status_code == 400 and "anthropic-version" in envelope(reply)["message"]
    ok = post(gateway, {"model": "fast", "max_tokens": 5, "messages": HELLO}, {"x-api-key": gateway.key()})
    assert ok.status_code == 200  # a missing version is accepted
    wrong_method = httpx.get(gateway.base_url + "/v1/messages", headers={"x-api-key": gateway.key()})
    assert wrong_method.status_code == 405 and envelope(wrong_method)["type"] == "invalid_request_error"


def test_count_tokens(gateway: Gateway) -> None:
    key = gateway.key(limit_requests=1)
    client = sdk(gateway, key)
    short = client.messages.count_tokens(model="fast", messages=HELLO)
    longer = client.messages.count_tokens(
        model="fast",
        system="You are a careful assistant who answers in full sentences.",
        messages=[
            *HELLO,
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again " * 40},
        ],
        tools=[
            {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}
        ],
    )
    assert 0 < short.input_tokens < longer.input_tokens
    raw = client.messages.with_raw_response.count_tokens(model="fast", messages=HELLO)
    # The fake provider has no /tokenize (a 404, as most OpenAI-compatible servers), so this is the estimate.
    assert raw.headers["x-switchboard-token-count"] == "estimate"
    assert "x-switchboard-backend" not in raw.headers
    # No ledger row, nothing taken from the key's one request a minute.
    time.sleep(0.3)
    assert gateway.count_rows(raw.headers["x-request-id"]) == 0
    client.messages.create(model="fast", max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk(gateway, gateway.key("beta")).messages.count_tokens(model="cloud-claude", messages=HELLO)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="gpt-9", messages=HELLO)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages/count_tokens", body={"model": "fast"}, cast_to=object)
    assert "`messages`" in info.value.message
    beta = client.post(
        "/v1/messages/count_tokens?beta=true", body={"model": "fast", "messages": HELLO}, cast_to=object
    )
    assert beta == {"input_tokens": short.input_tokens}


def test_count_tokens_is_planned_like_a_request(gateway: Gateway) -> None:
    """Routing's headers are checked as for /v1/messages; a count no deployment may take is the estimate."""
    client = sdk(gateway, gateway.key())
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.count_tokens(
            model="fast", messages=HELLO, extra_headers={"x-switchboard-privacy": "secret"}
        )
    assert "x-switchboard-privacy" in info.value.message
    private = client.messages.with_raw_response.count_tokens(
        model="fast", messages=HELLO, extra_headers={"x-switchboard-privacy": "edge"}
    )
    plain = client.messages.count_tokens(model="fast", messages=HELLO)
    assert private.parse().input_tokens == plain.input_tokens
    assert private.headers["x-switchboard-token-count"] == "estimate"
    cloud = client.messages.with_raw_response.count_tokens(model="cloud-gpt", messages=HELLO)
    assert cloud.headers["x-switchboard-token-count"] == "estimate"  # no tokenizer endpoint through litellm


def test_models_in_anthropics_format(gateway: Gateway) -> None:
    client = sdk(gateway, gateway.key("beta"))
    page = client.models.list()
    assert [m.id for m in page.data] == ["fast", "cloud-gpt"]
    assert all(m.type == "model" and m.display_name == m.id and m.created_at for m in page.data)
    assert not page.has_more and page.first_id == "fast" and page.last_id == "cloud-gpt"
    first = client.models.list(limit=1)
    assert [m.id for m in first.data] == ["fast"] and first.has_more
    assert [m.id for m in client.models.list(limit=1)] == ["fast", "cloud-gpt"]  # the SDK pages through
    assert [m.id for m in client.models.list(before_id="cloud-gpt").data] == ["fast"]
    headers = {"authorization": f"Bearer {gateway.key('beta')}"}
    openai_format = httpx.get(gateway.v1 + "/models", headers=headers).json()
    assert openai_format["object"] == "list" and [m["id"] for m in openai_format["data"]] == [
        "fast",
        "cloud-gpt",
    ]
    paged = httpx.get(gateway.v1 + "/models?limit=1", headers=headers)
    assert paged.status_code == 400 and paged.json()["error"]["param"] == "limit"
    unknown = httpx.get(
        gateway.v1 + "/models?after_id=nope", headers={**headers, "anthropic-version": "2023-06-01"}
    )
    assert unknown.status_code == 400 and "after_id" in envelope(unknown)["message"]
