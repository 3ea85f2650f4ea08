"""The fallback loop, fed backends that answer as told (no I/O): order, retryable or not, timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from backends.base import BackendHealth, BackendInfo, BackendKind, ChatRequest, ChatResult, StreamChunk, Usage
from backends.errors import BackendRejected, BackendUnavailable, SwitchboardError
from gateway import dispatch
from gateway.errors import AllBackendsFailed
from gateway.middleware import Timing
from routing.decision import FREE, Deployment, RouteDecision


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


def setup(*outcomes: SwitchboardError | float | str) -> tuple[RouteDecision, dict[str, ScriptedBackend]]:
    backends = {f"b{i}": ScriptedBackend(f"b{i}", o) for i, o in enumerate(outcomes)}
    deps = tuple(Deployment("m", name, BackendKind.OPENAI, f"up-{name}", FREE) for name in backends)
    return RouteDecision("m", deps, "test"), backends


REQUEST = ChatRequest(model="m", messages=({"role": "user", "content": "x"},), request_id="r1", timeout_s=5)


def timing() -> Timing:
    return Timing(start_s=0.0, request_id="r1")


async def test_falls_back_on_retryable_error_and_counts_attempts() -> None:
    decision, backends = setup(BackendUnavailable("down"), "ok")
    served = await dispatch.complete(decision, REQUEST, backends, timing(), {})
    assert served.deployment.backend == "b1" and served.attempts == 2
    assert served.result.message["content"] == "ok"
    assert backends["b0"].calls == ["up-b0"] and backends["b1"].calls == ["up-b1"]


async def test_non_retryable_error_stops_the_loop() -> None:
    decision, backends = setup(BackendRejected("bad request"), "ok")
    with pytest.raises(AllBackendsFailed) as info:
        await dispatch.complete(decision, REQUEST, backends, timing(), {})
    assert info.value.status_code == 400 and backends["b1"].calls == []


async def test_each_attempt_has_its_own_timeout_and_all_causes_are_kept() -> None:
    decision, backends = setup(1.0, BackendUnavailable("down"))
    t = timing()
    with pytest.raises(AllBackendsFailed) as info:
        await dispatch.complete(decision, REQUEST, backends, t, {"b0": 0.05})
    assert [name for name, _ in info.value.causes] == ["b0", "b1"]
    assert "backends.b0.timeout_s" in info.value.message and "down" in info.value.message
    assert info.value.status_code == 503
    assert t.upstream_s >= 0.05


async def test_stream_falls_back_before_first_chunk() -> None:
    decision, backends = setup(BackendUnavailable("down"), "hello")
    opened = await dispatch.open_stream(decision, REQUEST, backends, timing(), {})
    assert opened.deployment.backend == "b1" and opened.first.delta == {"content": "hello"}
    rest = [chunk async for chunk in opened.rest]
    assert rest[-1].usage == Usage(1, 1)
