"""The Anthropic translator without a server: conversation translation, stream events, errors, model pages."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest

from backends.base import StreamChunk, Usage
from backends.errors import SwitchboardError
from gateway.errors import ALL_ERROR_CLASSES, AllBackendsFailed, InvalidRequest
from gateway.translate import anthropic_render as render
from gateway.translate.anthropic_headers import passthrough
from gateway.translate.anthropic_messages import MessagesBody, parse_conversation


class _Rec:
    usage = Usage(11, 7)


class _Stream:
    """What `render_events` reads of a ChunkStream: async iteration and `rec.usage`."""

    def __init__(self, chunks: Sequence[StreamChunk | SwitchboardError]) -> None:
        self.rec, self._chunks = _Rec(), chunks

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        for chunk in self._chunks:
            if isinstance(chunk, SwitchboardError):
                raise chunk
            yield chunk


def events(chunks: Sequence[StreamChunk | SwitchboardError]) -> list[dict[str, Any]]:
    async def collect() -> bytes:
        out = [p async for p in render.render_events(_Stream(chunks), request_id="r1", model="m")]  # type: ignore[arg-type]
        return b"".join(out)

    import asyncio

    raw = asyncio.run(collect()).decode()
    parsed = []
    for block in raw.strip().split("\n\n"):
        name, data = block.split("\n")
        parsed.append({"event": name.removeprefix("event: "), **json.loads(data.removeprefix("data: "))})
        assert parsed[-1]["event"] == parsed[-1]["type"]
    return parsed


def call(index: int, **function: str) -> dict[str, Any]:
    piece: dict[str, Any] = {"index": index, "function": function}
    if "name" in function:
        piece["id"] = f"call_{index}"
    return piece


def test_text_then_two_tools_become_three_blocks_in_order() -> None:
    got = events(
        [
            StreamChunk(delta={"role": "assistant"}),
            StreamChunk(delta={"content": "Let me look."}),
            StreamChunk(delta={"tool_calls": [call(0, name="a", arguments="")]}),
            StreamChunk(delta={"tool_calls": [call(0, arguments='{"x":')]}),
            StreamChunk(delta={"tool_calls": [call(0, arguments="1}")]}),
            StreamChunk(delta={"tool_calls": [call(1, name="b", arguments="{}")]}),
            StreamChunk(finish_reason="tool_calls", usage=Usage(11, 7)),
        ]
    )
    kinds = [(e["type"], e.get("index")) for e in events_without_pings(got)]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    starts = [e["content_block"] for e in got if e["type"] == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "call_0", "name": "a", "input": {}}
    pieces = [
        e["delta"]["partial_json"] for e in got if e.get("index") == 1 and e["type"] == "content_block_delta"
    ]
    assert json.loads("".join(pieces)) == {"x": 1}
    assert got[-2]["delta"]["stop_reason"] == "tool_use"
    assert got[-2]["usage"] == {"input_tokens": 11, "output_tokens": 7}


def events_without_pings(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in got if e["type"] != "ping"]


def test_an_empty_answer_still_has_one_text_block_and_errors_end_the_stream() -> None:
    empty = events([StreamChunk(finish_reason="length", usage=Usage(1, 0))])
    assert [e["type"] for e in events_without_pings(empty)][1:3] == [
        "content_block_start",
        "content_block_stop",
    ]
    assert empty[-2]["delta"]["stop_reason"] == "max_tokens"
    broken = events(
        [StreamChunk(delta={"content": "hi"}), SwitchboardError("backend `x` broke off the stream")]
    )
    assert broken[-1] == {
        "event": "error",
        "type": "error",
        "error": {"type": "api_error", "message": "backend `x` broke off the stream"},
    }


@pytest.mark.parametrize("cls", ALL_ERROR_CLASSES)
def test_every_error_class_has_an_anthropic_status_and_type(cls: type[SwitchboardError]) -> None:
    exc = cls("something failed")
    body = orjson.loads(render.error_body(exc))
    status = render.error_status(exc)
    assert body == {"type": "error", "error": {"type": render.error_type(exc), "message": "something failed"}}
    assert status != 503 and (status == 529) == (exc.status_code == 503)
    expected = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
    expected |= {
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
    assert body["error"]["type"] == expected.get(status, "api_error")


def test_all_backends_failed_takes_its_last_cause() -> None:
    from backends.errors import BackendUnavailable

    exc = AllBackendsFailed([("a", BackendUnavailable("backend `a` unreachable"))])
    assert render.error_status(exc) == 529 and render.error_type(exc) == "overloaded_error"


def test_conversation_becomes_chat_messages() -> None:
    use = {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}
    hour = {"type": "ephemeral", "ttl": "1h"}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "r"}]}
    raw = orjson.dumps(
        {
            "model": "m",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "calling"}, use]},
                {"role": "user", "content": [{**result, "cache_control": hour}]},
            ],
            "tool_choice": {"type": "any"},
        }
    )
    conv = parse_conversation(raw, MessagesBody)
    assert conv.messages == (
        {
            "role": "system",
            "content": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "calling"}],
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "t1",
            "content": [{"type": "text", "text": "r", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        },
    )
    assert conv.tool_choice == "required" and conv.tools is None


def test_headers_are_checked_before_they_are_forwarded() -> None:
    assert passthrough({"anthropic-version": " 2023-06-01 ", "x-other": "y"}) == (
        ("anthropic-version", "2023-06-01"),
    )
    beta = "prompt-caching-2024-07-31, claude-code-20250219"
    assert passthrough({"anthropic-beta": beta}) == (("anthropic-beta", beta),)
    for bad in (
        {"anthropic-version": "latest"},
        {"anthropic-beta": "jane@example.com"},
        {"anthropic-beta": "a b"},
    ):
        with pytest.raises(InvalidRequest) as info:
            passthrough(bad)
        assert info.value.param in bad


def test_model_pages() -> None:
    names = ["a", "b", "c", "d"]
    at = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)

    def page(**kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("after_id", None)
        kwargs.setdefault("before_id", None)
        return dict(orjson.loads(render.render_models(names, at, **kwargs)))

    first = page(limit=2)
    assert [m["id"] for m in first["data"]] == ["a", "b"] and first["has_more"] and first["last_id"] == "b"
    assert first["data"][0] == {
        "type": "model",
        "id": "a",
        "display_name": "a",
        "created_at": "2030-01-02T00:00:00Z",
    }
    rest = page(limit=2, after_id="b")
    assert [m["id"] for m in rest["data"]] == ["c", "d"] and not rest["has_more"]
    before = page(limit=2, before_id="d")
    assert [m["id"] for m in before["data"]] == ["b", "c"] and before["has_more"]
    assert [m["id"] for m in page(limit=5, after_id="a", before_id="d")["data"]] == ["b", "c"]
    with pytest.raises(InvalidRequest):
        page(limit=2, after_id="zz")
