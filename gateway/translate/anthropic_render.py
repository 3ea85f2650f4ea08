"""Chat results, streams and errors written in Anthropic's Messages wire format; its model list; token counts.

Streams follow Anthropic's event order (message_start, ping, content_block_start/delta/stop per block,
message_delta with stop_reason and usage, message_stop), every event with its `event:` line: the Anthropic
SDKs drop events without one. A chat tool call becomes a `tool_use` block whose arguments arrive as
`input_json_delta` pieces, as the backend sent them (calls after the first are held to the end, so
interleaved chat deltas never split a block); arguments that are not a JSON object end in an error.
Errors use Anthropic's envelope and statuses: a 503 (no healthy backend, upstream unavailable) is 529
`overloaded_error`, which Anthropic's clients retry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from backends.base import ChatResult, Usage, content_text
from backends.errors import BackendBadResponse, SwitchboardError
from gateway.errors import InvalidRequest
from gateway.pipeline.flow import ChunkStream

# Chat finish reasons -> Anthropic stop reasons. Chat backends do not say which stop sequence matched, so a
# stop is always `end_turn` (never `stop_sequence`, whose `stop_sequence` field would name the string).
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
OVERLOADED = 529


class _AnswerUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageAnswer(BaseModel):
    """What `render_message` writes, for the published schema (rendering itself uses plain dicts)."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: None
    usage: _AnswerUsage


class _ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorAnswer(BaseModel):
    """Anthropic's error envelope: `{"type": "error", "error": {"type", "message"}}`."""

    type: Literal["error"]
    error: _ErrorDetail


class CountAnswer(BaseModel):
    input_tokens: int


class ModelCard(BaseModel):
    type: Literal["model"]
    id: str
    display_name: str
    created_at: str


class ModelPage(BaseModel):
    """`GET /v1/models` in Anthropic's format (requests that send `anthropic-version`)."""

    data: list[ModelCard]
    has_more: bool
    first_id: str | None
    last_id: str | None


def stop_reason(finish_reason: str | None, *, used_tools: bool) -> str:
    if used_tools and finish_reason in (None, "stop", "tool_calls"):
        return "tool_use"
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def _usage(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}


def _tool_input(arguments: Any, name: str) -> dict[str, Any]:
    try:
        value = orjson.loads(arguments or "{}") if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BackendBadResponse(
            f"the backend called tool `{name[:64]}` with arguments that are not a JSON object; "
            "retry the request"
        )
    return value


def content_blocks(message: Mapping[str, Any], request_id: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = content_text(message.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        name = str(function.get("name") or "")
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{request_id}_{i}",
                "name": name,
                "input": _tool_input(function.get("arguments"), name),
            }
        )
    return blocks or [{"type": "text", "text": ""}]


def render_message(result: ChatResult, *, request_id: str, model: str) -> bytes:
    blocks = content_blocks(result.message, request_id)
    used_tools = any(b["type"] == "tool_use" for b in blocks)
    return orjson.dumps(
        {
            "id": f"msg_{request_id}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop_reason(result.finish_reason, used_tools=used_tools),
            "stop_sequence": None,
            "usage": _usage(result.usage),
        }
    )


def event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass
class _Call:
    id: str
    name: str
    pieces: list[str]  # the arguments as the backend streamed them


