"""Wire shapes the fake provider answers with: OpenAI chat and text completions, and Anthropic messages.

Pure functions from a parsed request body to response bytes / SSE events; no I/O, no clock (the
caller passes `created_s`). The answer is deterministic: "tok0 tok1 ...", cut by `max_tokens` and `stop`;
tool calls when the request has tools and the calls are scripted (or its last user message says
"CALL_TOOL"); "saw <id>=<digest> ..." when it ends with tool results (see tests/support/fake_tools.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tests.support.fake_tools import (
    ToolCall,
    anthropic_input,
    plan_calls,
    result_echo,
    split_pieces,
    tool_results,
)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the fake says: content pieces (deltas), then maybe tool calls, and why it stopped."""

    pieces: tuple[str, ...]
    stop_kind: str  # "stop" | "length" | "tool_calls"
    prompt_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces) + sum(1 + (len(c.arguments) + 3) // 4 for c in self.tool_calls)


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


def _words(text: str) -> tuple[str, ...]:
    words = text.split(" ")
    return tuple(w if i == 0 else " " + w for i, w in enumerate(words)) if text else ()


def make_answer(
    body: Mapping[str, Any],
    n_tokens: int,
    *,
    tool_calls: Sequence[Sequence[str]] = (),
    tool_text: str = "",
    id_prefix: str = "call_",
    nonce: str = "0",
) -> Answer:
    """`tool_calls` are scripted (name, arguments) pairs; `nonce` makes this answer's call ids unique."""
    prompt_tokens = count_prompt_tokens(body)
    results = tool_results(body)
    if results:
        return Answer(result_echo(results), "stop", prompt_tokens)
    calls = plan_calls(body, tool_calls, id_prefix=id_prefix, nonce=nonce)
    if calls:
        return Answer(_words(tool_text), "tool_calls", prompt_tokens, calls)
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


def _openai_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def openai_completion(model: str, answer: Answer, created_s: int) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
    if answer.tool_calls:
        message["tool_calls"] = [_openai_tool_call(call) for call in answer.tool_calls]
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


def _openai_tool_deltas(calls: Sequence[ToolCall], arg_pieces: int, interleave: bool) -> list[dict[str, Any]]:
    """Per call: a first delta with id, name and empty arguments, then the arguments in pieces. Parallel
    calls go one after another, or with `interleave` in turns (a, b, a, b: index tells them apart)."""
    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(calls):
        head = {"index": index, "id": call.id, "type": "function"}
        deltas = [{**head, "function": {"name": call.name, "arguments": ""}}]
        deltas += [
            {"index": index, "function": {"arguments": piece}}
            for piece in split_pieces(call.arguments, arg_pieces)
        ]
        per_call.append(deltas)
    if not interleave:
        return [delta for deltas in per_call for delta in deltas]
    longest = max(len(deltas) for deltas in per_call)
    return [deltas[i] for i in range(longest) for deltas in per_call if i < len(deltas)]


def openai_stream_events(
    model: str,
    answer: Answer,
    created_s: int,
    include_usage: bool,
    *,
    arg_pieces: int = 3,
    interleave: bool = False,
    calls_with_finish: bool = False,
) -> list[bytes]:
    """Every SSE event of the stream, `data: [DONE]` included. Event 0 is the role chunk.
    `calls_with_finish`: the tool calls come whole in the chunk that carries finish_reason."""
    head = b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":%d,"model":%s,' % (
        created_s,
        orjson.dumps(model),
    )
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def chunk(delta: Mapping[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return head + b'"choices":' + orjson.dumps([choice]) + tail

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": piece}, None) for piece in answer.pieces)
    last: dict[str, Any] = {}
    if calls_with_finish and answer.tool_calls:
        last["tool_calls"] = [{"index": i, **_openai_tool_call(c)} for i, c in enumerate(answer.tool_calls)]
    elif answer.tool_calls:
        deltas = _openai_tool_deltas(answer.tool_calls, arg_pieces, interleave)
        events.extend(chunk({"tool_calls": [delta]}, None) for delta in deltas)
    events.append(chunk(last, answer.stop_kind))
    if include_usage:
        usage = orjson.dumps(_openai_usage(answer))
        events.append(head + b'"choices":[],"usage":' + usage + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


# ---- OpenAI legacy text completions ---------------------------------------------------------------------


def _text_choice(text: str, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def text_completion(model: str, answer: Answer, created_s: int) -> bytes:
    return orjson.dumps(
        {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": created_s,
            "model": model,
            "choices": [_text_choice(answer.text, answer.stop_kind)],
            "usage": _openai_usage(answer),
        }
    )


def text_stream_events(model: str, answer: Answer, created_s: int, include_usage: bool) -> list[bytes]:
    base = {"id": "cmpl-fake", "object": "text_completion", "created": created_s, "model": model}
    events = [{**base, "choices": [_text_choice(piece, None)]} for piece in answer.pieces]
    events.append({**base, "choices": [_text_choice("", answer.stop_kind)]})
    if include_usage:
        events.append({**base, "choices": [], "usage": _openai_usage(answer)})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


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
    blocks: list[dict[str, Any]] = []
    if answer.pieces or not answer.tool_calls:
        blocks.append({"type": "text", "text": answer.text})
    blocks.extend(
        {"type": "tool_use", "id": c.id, "name": c.name, "input": anthropic_input(c.arguments)}
        for c in answer.tool_calls
    )
    return blocks


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


def _anthropic_block_events(index: int, block: Mapping[str, Any], deltas: Sequence[Any]) -> list[bytes]:
    start = {"type": "content_block_start", "index": index, "content_block": block}
    events = [_event("content_block_start", start)]
    events.extend(
        _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        for d in deltas
    )
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def anthropic_stream_events(model: str, answer: Answer, *, arg_pieces: int = 3) -> list[bytes]:
    """message_start, ping, per block (text, then each tool_use): content_block_start, deltas,
    content_block_stop; then message_delta, message_stop. A tool_use's input arrives as `input_json_delta`
    pieces of its raw arguments text."""
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
    index = 0
    if answer.pieces or not answer.tool_calls:
        text = [{"type": "text_delta", "text": piece} for piece in answer.pieces]
        events += _anthropic_block_events(index, {"type": "text", "text": ""}, text)
        index += 1
    for call in answer.tool_calls:
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        pieces = split_pieces(call.arguments, arg_pieces) or [""]  # as Anthropic sends an empty input
        events += _anthropic_block_events(
            index, block, [{"type": "input_json_delta", "partial_json": p} for p in pieces]
        )
        index += 1
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
