"""`ScriptedBackend`: a backend that answers every call as told (an error, a delay, a text, or a whole
assistant message, e.g. with tool calls); no I/O. It keeps every request it was sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from backends.base import BackendHealth, BackendInfo, BackendKind, ChatRequest, ChatResult, StreamChunk, Usage
from backends.errors import SwitchboardError


class ScriptedBackend:
    """Answers every call with `outcome`: an error to raise, a delay to hang, a text or an assistant message
    (`{"content": ..., "tool_calls": [...]}`) to return. Streams split texts and tool arguments in pieces."""

    def __init__(self, name: str, outcome: SwitchboardError | float | str | Mapping[str, Any]) -> None:
        self._info = BackendInfo(name=name, kind=BackendKind.OPENAI)
        self.outcome = outcome
        self.calls: list[str] = []
        self.requests: list[ChatRequest] = []

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def _act(self, request: ChatRequest) -> dict[str, Any]:
        self.calls.append(request.model)
        self.requests.append(request)
        if isinstance(self.outcome, SwitchboardError):
            raise self.outcome
        if isinstance(self.outcome, float):
            await asyncio.sleep(self.outcome)
        if isinstance(self.outcome, Mapping):
            return {"role": "assistant", "content": None, **self.outcome}
        return {"role": "assistant", "content": str(self.outcome)}

    async def complete(self, request: ChatRequest) -> ChatResult:
        message = await self._act(request)
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        return ChatResult(message, finish, Usage(1, 1), request.model)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        message = await self._act(request)
        text = message.get("content") or ""
        for start in range(0, len(text), 8):  # pieces of 8 characters
            yield StreamChunk(delta={"content": text[start : start + 8]})
        calls = message.get("tool_calls") or []
        for index, call in enumerate(calls):
            fn = call["function"]
            head = {"index": index, "id": call["id"], "type": "function"}
            yield StreamChunk(
                delta={"tool_calls": [{**head, "function": {"name": fn["name"], "arguments": ""}}]}
            )
            args = fn["arguments"]
            for piece in (args[: len(args) // 2], args[len(args) // 2 :]):
                yield StreamChunk(delta={"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        yield StreamChunk(finish_reason="tool_calls" if calls else "stop", usage=Usage(1, 1))

    async def health(self) -> BackendHealth:
        return BackendHealth(ok=True)

    async def aclose(self) -> None:
        return None
