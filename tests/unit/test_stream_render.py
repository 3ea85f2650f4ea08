"""The stream's hot path writes and reads the same bytes as the plain, whole-object code it replaced:
`ChunkRenderer` against `orjson.dumps` of each chunk object, and `StreamEvents` however a body is split
into network reads."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from backends.base import ChatRequest, StreamChunk, Usage
from backends.errors import BackendBadResponse
from backends.sse_wire import StreamEvents
from gateway.translate.openai_chat import ChunkRenderer


def whole_object(chunk: StreamChunk, *, request_id: str, model: str, created: int) -> bytes:
    payload = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "delta": dict(chunk.delta), "logprobs": None, "finish_reason": chunk.finish_reason}
        ],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DELTAS: list[Mapping[str, Any]] = [
    {"role": "assistant", "content": ""},
    {"content": 'say "hi"\n\\ \u00e9\u4e2d\U0001f600 </script>'},
    {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": '{"a":1}'},
            }
        ]
    },
    {},
    types.MappingProxyType({"content": "from a read-only mapping"}),
]


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("finish_reason", [None, "stop", "tool_calls", 'odd "reason"'])
@pytest.mark.parametrize(
    ("request_id", "model"), [("abc123", "gpt-4o-mini"), ('q"uote\\', 'm\u00fcnchen/\u6a21\u578b "x"')]
)
def test_chunk_renderer_writes_the_whole_objects_bytes(
    delta: Mapping[str, Any], finish_reason: str | None, request_id: str, model: str
) -> None:
    chunk = StreamChunk(delta=delta, finish_reason=finish_reason)
    rendered = ChunkRenderer(request_id=request_id, model=model, created=1_733_000_000).render(chunk)
    assert rendered == whole_object(chunk, request_id=request_id, model=model, created=1_733_000_000)


REQUEST = ChatRequest(model="m", messages=({"role": "user", "content": "hi"},), request_id="r1")


def sse_body() -> bytes:
    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"model": "served-m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    return b"".join(
        [
            b": a comment\n\n",
            event(choice({"role": "assistant", "content": ""})),
            b"event: ignored\n",
            event(choice({"content": "Hel"})),
            b"data:" + orjson.dumps(choice({"content": "lo \u00e9"})) + b"\r\n\r\n",
            event(choice({}, "stop")),
            event(
                {"model": "served-m", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
            ),
            b"data: [DONE]\n\n",
            b"data: {this is after DONE and never read}\n\n",
        ]
    )


def parse(pieces: list[bytes]) -> list[StreamChunk]:
    events = StreamEvents("b0", REQUEST)
    out: list[StreamChunk] = []
    for piece in pieces:
        out.extend(events.feed(piece))
        if events.done:
            break
    out.extend(events.end())
    return out


def test_stream_events_are_the_same_however_the_body_is_split() -> None:
    body = sse_body()
    whole = parse([body])
    assert [dict(c.delta) for c in whole] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo \u00e9"},
        {},
    ]
    last = whole[-1]
    assert (last.finish_reason, last.usage, last.served_model) == ("stop", Usage(5, 2), "served-m")
    for size in (1, 2, 7, 64):
        assert parse([body[i : i + size] for i in range(0, len(body), size)]) == whole


def test_an_error_event_comes_after_the_chunks_read_before_it() -> None:
    good = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    bad = b'data: {"error":{"message":"overloaded"}}\n\n'
    events = StreamEvents("b0", REQUEST)
    got: list[StreamChunk] = []
    with pytest.raises(BackendBadResponse, match="failed mid-stream"):
        for chunk in events.feed(good + bad + good):
            got.append(chunk)
    assert [dict(c.delta) for c in got] == [{"content": "a"}]


def test_a_body_without_finish_reason_and_an_unfinished_last_line() -> None:
    events = StreamEvents("b0", REQUEST)
    tail = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}'  # no newline at EOF
    assert list(events.feed(tail)) == []
    last = list(events.end())[-1]
    assert last.finish_reason == "length" and last.usage is not None  # estimated: upstream sent none
    with pytest.raises(BackendBadResponse, match="before a finish_reason"):
        list(StreamEvents("b0", REQUEST).end())
