"""`ScriptedBackend`: a backend that answers every call as told (an error, a delay, or a text); no I/O."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from backends.base import BackendHealth, BackendInfo, BackendKind, ChatRequest, ChatResult, StreamChunk, Usage
from backends.errors import SwitchboardError


class ScriptedBackend:
    """Answers every call with `outcome`: an error to raise, a delay to hang, or a text to return."""

    def __init__(self, name: str, outcome: SwitchboardError | float | str) -> None:
        self._info = BackendInfo(name=name, kind=BackendKind.OPENAI)
        self.outcome = outcome
        self.calls: list[str] = []

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def _act(self, request: ChatRequest) -> str:
        self.calls.append(request.model)
        if isinstance(self.outcome, SwitchboardError):
            raise self.outcome
        if isinstance(self.outcome, float):
            await asyncio.sleep(self.outcome)
        return str(self.outcome)

    async def complete(self, request: ChatRequest) -> ChatResult:
        text = await self._act(request)
        return ChatResult({"role": "assistant", "content": text}, "stop", Usage(1, 1), request.model)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        text = await self._act(request)
        yield StreamChunk(delta={"content": text})
        yield StreamChunk(finish_reason="stop", usage=Usage(1, 1))

    async def health(self) -> BackendHealth:
        return BackendHealth(ok=True)

    async def aclose(self) -> None:
        return None
