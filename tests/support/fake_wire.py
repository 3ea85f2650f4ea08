"""Wire shapes the fake provider answers with: OpenAI chat completions and Anthropic messages.

Pure functions from a parsed request body to response bytes / SSE events; no I/O, no clock (the
caller passes `created_s`). The answer is deterministic: "tok0 tok1 ...", cut by `max_tokens` and `stop`,
or a tool call when the request has tools and the last user message contains "CALL_TOOL".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

TOOL_TRIGGER = "CALL_TOOL"
TOOL_ARGUMENTS = {"location": "Paris", "unit": "celsius"}


@dataclass(frozen=True, slots=True)
class Answer:
    """What the fake says: content pieces (deltas) or one tool call, and why it stopped."""

    pieces: tuple[str, ...]
    stop_kind: str  # "stop" | "length" | "tool_calls"
    prompt_tokens: int
    tool_name: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces) if self.tool_name is None else 12


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    """About four characters per token plus four per message, as tokenizers roughly do."""
    messages = body.get("messages") or []
    chars = len(_text_of(body.get("system"))) + sum(len(_text_of(m.get("content"))) for m in messages)
    return max(1, (chars + 3) // 4 + 4 * len(messages))


def _tool_name(body: Mapping[str, Any]) -> str | None:
    tools = body.get("tools")
    if not tools:
        return None
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    if not users or TOOL_TRIGGER not in _text_of(users[-1].get("content")):
        return None
    first = tools[0]
    return str(first.get("function", {}).get("name") or first.get("name") or "tool")


def make_answer(body: Mapping[str, Any], n_tokens: int) -> Answer:
    prompt_tokens = count_prompt_tokens(body)
    tool_name = _tool_name(body)
    if tool_name is not None:
        return Answer((), "tool_calls", prompt_tokens, tool_name)
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    n = n_tokens if limit is None else min(n_tokens, int(limit))
    stops = body.get("stop") or body.get("stop_sequences") or ()
    stops = (stops,) if isinstance(stops, str) else tuple(stops)
    pieces: list[str] = []
    for i in range(n):
        piece = f"tok{i}" if i == 0 else f" tok{i}"
        if any(s and s in piece for s in stops):
            return Answer(tuple(pieces), "stop", prompt_tokens)
        pieces.append(piece)
    return Answer(tuple(pieces), "length" if n < n_tokens else "stop", prompt_tokens)


# ---- OpenAI ---------------------------------------------------------------------------------------------


def _openai_usage(answer: Answer) -> dict[str, int]:
    done = answer.completion_tokens
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": answer.prompt_tokens + done,
    }


def _openai_tool_call(answer: Answer) -> dict[str, Any]:
    arguments = orjson.dumps(TOOL_ARGUMENTS).decode()
    return {
        "id": "call_0",
        "type": "function",
        "function": {"name": answer.tool_name, "arguments": arguments},
    }


def openai_completion(model: str, answer: Answer, created_s: int) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
    if answer.tool_name is not None:
        message["tool_calls"] = [_openai_tool_call(answer)]
    return orjson.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": created_s,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": answer.stop_kind, "logprobs": None}
            ],
            "usage": _openai_usage(answer),
        }
    )


def openai_stream_events(model: str, answer: Answer, created_s: int, include_usage: bool) -> list[bytes]:
    """Every SSE event of the stream, `data: [DONE]` included. Event 0 is the role chunk."""
    head = b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":%d,"model":%s,' % (
        created_s,
        orjson.dumps(model),
    )
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def chunk(delta: Mapping[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return head + b'"choices":' + orjson.dumps([choice]) + tail

    events = [chunk({"role": "assistant", "content": ""}, None)]
    if answer.tool_name is not None:
        call = _openai_tool_call(answer)
        first = {**call, "index": 0, "function": {"name": answer.tool_name, "arguments": ""}}
        events.append(chunk({"tool_calls": [first]}, None))
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        for part in (arguments[:half], arguments[half:]):
            events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}, None))
    events.extend(chunk({"content": piece}, None) for piece in answer.pieces)
    events.append(chunk({}, answer.stop_kind))
    if include_usage:
        usage = orjson.dumps(_openai_usage(answer))
        events.append(head + b'"choices":[],"usage":' + usage + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def openai_error(status: int, message: str) -> bytes:
    kind = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
    error = {
        "message": message,
        "type": kind.get(status, "server_error" if status >= 500 else "invalid_request_error"),
    }
    return orjson.dumps({"error": {**error, "param": None, "code": code.get(status)}})


def openai_models(names: Sequence[str]) -> bytes:
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]
    return orjson.dumps({"object": "list", "data": data})


# ---- Anthropic ------------------------------------------------------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _anthropic_blocks(answer: Answer) -> list[dict[str, Any]]:
    if answer.tool_name is not None:
        return [{"type": "tool_use", "id": "toolu_0", "name": answer.tool_name, "input": TOOL_ARGUMENTS}]
    return [{"type": "text", "text": answer.text}]


def anthropic_message(model: str, answer: Answer) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": _anthropic_blocks(answer),
            "stop_reason": _STOP_REASONS[answer.stop_kind],
            "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens},
        }
    )


def _event(name: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_stream_events(model: str, answer: Answer) -> list[bytes]:
    """message_start, ping, content_block_start, deltas, content_block_stop, message_delta, message_stop."""
    start: dict[str, Any] = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 1},
    }
    events = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("ping", {"type": "ping"}),
    ]
    if answer.tool_name is not None:
        block = {"type": "tool_use", "id": "toolu_0", "name": answer.tool_name, "input": {}}
        arguments = orjson.dumps(TOOL_ARGUMENTS).decode()
        half = len(arguments) // 2
        deltas = [
            {"type": "input_json_delta", "partial_json": p} for p in (arguments[:half], arguments[half:])
        ]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in answer.pieces]
    events.append(
        _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
    )
    events.extend(
        _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas
    )
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta = {"stop_reason": _STOP_REASONS[answer.stop_kind], "stop_sequence": None}
    usage = {"output_tokens": answer.completion_tokens}
    events.append(_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def anthropic_error(status: int, message: str) -> bytes:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
    error = {"type": kind.get(status, "api_error"), "message": message}
    return orjson.dumps({"type": "error", "error": error})


# ---- embeddings (api-embeddings) -------------------------------------------------------------------------

EMBEDDING_DIMENSIONS = 8  # when the request sends no `dimensions`


def fake_vector(item: str | list[int], dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic vector from a hash of the input; each value k/128 (exact in float32)."""
    import hashlib

    seed = (item if isinstance(item, str) else repr(item)).encode()
    raw = b""
    while len(raw) < dimensions:
        raw += hashlib.sha256(seed + len(raw).to_bytes(4, "little")).digest()
    return [(b - 128) / 128 for b in raw[:dimensions]]


def openai_embeddings(body: Mapping[str, Any]) -> bytes:
    """`POST /v1/embeddings`: one fake vector per input (base64 float32 if asked), usage by characters."""
    import base64
    import struct

    given = body.get("input")
    items: list[Any] = [given] if isinstance(given, str) or not isinstance(given, list) else given
    if items and all(isinstance(i, int) for i in items):
        items = [items]  # one token array
    dims = int(body.get("dimensions") or EMBEDDING_DIMENSIONS)
    data = []
    for index, item in enumerate(items):
        vector = fake_vector(item, dims)
        if body.get("encoding_format") == "base64":
            encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        else:
            encoded = vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(max(1, (len(i) + 3) // 4) if isinstance(i, str) else len(i) for i in items)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return orjson.dumps({"object": "list", "data": data, "model": body.get("model"), "usage": usage})
