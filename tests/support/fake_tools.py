"""Tool calls in the fake provider's answers: which calls to make, their ids, how their arguments are cut into
stream pieces, and the text that proves a tool result came back.

Pure functions, no I/O. Arguments are raw text sent exactly as scripted, so a test can script arguments that
are not JSON (a malformed call). Ids come from a nonce the caller passes: unique per answer, reproducible.
Both wire formats are read: OpenAI (`role: tool` messages) and Anthropic (`tool_result` blocks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

TOOL_TRIGGER = "CALL_TOOL"
TOOL_ARGUMENTS = {"location": "Paris", "unit": "celsius"}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str  # "call_..." (OpenAI) or "toolu_..." (Anthropic)
    name: str
    arguments: str  # raw text, as sent; not always JSON


def call_id(prefix: str, nonce: str, index: int) -> str:
    return prefix + hashlib.sha256(f"{nonce}:{index}".encode()).hexdigest()[:24]


def digest(text: str) -> str:
    """What the fake echoes for a tool result it received: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def tool_results(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(call id, result text) for each tool result the request ends with; [] when it ends otherwise."""
    messages = body.get("messages") or []
    if not messages:
        return []
    last = messages[-1]
    if last.get("role") == "tool":
        trailing: list[Mapping[str, Any]] = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            trailing.insert(0, message)
        return [(str(m.get("tool_call_id", "")), _block_text(m.get("content"))) for m in trailing]
    content = last.get("content")
    if last.get("role") == "user" and isinstance(content, list):
        return [
            (str(block.get("tool_use_id", "")), _block_text(block.get("content")))
            for block in content
            if isinstance(block, Mapping) and block.get("type") == "tool_result"
        ]
    return []


def result_echo(results: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The answer after tool results: "saw <id>=<digest> ..." as stream pieces."""
    return ("saw",) + tuple(f" {call}={digest(text)}" for call, text in results)


def _first_tool_name(tools: Sequence[Mapping[str, Any]]) -> str:
    first = tools[0]
    return str(first.get("function", {}).get("name") or first.get("name") or "tool")


def _last_user_text(body: Mapping[str, Any]) -> str:
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    return _block_text(users[-1].get("content")) if users else ""


def plan_calls(
    body: Mapping[str, Any], scripted: Sequence[Sequence[str]], *, id_prefix: str, nonce: str
) -> tuple[ToolCall, ...]:
    """The calls to answer with: none unless the request offers tools; then the scripted (name, arguments)
    pairs, or one call to the first tool when the last user message says CALL_TOOL."""
    tools = body.get("tools")
    if not tools:
        return ()
    if scripted:
        pairs = [(str(name), str(arguments)) for name, arguments in scripted]
    elif TOOL_TRIGGER in _last_user_text(body):
        pairs = [(_first_tool_name(tools), orjson.dumps(TOOL_ARGUMENTS).decode())]
    else:
        return ()
    return tuple(ToolCall(call_id(id_prefix, nonce, i), n, a) for i, (n, a) in enumerate(pairs))


def split_pieces(text: str, n: int) -> list[str]:
    """`text` cut into `n` nearly equal non-empty pieces (fewer when it is shorter); [] for ""."""
    n = max(1, min(n, len(text)))
    size, extra = divmod(len(text), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p]


def anthropic_input(arguments: str) -> Any:
    """A tool_use block's `input`: the parsed object ({} for no arguments), or the raw text when it is not
    a JSON object (no real Anthropic answer looks like that: it stands for a provider that broke a call)."""
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments
