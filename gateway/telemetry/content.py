"""Prompts and answers as the GenAI semantic conventions' JSON (`gen_ai.input.messages`,
`gen_ai.output.messages`): a list of `{role, parts: [{type, ...}]}`. Used only with capture_content on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from backends.base import ChatRequest, ChatResult, EmbeddingResult, StreamChunk


def input_messages(call: ChatRequest) -> str:
    if call.prompt is not None:  # legacy completions: the raw prompt
        return _json([{"role": "user", "parts": [_text(call.prompt)]}])
    return _json([_message(m) for m in call.messages])


def output_messages(output: ChatResult | EmbeddingResult | Sequence[StreamChunk]) -> str | None:
    if isinstance(output, EmbeddingResult):
        return None
    if isinstance(output, ChatResult):
        return _json([{**_message(output.message), "finish_reason": output.finish_reason}])
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}  # a streamed tool call arrives in pieces, by index
    finish = None
    for chunk in output:
        delta = chunk.delta
        if delta.get("content"):
            text.append(str(delta["content"]))
        for piece in delta.get("tool_calls") or ():
            call = calls.setdefault(int(piece.get("index", 0)), {"id": "", "name": "", "arguments": ""})
            fn = piece.get("function") or {}
            call["id"] = piece.get("id") or call["id"]
            call["name"] = fn.get("name") or call["name"]
            call["arguments"] += fn.get("arguments") or ""
        finish = chunk.finish_reason or finish
    parts: list[dict[str, Any]] = [_text("".join(text))] if text else []
    parts += [{"type": "tool_call", **calls[i]} for i in sorted(calls)]
    return _json([{"role": "assistant", "parts": parts, "finish_reason": finish}])


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    role = str(message.get("role", "user"))
    parts = list(_parts(message.get("content")))
    if role == "tool":
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"), "response": _plain(parts)}]
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": fn.get("name"),
                "arguments": fn.get("arguments"),
            }
        )
    return {"role": role, "parts": parts}


def _parts(content: object) -> Iterable[dict[str, Any]]:
    if isinstance(content, str):
        yield _text(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                yield _text(str(part.get("text", "")))
            elif isinstance(part, Mapping):
                yield {"type": str(part.get("type", "unknown"))}  # images, audio: named, not copied


def _plain(parts: list[dict[str, Any]]) -> str:
    return "".join(str(p.get("content", "")) for p in parts)


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "content": text}


def _json(value: object) -> str:
    return orjson.dumps(value, default=str).decode()
