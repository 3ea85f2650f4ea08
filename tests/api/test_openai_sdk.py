"""The official `openai` SDK, sync and async, against a live gateway in front of the fake provider."""

from __future__ import annotations

import datetime as dt

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support.api_gateway import ADMIN_KEY, Gateway

HELLO = [{"role": "user", "content": "Say hello"}]


def client(gw: Gateway, key: str) -> OpenAI:
    return OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=20)


def test_chat_non_streaming_with_headers(gateway: Gateway) -> None:
    raw = client(gateway, gateway.key()).chat.completions.with_raw_response.create(
        model="fast", messages=HELLO
    )
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "fast"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert len(raw.headers["x-request-id"]) == 32
    assert float(raw.headers["x-switchboard-overhead-ms"]) >= 0


def test_stream_with_usage(gateway: Gateway) -> None:
    stream = client(gateway, gateway.key()).chat.completions.create(
        model="fast", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]


def test_stream_without_usage_has_no_usage_chunk(gateway: Gateway) -> None:
    chunks = list(
        client(gateway, gateway.key()).chat.completions.create(model="fast", messages=HELLO, stream=True)
    )
    assert all(c.choices for c in chunks)


async def test_async_client_chat_and_stream(gateway: Gateway) -> None:
    async with AsyncOpenAI(base_url=gateway.v1, api_key=gateway.key(), max_retries=0) as aclient:
        completion = await aclient.chat.completions.create(model="fast", messages=HELLO)
        assert completion.choices[0].message.content
        stream = await aclient.chat.completions.create(
            model="fast", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        parts = [c async for c in stream]
        assert parts[-1].usage is not None


def test_parameters_pass_through(gateway: Gateway) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    client(gateway, gateway.key()).chat.completions.create(
        model="fast",
        messages=HELLO,
        max_completion_tokens=7,
        temperature=0.3,
        top_p=0.9,
        stop=["END"],
        seed=42,
        user="u-1",
        tools=tools,
        tool_choice="auto",
    )
    sent = gateway.fake.requests("fast")[-1]
    assert sent["max_tokens"] == 7
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9
    assert sent["stop"] == ["END"] and sent["seed"] == 42 and sent["user"] == "u-1"
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"


def test_tool_call_round_trip(gateway: Gateway) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    completion = client(gateway, gateway.key()).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "CALL_TOOL please"}], tools=tools
    )
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.tool_calls


def test_models_listing_per_team_and_key(gateway: Gateway) -> None:
    alpha = {m.id for m in client(gateway, gateway.key("alpha")).models.list()}
    assert alpha == set(gateway.config.models)
    beta = {m.id for m in client(gateway, gateway.key("beta")).models.list()}
    assert beta == {"fast", "cloud-gpt"}
    narrowed = {m.id for m in client(gateway, gateway.key("beta", models=["fast"])).models.list()}
    assert narrowed == {"fast"}


@pytest.mark.parametrize(
    ("knobs", "exc_type", "status"),
    [
        ({"fail_status": 429, "retry_after_s": 7}, openai.RateLimitError, 429),
        ({"fail_status": 500}, openai.InternalServerError, 503),
        ({"fail_status": 401}, openai.InternalServerError, 502),
    ],
)
def test_upstream_errors_map_to_sdk_exceptions(
    gateway: Gateway, knobs: dict[str, object], exc_type: type[Exception], status: int
) -> None:
    model = {429: "m429", 503: "m500", 502: "m401"}[status]
    gateway.fake.configure(model, **knobs)
    with pytest.raises(exc_type) as info:
        client(gateway, gateway.key()).chat.completions.create(model=model, messages=HELLO)
    err = info.value
    assert isinstance(err, openai.APIStatusError) and err.status_code == status
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "fakeoai" in body["message"]
    assert "sk-fake-upstream" not in err.response.text
    if status == 429:
        assert err.response.headers["retry-after"] == "7"
    if status == 502:
        assert "backends.fakeoai.api_key_env" in body["message"]


def test_upstream_hang_is_504(gateway: Gateway) -> None:
    gateway.fake.configure("mhang", hang=True)
    with pytest.raises(openai.InternalServerError) as info:
        client(gateway, gateway.key()).chat.completions.create(model="mhang", messages=HELLO)
    assert info.value.status_code == 504
    assert "backends.fakeshort.timeout_s" in info.value.message


