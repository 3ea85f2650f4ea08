"""`OpenAICompatBackend` against the loopback fake provider: answers, pass-through, error mapping."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backends.base import DEFAULT_DEADLINE_MS, Backend, ChatRequest, StreamChunk
from backends.errors import (
    BackendBadResponse,
    BackendError,
    BackendMisconfigured,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from backends.openai_compat import BATCH_PRIORITY_LATER_MS, OpenAICompatBackend
from tests.support.fake_provider import FakeProvider

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    },
)


def make_backend(
    base_url: str, *, timeout_s: float = 5.0, api_key: str | None = "sk-test", send_priority: bool = False
) -> OpenAICompatBackend:
    return OpenAICompatBackend(
        "gpu0",
        base_url,
        api_key=api_key,
        timeout_s=timeout_s,
        connect_timeout_s=1.0,
        max_connections=16,
        supports_tools=True,
        supports_response_format=True,
        send_priority=send_priority,
    )


def chat(model: str, text: str = "hello there", **fields: Any) -> ChatRequest:
    return ChatRequest(
        model=model, messages=({"role": "user", "content": text},), request_id="req-1", **fields
    )


@pytest.fixture(scope="module")
async def backend(fake_provider: FakeProvider) -> AsyncIterator[OpenAICompatBackend]:
    backend = make_backend(fake_provider.openai_base_url)
    yield backend
    await backend.aclose()


async def collect(backend: OpenAICompatBackend, request: ChatRequest) -> list[StreamChunk]:
    return [chunk async for chunk in backend.stream(request)]


async def test_is_a_backend(backend: OpenAICompatBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.info.kind == "openai"
    assert backend.info.name == "gpu0"


async def test_complete(backend: OpenAICompatBackend, fake_provider: FakeProvider) -> None:
    fake_provider.configure("oa-complete", n_tokens=5)
    result = await backend.complete(chat("oa-complete"))
    assert result.message["content"] == "tok0 tok1 tok2 tok3 tok4"
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 5
    assert result.usage.prompt_tokens > 0
    assert result.served_model == "oa-complete"
    received = fake_provider.received("oa-complete")[-1]
    assert received["headers"]["authorization"] == "Bearer sk-test"
    assert "stream" not in received["body"]


async def test_stream_ends_with_usage(backend: OpenAICompatBackend, fake_provider: FakeProvider) -> None:
    fake_provider.configure("oa-stream", n_tokens=4)
    chunks = await collect(backend, chat("oa-stream"))
    text = "".join(c.delta.get("content", "") for c in chunks)
    assert text == "tok0 tok1 tok2 tok3"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 4 and last.usage.prompt_tokens > 0
    assert last.served_model == "oa-stream"
    assert fake_provider.requests("oa-stream")[-1]["stream_options"] == {"include_usage": True}


async def test_params_pass_through(backend: OpenAICompatBackend, fake_provider: FakeProvider) -> None:
    request = chat(
        "oa-params",
        max_tokens=3,
        temperature=0.2,
        top_p=0.9,
        stop=("tok9", "END"),
        seed=7,
        user="u-1",
        tools=TOOLS,
        tool_choice="auto",
        response_format={"type": "json_object"},
    )
    result = await backend.complete(request)
    assert result.finish_reason == "length"
    body = fake_provider.requests("oa-params")[-1]
    assert body["max_tokens"] == 3 and body["temperature"] == 0.2 and body["top_p"] == 0.9
    assert body["stop"] == ["tok9", "END"] and body["seed"] == 7 and body["user"] == "u-1"
    assert body["tools"] == list(TOOLS) and body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"}


async def test_unset_fields_are_not_sent(backend: OpenAICompatBackend, fake_provider: FakeProvider) -> None:
    await backend.complete(chat("oa-minimal"))
    assert set(fake_provider.requests("oa-minimal")[-1]) == {"model", "messages"}


async def test_tool_call_complete_and_stream(backend: OpenAICompatBackend) -> None:
    request = chat("oa-tools", "please CALL_TOOL now", tools=TOOLS)
    result = await backend.complete(request)
    assert result.finish_reason == "tool_calls"
    assert result.message["tool_calls"][0]["function"]["name"] == "get_weather"
    chunks = await collect(backend, request)
    arguments = "".join(
        call["function"].get("arguments", "") for c in chunks for call in c.delta.get("tool_calls", ())
    )
    assert arguments == '{"location":"Paris","unit":"celsius"}'
    assert chunks[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, BackendRateLimited),
        (401, BackendMisconfigured),
        (403, BackendMisconfigured),
        (400, BackendRejected),
        (404, BackendRejected),
        (500, BackendUnavailable),
        (503, BackendUnavailable),
    ],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_status_mapping(
    backend: OpenAICompatBackend,
    fake_provider: FakeProvider,
    status: int,
    error: type[BackendError],
    streaming: bool,
) -> None:
    model = f"oa-fail-{status}-{streaming}"
    fake_provider.configure(model, fail_status=status, retry_after_s=3)
    with pytest.raises(error) as caught:
        if streaming:
            await collect(backend, chat(model))
        else:
            await backend.complete(chat(model))
    assert type(caught.value) is error
    # Upstream's own text is kept for the log; clients see it only when the request itself was refused,
    # and then without addresses or secrets (security finding: internal addresses in error bodies).
    assert caught.value.detail is not None and "failing with" in caught.value.detail
    assert ("failing with" in caught.value.message) is (error is BackendRejected)
    assert "127.0.0.1" not in caught.value.message
    assert "hello there" not in caught.value.message  # never the prompt
    if status == 429:
        assert isinstance(caught.value, BackendRateLimited) and caught.value.retry_after_s == 3.0
    if status in (401, 403):
        assert "backends.gpu0.api_key_env" in caught.value.message


async def test_fail_times_then_recovers(backend: OpenAICompatBackend, fake_provider: FakeProvider) -> None:
    fake_provider.configure("oa-flaky", fail_status=500, fail_times=1)
    with pytest.raises(BackendUnavailable):
        await backend.complete(chat("oa-flaky"))
    assert (await backend.complete(chat("oa-flaky"))).finish_reason == "stop"


@pytest.mark.timeout(10)
async def test_hang_times_out(fake_provider: FakeProvider) -> None:
    fake_provider.configure("oa-hang", hang=True)
    backend = make_backend(fake_provider.openai_base_url, timeout_s=0.3)
    try:
        with pytest.raises(BackendTimeout):
            await backend.complete(chat("oa-hang"))
        with pytest.raises(BackendTimeout):
            await collect(backend, chat("oa-hang"))
    finally:
        await backend.aclose()


async def test_request_timeout_below_backend_timeout(
    backend: OpenAICompatBackend, fake_provider: FakeProvider
) -> None:
    fake_provider.configure("oa-slow", ttft_ms=500)
    with pytest.raises(BackendTimeout):
        await backend.complete(chat("oa-slow", timeout_s=0.1))


async def test_cut_stream_raises_mid_iteration(
    backend: OpenAICompatBackend, fake_provider: FakeProvider
) -> None:
    fake_provider.configure("oa-cut", cut_after_chunks=3, n_tokens=10)
    received: list[StreamChunk] = []
    with pytest.raises(BackendBadResponse):
        async for chunk in backend.stream(chat("oa-cut")):
            received.append(chunk)
    assert received, "the cut must come after some chunks were delivered"


async def test_connection_refused_is_unavailable() -> None:
    backend = make_backend("http://127.0.0.1:1/v1")
    try:
        with pytest.raises(BackendUnavailable):
            await backend.complete(chat("x"))
        health = await backend.health()
        assert not health.ok and "BackendUnavailable" in health.detail
    finally:
        await backend.aclose()


async def test_health(backend: OpenAICompatBackend) -> None:
    health = await backend.health()
    assert health.ok, health.detail


async def test_no_api_key_sends_no_authorization(fake_provider: FakeProvider) -> None:
    backend = make_backend(fake_provider.openai_base_url, api_key=None)
    try:
        await backend.complete(chat("oa-nokey"))
    finally:
        await backend.aclose()
    assert "authorization" not in fake_provider.received("oa-nokey")[-1]["headers"]


async def test_send_priority_tells_vllm_when_each_first_token_is_due(fake_provider: FakeProvider) -> None:
    # vLLM with --scheduling-policy priority serves the lowest `priority` first: the due time, in ms since
    # the epoch (the request's deadline, else the engine's default; batch work a day later).
    backend = make_backend(fake_provider.openai_base_url, send_priority=True)
    sent = time.time() * 1000
    try:
        await backend.complete(chat("oa-prio", deadline_ms=2500))
        await collect(backend, chat("oa-prio", deadline_ms=2500))
        await backend.complete(chat("oa-prio"))
        await backend.complete(chat("oa-prio", deadline_ms=2500, batch=True))
    finally:
        await backend.aclose()
    due = [body["priority"] - sent for body in fake_provider.requests("oa-prio")[-4:]]
    assert all(isinstance(body["priority"], int) for body in fake_provider.requests("oa-prio")[-4:])
    for got, wanted in zip(
        due, (2500, 2500, DEFAULT_DEADLINE_MS, 2500 + BATCH_PRIORITY_LATER_MS), strict=True
    ):
        assert wanted - 1 <= got <= wanted + 5000  # sent within the test's few seconds
    assert due[0] < due[2] < due[3]


async def test_without_send_priority_no_priority_is_sent(
    backend: OpenAICompatBackend, fake_provider: FakeProvider
) -> None:
    # vLLM refuses a priority other than 0 unless started with --scheduling-policy priority.
    await backend.complete(chat("oa-noprio", deadline_ms=2500))
    assert "priority" not in fake_provider.requests("oa-noprio")[-1]


@pytest.mark.timeout(10)
async def test_early_stop_releases_the_connection(fake_provider: FakeProvider) -> None:
    fake_provider.configure("oa-early", n_tokens=50, tokens_per_s=1000)
    backend = OpenAICompatBackend(
        "gpu0",
        fake_provider.openai_base_url,
        api_key=None,
        timeout_s=2.0,
        connect_timeout_s=1.0,
        max_connections=1,
        supports_tools=True,
        supports_response_format=True,
    )
    try:
        for _ in range(3):  # with one pooled connection, a leak would make the next request wait forever
            stream = backend.stream(chat("oa-early"))
            assert "content" in (await anext(stream)).delta
            await stream.aclose()  # type: ignore[attr-defined]
        assert (await backend.complete(chat("oa-early"))).finish_reason == "stop"
    finally:
        await backend.aclose()


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_bad_json_is_bad_response(
    backend: OpenAICompatBackend, fake_provider: FakeProvider, streaming: bool
) -> None:
    fake_provider.configure("oa-garbage", bad_json=True)
    with pytest.raises(BackendBadResponse):
        if streaming:
            await collect(backend, chat("oa-garbage"))
        else:
            await backend.complete(chat("oa-garbage"))
