"""`OpenAICompatBackend.count_tokens` (vLLM's `POST /tokenize`) against live servers: a scripted
tokenizer server for every answer a server may give, and the fake provider, which has no /tokenize (as most
servers have none)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from starlette.types import Receive, Scope, Send

from backends.base import ChatRequest, TokenCounter
from backends.errors import BackendBadResponse, BackendMisconfigured, BackendRejected
from backends.openai_compat import OpenAICompatBackend
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer, free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

TOOLS = ({"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},)
# upstream model -> (status, body) the scripted server answers /tokenize with; other models get a count
SCRIPT: dict[str, tuple[int, bytes]] = {
    "no-tokenize": (404, b'{"detail": "Not Found"}'),
    "wrong-method": (405, b'{"detail": "Method Not Allowed"}'),
    "down": (503, b'{"error": {"message": "overloaded"}}'),
    "refuses": (400, b'{"error": {"message": "tools are not supported by this engine"}}'),
    "bad-key": (401, b'{"error": {"message": "invalid key"}}'),
    "garbage": (200, b"<html>not json</html>"),
    "negative": (200, b'{"count": -3}'),
}


class TokenizerServer:
    """Counts a whitespace-split token per word of every message (or of the prompt); records each request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    def asked(self, model: str) -> int:
        return sum(1 for _, _, body in self.seen if body.get("model") == model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = orjson.loads(raw)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append((scope["path"], headers, body))
        model = body.get("model", "")
        if model == "slow":
            await asyncio.sleep(1.0)
        status, out = SCRIPT.get(model, (200, b""))
        if status == 200 and not out:
            texts = [m["content"] for m in body["messages"]] if "messages" in body else [body["prompt"]]
            count = sum(len(t.split()) for t in texts) + 3 * len(body.get("tools") or ())
            out = orjson.dumps({"count": count, "max_model_len": 2048, "tokens": list(range(count))})
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"json")]})
        await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[tuple[TokenizerServer, str]]:
    app = TokenizerServer()
    with LiveServer(app) as server:
        yield app, server.base_url


def make_backend(base_url: str, timeout_s: float = 5.0) -> OpenAICompatBackend:
    return OpenAICompatBackend(
        "gpu0",
        base_url,
        api_key="sk-test",
        timeout_s=timeout_s,
        connect_timeout_s=1.0,
        max_connections=4,
        supports_tools=True,
        supports_response_format=True,
    )


def chat(model: str, text: str = "one two three", **fields: Any) -> ChatRequest:
    messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": text})
    return ChatRequest(model=model, messages=messages, request_id="req-1", **fields)


async def test_counts_with_the_servers_tokenizer(tokenizer: tuple[TokenizerServer, str]) -> None:
    app, root = tokenizer
    backend = make_backend(root + "/v1/")
    assert isinstance(backend, TokenCounter)
    assert await backend.count_tokens(chat("m1")) == 5
    path, headers, body = app.seen[-1]
    assert path == "/tokenize"  # at the root, beside /v1, as vLLM serves it
    assert headers["authorization"] == "Bearer sk-test"
    assert body == {
        "model": "m1",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}],
        "add_generation_prompt": True,
    }
    assert await backend.count_tokens(chat("m1", tools=TOOLS, tool_choice="auto")) == 5 + 3
    assert app.seen[-1][2]["tools"] == [dict(TOOLS[0])] and "tool_choice" not in app.seen[-1][2]
    legacy = ChatRequest(model="m1", messages=(), request_id="r", prompt="a b c d")
    assert await backend.count_tokens(legacy) == 4
    assert app.seen[-1][2] == {"model": "m1", "prompt": "a b c d"}
    await backend.aclose()


async def test_a_server_without_tokenize_is_asked_once(tokenizer: tuple[TokenizerServer, str]) -> None:
    app, root = tokenizer
    backend = make_backend(root + "/v1")
    for model in ("no-tokenize", "wrong-method"):
        assert await backend.count_tokens(chat(model)) is None
        assert await backend.count_tokens(chat(model)) is None
        assert app.asked(model) == 1, model  # remembered: not asked on every call
    assert await backend.count_tokens(chat("m2")) == 5  # other models are still counted
    await backend.aclose()


async def test_a_server_that_cannot_count_now_is_asked_again(tokenizer: tuple[TokenizerServer, str]) -> None:
    app, root = tokenizer
    backend = make_backend(root + "/v1", timeout_s=0.3)
    for model in ("down", "slow"):
        assert await backend.count_tokens(chat(model)) is None
        assert await backend.count_tokens(chat(model)) is None
        assert app.asked(model) == 2, model
    unreachable = make_backend(f"http://127.0.0.1:{free_port()}/v1")
    assert await unreachable.count_tokens(chat("m1")) is None
    await backend.aclose()
    await unreachable.aclose()


async def test_other_answers_are_backend_errors(tokenizer: tuple[TokenizerServer, str]) -> None:
    _, root = tokenizer
    backend = make_backend(root + "/v1")
    expected = {
        "refuses": BackendRejected,
        "bad-key": BackendMisconfigured,
        "garbage": BackendBadResponse,
        "negative": BackendBadResponse,
    }
    for model, error in expected.items():
        with pytest.raises(error) as info:
            await backend.count_tokens(chat(model, text="planted secret words"))
        assert "planted" not in info.value.message
    await backend.aclose()


async def test_the_fake_provider_has_no_tokenize(fake_provider: FakeProvider) -> None:
    backend = make_backend(fake_provider.openai_base_url)
    assert await backend.count_tokens(chat("fast")) is None
    await backend.aclose()