def test_auth_errors(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "sk-sb-" + "x" * 43).models.list()
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "not-a-switchboard-key").chat.completions.create(model="fast", messages=HELLO)
    resp = httpx.post(gateway.v1 + "/chat/completions", json={"model": "fast", "messages": HELLO})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404_naming_available(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(gateway, gateway.key("beta")).chat.completions.create(model="gpt-9", messages=HELLO)
    assert "gpt-9" in info.value.message and "fast, cloud-gpt" in info.value.message


def test_model_outside_team_or_key_is_403(gateway: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(gateway, gateway.key("beta")).chat.completions.create(model="m500", messages=HELLO)
    assert "teams.beta.models" in info.value.message
    narrowed = gateway.key("alpha", models=["fast"])
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(gateway, narrowed).chat.completions.create(model="cloud-gpt", messages=HELLO)
    assert "allowed: fast" in info.value.message


def test_revoked_and_expired_keys(gateway: Gateway) -> None:
    from gateway.store import keys

    created = keys.create_key(gateway.db, "alpha", name="t", models=None, expires_at=None)
    sdk = client(gateway, created.plaintext)
    assert sdk.models.list()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    resp = httpx.post(f"{gateway.base_url}/admin/keys/{created.key_id}/revoke", headers=admin)
    assert resp.status_code == 200
    with pytest.raises(openai.AuthenticationError) as info:
        sdk.models.list()
    assert "revoked" in info.value.message
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    expired = gateway.key("alpha", expires_at=past, now=past - dt.timedelta(hours=1))
    with pytest.raises(openai.AuthenticationError) as info:
        client(gateway, expired).models.list()
    assert "expired" in info.value.message


def test_n_greater_than_one_is_refused(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway, gateway.key()).chat.completions.create(model="fast", messages=HELLO, n=2)
    assert info.value.response.json()["error"]["param"] == "n"
    assert "`n`" in info.value.message


def test_tools_refused_where_backend_cannot(gateway: Gateway) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway, gateway.key()).chat.completions.create(model="notools", messages=HELLO, tools=tools)
    assert "backends.notools.supports_tools" in info.value.message


def test_stream_cut_midway_ends_with_error_event(gateway: Gateway) -> None:
    gateway.fake.configure("mcut", cut_after_chunks=2, n_tokens=20)
    stream = client(gateway, gateway.key()).chat.completions.with_raw_response.create(
        model="mcut", messages=HELLO, stream=True
    )
    request_id = stream.headers["x-request-id"]
    with pytest.raises(openai.APIError):
        for _ in stream.parse():
            pass
    row = gateway.usage_row(request_id)
    assert row["status"] == "error" and row["error_type"] == "upstream_bad_response" and row["stream"]


async def test_async_client_raises_the_same_exception_classes(gateway: Gateway) -> None:
    gateway.fake.configure("m429", fail_status=429, retry_after_s=7)
    async with AsyncOpenAI(base_url=gateway.v1, api_key=gateway.key("beta"), max_retries=0) as aclient:
        with pytest.raises(openai.NotFoundError):
            await aclient.chat.completions.create(model="gpt-9", messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError):
            await aclient.chat.completions.create(model="m429", messages=HELLO)
        with pytest.raises(openai.BadRequestError):
            await aclient.chat.completions.create(model="fast", messages=[])
        with pytest.raises(openai.APIStatusError) as info:
            await aclient.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "a" * 70_000}]
            )
        assert info.value.status_code == 413
    async with AsyncOpenAI(base_url=gateway.v1, api_key=gateway.key("alpha"), max_retries=0) as aclient:
        with pytest.raises(openai.RateLimitError):
            await aclient.chat.completions.create(model="m429", messages=HELLO)
        with pytest.raises(openai.RateLimitError):  # a stream that fails before its first byte is a plain 429
            await aclient.chat.completions.create(model="m429", messages=HELLO, stream=True)
    async with AsyncOpenAI(base_url=gateway.v1, api_key="sk-sb-" + "z" * 43, max_retries=0) as aclient:
        with pytest.raises(openai.AuthenticationError):
            await aclient.models.list()


def test_routing_preferences_in_a_header(gateway: Gateway) -> None:
    sdk = client(gateway, gateway.key())
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model="fast",
            messages=HELLO,
            extra_headers={"x-switchboard-preferences": '{"ignore": ["fakeoai"]}'},
        )
    assert info.value.response.json()["error"]["code"] == "no_eligible_deployment"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model="fast", messages=HELLO, extra_headers={"x-switchboard-preferences": "{"}
        )
    assert info.value.response.json()["error"]["param"] == "x-switchboard-preferences"
    ok = sdk.chat.completions.with_raw_response.create(
        model="fast", messages=HELLO, extra_headers={"x-switchboard-preferences": '{"only": ["fakeoai"]}'}
    )
    assert ok.headers["x-switchboard-backend"] == "fakeoai"