class _Blocks:
    """Turns chat deltas into content block events: one open block at a time, indexes in order.

    A chat stream may interleave parallel calls (their argument deltas taking turns) and Anthropic's events
    cannot, so only the first tool call streams as it comes; what follows it (later calls, late text) is held
    and sent when the answer ends, each call still in its own `input_json_delta` pieces. Every call's
    arguments must then be a JSON object: `finish` raises otherwise, as `render_message` does."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.index = -1
        self.open: str | None = None  # "text", "tool", or nothing open
        self.live: int | None = None  # chat index of the call that streams as it comes
        self.calls: dict[int, _Call] = {}  # by chat index, in order of appearance
        self.held_text: list[str] = []

    @property
    def used_tools(self) -> bool:
        return bool(self.calls)

    def _start(self, kind: str, block: Mapping[str, Any]) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.open = kind
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*out, event("content_block_start", start)]

    def _delta(self, delta: Mapping[str, Any]) -> bytes:
        return event(
            "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}
        )

    def _start_call(self, call: _Call) -> list[bytes]:
        return self._start("tool", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})

    def _json_delta(self, piece: str) -> bytes:
        return self._delta({"type": "input_json_delta", "partial_json": piece})

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def text(self, piece: str) -> list[bytes]:
        if self.live is not None:
            self.held_text.append(piece)
            return []
        out = [] if self.open == "text" else self._start("text", {"type": "text", "text": ""})
        return [*out, self._delta({"type": "text_delta", "text": piece})]

    def tool(self, delta: Mapping[str, Any]) -> list[bytes]:
        key = int(delta.get("index") or 0)
        function = delta.get("function") or {}
        call = self.calls.get(key)
        if call is None:
            call_id = delta.get("id") or f"toolu_{self.request_id}_{key}"
            call = self.calls[key] = _Call(call_id, function.get("name") or "", [])
        elif function.get("name") and not call.name:
            call.name = function["name"]
        arguments = function.get("arguments")
        if arguments:
            call.pieces.append(arguments)
        out: list[bytes] = []
        if self.live is None:
            self.live = key
            out = self._start_call(call)
        if key == self.live and arguments:
            out.append(self._json_delta(arguments))
        return out

    def feed(self, delta: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        content = delta.get("content")
        if isinstance(content, str) and content:
            out += self.text(content)
        for call in delta.get("tool_calls") or ():
            out += self.tool(call)
        return out

    def finish(self) -> list[bytes]:
        for call in self.calls.values():
            _tool_input("".join(call.pieces), call.name)
        if self.index < 0:  # nothing was said: one empty text block, as a whole answer would have
            return [*self._start("text", {"type": "text", "text": ""}), *self.close()]
        out: list[bytes] = []
        for key, call in self.calls.items():
            if key != self.live:
                out += [*self._start_call(call), *map(self._json_delta, call.pieces)]
        if self.held_text:
            out += self._start("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": "".join(self.held_text)}))
        return [*out, *self.close()]


def message_start(request_id: str, model: str) -> bytes:
    message: dict[str, Any] = {
        "id": f"msg_{request_id}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},  # the counts come with message_delta
    }
    return event("message_start", {"type": "message_start", "message": message})


async def render_events(stream: ChunkStream, *, request_id: str, model: str) -> AsyncIterator[bytes]:
    blocks = _Blocks(request_id)
    finish: str | None = None
    yield message_start(request_id, model) + event("ping", {"type": "ping"})
    try:
        async for chunk in stream:
            for piece in blocks.feed(chunk.delta):
                yield piece
            finish = chunk.finish_reason or finish
        tail = blocks.finish()
    except SwitchboardError as exc:
        # Headers are gone: the error travels as an `error` event, which Anthropic's SDKs raise.
        yield event("error", {"type": "error", "error": {"type": error_type(exc), "message": exc.message}})
        return
    delta = {"stop_reason": stop_reason(finish, used_tools=blocks.used_tools), "stop_sequence": None}
    tail.append(
        event("message_delta", {"type": "message_delta", "delta": delta, "usage": _usage(stream.rec.usage)})
    )
    tail.append(event("message_stop", {"type": "message_stop"}))
    yield b"".join(tail)


# ---- errors ------------------------------------------------------------------------------------------------


def error_status(exc: SwitchboardError) -> int:
    return OVERLOADED if exc.status_code == 503 else exc.status_code


def error_type(exc: SwitchboardError) -> str:
    status = error_status(exc)
    return _ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(exc: SwitchboardError) -> bytes:
    """Anthropic's envelope: {"type": "error", "error": {"type", "message"}}."""
    return orjson.dumps({"type": "error", "error": {"type": error_type(exc), "message": exc.message}})


# ---- models and token counts -------------------------------------------------------------------------------


def render_models(
    names: Sequence[str], created_at: dt.datetime, *, limit: int, after_id: str | None, before_id: str | None
) -> bytes:
    """One page of `GET /v1/models` in Anthropic's format, ids in config order."""
    start, end = 0, len(names)
    for param, value in (("after_id", after_id), ("before_id", before_id)):
        if value is not None and value not in names:
            raise InvalidRequest(f"query parameter `{param}` names no model this key may use", param=param)
    if after_id is not None:
        start = names.index(after_id) + 1
    if before_id is not None:
        end = names.index(before_id)
    if before_id is not None and after_id is None:  # the page just before `before_id`
        start = max(start, end - limit)
        more = start > 0
    else:
        end, more = min(end, start + limit), start + limit < end
    page = list(names[start:end])
    stamp = created_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    data = [{"type": "model", "id": n, "display_name": n, "created_at": stamp} for n in page]
    return orjson.dumps(
        {
            "data": data,
            "has_more": more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
    )


def estimate_input_tokens(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> int:
    """About four characters per token plus four per message: the rule routing and admission use for the
    prompt, widened to tool calls and tool schemas. No tokenizer runs in the gateway process."""
    chars = 0
    for message in messages:
        chars += len(content_text(message.get("content")))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            chars += len(str(function.get("name", ""))) + len(str(function.get("arguments", "")))
    if tools:
        chars += len(orjson.dumps(list(tools)))
    return max(1, chars // 4 + 4 * len(messages))
