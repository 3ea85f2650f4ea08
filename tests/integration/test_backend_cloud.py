"""`CloudBackend` (litellm) against the loopback fake provider, over the OpenAI and Anthropic protocols."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest

from backends.base import Backend, ChatRequest, StreamChunk
from backends.cloud import CloudBackend
from backends.errors import (
    BackendBadResponse,
    BackendError,
    BackendMisconfigured,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
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
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


def make_backend(fake: FakeProvider, provider: str, *, timeout_s: float = 5.0) -> CloudBackend:
    # OpenAI clients want the /v1 base; litellm appends /v1/messages to an anthropic api_base itself.
    api_base = fake.openai_base_url if provider == "openai" else fake.base_url
    return CloudBackend("cloud0", provider, api_key="sk-cloud", api_base=api_base, timeout_s=timeout_s)


def chat(model: str, text: str = "hello there", **fields: Any) -> ChatRequest:
    messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": text})
    return ChatRequest(model=model, messages=messages, request_id="req-1", max_tokens=64, **fields)


@pytest.fixture(params=["openai", "anthropic"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(fake_provider: FakeProvider, provider: str) -> CloudBackend:
    return make_backend(fake_provider, provider)


async def collect(backend: CloudBackend, request: ChatRequest) -> list[StreamChunk]:
    return [chunk async for chunk in backend.stream(request)]


async def test_is_a_backend(backend: CloudBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.info.kind == "cloud"


async def test_complete(backend: CloudBackend, fake_provider: FakeProvider, provider: str) -> None:
    model = f"cl-complete-{provider}"
    fake_provider.configure(model, n_tokens=5)
    result = await backend.complete(chat(model))
    assert result.message == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4"}
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 5 and result.usage.prompt_tokens > 0
    assert result.served_model == model
    received = fake_provider.received(model)
    assert len(received) == 1 and received[0]["path"] == PATHS[provider]
    headers = received[0]["headers"]
    assert "sk-cloud" in (headers.get("authorization", "") + headers.get("x-api-key", ""))


async def test_debug_logging_shows_no_prompt_text(
    backend: CloudBackend, fake_provider: FakeProvider, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    """litellm logs whole requests on its own loggers at DEBUG; with the root at DEBUG, none of it shows."""
    caplog.set_level(logging.DEBUG)
    model = f"cl-debug-{provider}"
    fake_provider.configure(model, n_tokens=3)
    await backend.complete(chat(model, "unlogged words"))
    await collect(backend, chat(model, "unlogged words"))
    assert "unlogged words" not in caplog.text
    assert "sk-cloud" not in caplog.text


async def test_stream_ends_with_usage(
    backend: CloudBackend, fake_provider: FakeProvider, provider: str
) -> None:
    model = f"cl-stream-{provider}"
    fake_provider.configure(model, n_tokens=4)
    chunks = await collect(backend, chat(model))
    assert "".join(c.delta.get("content", "") for c in chunks) == "tok0 tok1 tok2 tok3"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 4 and last.usage.prompt_tokens > 0
    assert fake_provider.requests(model)[-1]["stream"] is True


async def test_params_pass_through(backend: CloudBackend, fake_provider: FakeProvider, provider: str) -> None:
    model = f"cl-params-{provider}"
    await backend.complete(chat(model, temperature=0.2, top_p=0.9, stop=("tok9",), seed=7, user="u-1"))
    body = fake_provider.requests(model)[-1]
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["max_tokens"] == 64
    if provider == "openai":
        assert body["stop"] == ["tok9"] and body["seed"] == 7
        assert backend.info.supports_seed
    else:
        assert body["stop_sequences"] == ["tok9"] and "seed" not in body
        assert body["metadata"] == {"user_id": "u-1"} and body["system"][0]["text"] == "be brief"
        assert not backend.info.supports_seed


async def test_user_reaches_openai_for_catalog_models(fake_provider: FakeProvider) -> None:
    """litellm forwards `user` to openai only for models it knows (documented in backends/cloud.py)."""
    await make_backend(fake_provider, "openai").complete(chat("gpt-4o-mini", user="u-2"))
    assert fake_provider.requests("gpt-4o-mini")[-1]["user"] == "u-2"


async def test_response_format_reaches_openai(fake_provider: FakeProvider) -> None:
    backend = make_backend(fake_provider, "openai")
    await backend.complete(chat("cl-rf", response_format={"type": "json_object"}))
    assert fake_provider.requests("cl-rf")[-1]["response_format"] == {"type": "json_object"}


async def test_tool_call(backend: CloudBackend, fake_provider: FakeProvider, provider: str) -> None:
    model = f"cl-tools-{provider}"
    request = chat(model, "please CALL_TOOL now", tools=TOOLS, tool_choice="auto")
    result = await backend.complete(request)
    assert result.finish_reason == "tool_calls"
    call = result.message["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and "Paris" in call["function"]["arguments"]
    body = fake_provider.requests(model)[-1]
    assert body["tools"][0]["name" if provider == "anthropic" else "function"]
    chunks = await collect(backend, request)
    streamed = [t for c in chunks for t in c.delta.get("tool_calls", ())]
    assert streamed[0]["function"]["name"] == "get_weather"
    assert "Paris" in "".join(t["function"].get("arguments", "") for t in streamed)
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
    backend: CloudBackend,
    fake_provider: FakeProvider,
    provider: str,
    status: int,
    error: type[BackendError],
    streaming: bool,
) -> None:
    model = f"cl-fail-{status}-{streaming}-{provider}"
    fake_provider.configure(model, fail_status=status, retry_after_s=3)
    with pytest.raises(error) as caught:
        if streaming:
            await collect(backend, chat(model))
        else:
            await backend.complete(chat(model))
    assert type(caught.value) is error
    assert "hello there" not in caught.value.message
    assert len(fake_provider.requests(model)) == 1, "litellm must not retry"
    if status == 429:
        assert isinstance(caught.value, BackendRateLimited) and caught.value.retry_after_s == 3.0
    if status in (401, 403):
        assert "backends.cloud0.api_key_env" in caught.value.message


@pytest.mark.timeout(15)
async def test_hang_times_out(fake_provider: FakeProvider, provider: str) -> None:
    model = f"cl-hang-{provider}"
    fake_provider.configure(model, hang=True)
    backend = make_backend(fake_provider, provider, timeout_s=0.3)
    with pytest.raises(BackendTimeout):
        await backend.complete(chat(model))
    with pytest.raises(BackendTimeout):
        await collect(backend, chat(model))


async def test_cut_stream_raises_mid_iteration(
    backend: CloudBackend, fake_provider: FakeProvider, provider: str
) -> None:
    model = f"cl-cut-{provider}"
    fake_provider.configure(model, cut_after_chunks=4, n_tokens=10)
    received: list[StreamChunk] = []
    with pytest.raises(BackendBadResponse):
        async for chunk in backend.stream(chat(model)):
            received.append(chunk)
    assert received, "the cut must come after some chunks were delivered"


async def test_connection_refused_is_unavailable(provider: str) -> None:
    api_base = "http://127.0.0.1:1/v1" if provider == "openai" else "http://127.0.0.1:1"
    backend = CloudBackend("cloud0", provider, api_key="k", api_base=api_base, timeout_s=2)
    with pytest.raises(BackendUnavailable):
        await backend.complete(chat("x"))


async def test_a_request_litellm_refuses_to_build_is_the_requests_fault(
    backend: CloudBackend, fake_provider: FakeProvider, provider: str
) -> None:
    """litellm raises APIConnectionError for a content part of an unknown type without sending anything:
    that is a rejected request (400, not retried, breaker untouched), not an unreachable backend."""
    model = f"badpart-{provider}"
    bad = ChatRequest(
        model=model,
        messages=({"role": "user", "content": [{"type": "no_such_part", "text": "hi"}]},),
        request_id="req-bad",
        max_tokens=8,
    )
    for call in (backend.complete(bad), collect(backend, bad)):
        with pytest.raises(BackendRejected) as info:
            await call
        assert not info.value.retryable and info.value.status_code == 400
    assert fake_provider.requests(model) == []  # nothing was sent


async def test_unknown_provider_is_misconfigured() -> None:
    with pytest.raises(BackendMisconfigured, match="backends.c9.provider"):
        CloudBackend("c9", "no-such-provider", api_key=None, api_base=None, timeout_s=1)


async def test_price_from_local_cost_map() -> None:
    backend = CloudBackend("c1", "openai", api_key=None, api_base=None, timeout_s=1)
    assert backend.price_usd_per_mtok("gpt-4o-mini") == (Decimal("0.15"), Decimal("0.6"))
    assert backend.price_usd_per_mtok("no-such-model") is None


async def test_early_stop_then_reuse(
    backend: CloudBackend, fake_provider: FakeProvider, provider: str
) -> None:
    model = f"cl-early-{provider}"
    fake_provider.configure(model, n_tokens=50, tokens_per_s=1000)
    stream = backend.stream(chat(model))
    assert (await anext(stream)).delta
    await stream.aclose()  # type: ignore[attr-defined]
    assert (await backend.complete(chat(model))).finish_reason in ("stop", "length")
