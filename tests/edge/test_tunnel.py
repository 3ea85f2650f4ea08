"""`EdgeBackend` over an in-memory `Tunnel`: frames become results and stream chunks, failures become the
backend errors gateway dispatch expects (retryable before the first chunk, a cut stream after it), and a
consumer that stops early sends `cancel`."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from backends.base import Backend, BackendKind, ChatRequest, StreamChunk, Usage
from backends.edge import wire
from backends.edge.tunnel import DISCONNECTED, EdgeBackend, ReplyFrame, TunnelClosed
from backends.errors import (
    BackendBadResponse,
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)

PROMPT = "my secret prompt"
REQUEST = ChatRequest(
    model="smollm2",
    messages=({"role": "user", "content": PROMPT},),
    request_id="req-1",
    max_tokens=8,
    temperature=0.0,
    stop=("\n",),
    seed=3,
    timeout_s=5.0,
)

# What a scripted node answers: frames (their ids are filled in), then one of these endings.
HANG = "hang"  # nothing more arrives
END = "end"  # the iterator ends without done/error
CLOSED = "closed"  # the iterator raises TunnelClosed


@dataclass
class ScriptedTunnel:
    """A `Tunnel` that replays `script` for every request and records what the backend sent."""

    script: Sequence[wire.Chunk | wire.Done | wire.Error | str]
    connected: bool = True
    node_id: str = "plant7-a"
    sent: list[wire.Request] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    closed_iterators: int = 0

    async def exchange(self, request: wire.Request) -> AsyncIterator[ReplyFrame]:
        self.sent.append(request)
        try:
            for step in self.script:
                if step == HANG:
                    await asyncio.sleep(3600)
                elif step == END:
                    return
                elif step == CLOSED:
                    raise TunnelClosed("link closed")
                else:
                    assert isinstance(step, wire.Chunk | wire.Done | wire.Error)
                    yield dataclasses.replace(step, id=request.id)
                    await asyncio.sleep(0)
        finally:
            self.closed_iterators += 1

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


def chunk(text: str) -> wire.Chunk:
    return wire.Chunk("", text)


DONE = wire.Done("", "stop", Usage(prompt_tokens=9, completion_tokens=2))


def _backend(*script: wire.Chunk | wire.Done | wire.Error | str) -> tuple[EdgeBackend, ScriptedTunnel]:
    tunnel = ScriptedTunnel(script)
    return EdgeBackend("edge/plant7-a", tunnel), tunnel


async def _drain(backend: EdgeBackend, request: ChatRequest = REQUEST) -> list[StreamChunk]:
    return [c async for c in backend.stream(request)]


def test_info_says_edge_without_tools_or_json_mode() -> None:
    backend, _ = _backend()
    assert isinstance(backend, Backend)
    info = backend.info
    assert (info.name, info.kind, info.supports_tools, info.supports_response_format) == (
        "edge/plant7-a",
        BackendKind.EDGE,
        False,
        False,
    )


async def test_complete_joins_the_chunks_and_sends_the_request_fields() -> None:
    backend, tunnel = _backend(chunk("Pa"), chunk("ris"), DONE)
    result = await backend.complete(REQUEST)
    assert result.message == {"role": "assistant", "content": "Paris"}
    assert (result.finish_reason, result.usage, result.served_model) == ("stop", DONE.usage, "smollm2")
    [sent] = tunnel.sent
    assert sent == wire.Request("req-1.1", "smollm2", REQUEST.messages, 8, 0.0, None, ("\n",), 3)
    assert tunnel.cancelled == [] and tunnel.closed_iterators == 1
    await backend.complete(REQUEST)
    assert tunnel.sent[1].id == "req-1.2"  # a retry on the same node never reuses a pending id


async def test_the_teams_deadline_travels_in_the_request_frame() -> None:
    backend, tunnel = _backend(chunk("Paris"), DONE)
    await _drain(backend, dataclasses.replace(REQUEST, deadline_ms=2500.0))
    assert tunnel.sent[0].deadline_ms == 2500.0  # the node's engine queues earliest deadline first


async def test_stream_yields_deltas_then_a_last_chunk_with_usage() -> None:
    backend, tunnel = _backend(chunk("Pa"), chunk("ris"), DONE)
    chunks = await _drain(backend)
    assert [c.delta for c in chunks] == [{"role": "assistant", "content": "Pa"}, {"content": "ris"}, {}]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage == DONE.usage
    assert chunks[-1].served_model == "smollm2"
    assert tunnel.cancelled == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (wire.Error("", 503, DISCONNECTED, "link dropped"), BackendUnavailable),
        (wire.Error("", 503, "node_busy", "at its limit"), BackendUnavailable),
        (wire.Error("", 429, "node_busy", "at its limit"), BackendRateLimited),
        (wire.Error("", 500, "engine_error", "generation failed"), BackendUnavailable),
        (wire.Error("", 504, "timeout", "slow"), BackendTimeout),
        (wire.Error("", 400, "context_length_exceeded", "lower max_tokens"), BackendRejected),
    ],
)
async def test_error_frames_before_the_first_chunk_map_to_backend_errors(
    error: wire.Error, expected: type[BackendError]
) -> None:
    for call in ("complete", "stream"):
        backend, tunnel = _backend(error)
        with pytest.raises(expected) as caught:
            await (backend.complete(REQUEST) if call == "complete" else _drain(backend))
        assert caught.type is expected
        assert caught.value.retryable is (expected is not BackendRejected)
        assert "edge/plant7-a" in caught.value.message and PROMPT not in caught.value.message
        assert tunnel.cancelled == []  # the node already ended it


@pytest.mark.parametrize("ending", [END, CLOSED])
async def test_a_drop_before_the_first_chunk_is_retryable(ending: str) -> None:
    backend, _ = _backend(ending)
    with pytest.raises(BackendUnavailable, match="disconnected before answering"):
        await _drain(backend)
    backend, _ = _backend(chunk("Pa"), ending)
    with pytest.raises(BackendUnavailable):  # complete: nothing reached the client yet
        await backend.complete(REQUEST)


CUTS = [END, CLOSED, wire.Error("", 503, DISCONNECTED, "dropped"), wire.Error("", 500, "engine_error", "x")]


@pytest.mark.parametrize("ending", CUTS)
async def test_a_cut_after_the_first_chunk_ends_the_stream_like_other_backends(ending: object) -> None:
    backend, _ = _backend(chunk("Pa"), ending)  # type: ignore[arg-type]
    seen: list[StreamChunk] = []
    with pytest.raises(BackendBadResponse, match="cut the stream") as caught:
        async for c in backend.stream(REQUEST):
            seen.append(c)
    assert [c.delta.get("content") for c in seen] == ["Pa"]
    assert PROMPT not in caught.value.message


async def test_closing_a_stream_early_cancels_the_request_on_the_node() -> None:
    backend, tunnel = _backend(chunk("Pa"), chunk("ris"), DONE)
    stream = backend.stream(REQUEST)
    assert (await anext(stream)).delta["content"] == "Pa"
    await stream.aclose()
    assert tunnel.cancelled == ["req-1.1"] and tunnel.closed_iterators == 1


async def test_a_cancelled_complete_cancels_the_request_on_the_node() -> None:
    backend, tunnel = _backend(chunk("Pa"), HANG)
    task = asyncio.create_task(backend.complete(REQUEST))
    while not tunnel.sent:
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tunnel.cancelled == ["req-1.1"] and tunnel.closed_iterators == 1


async def test_a_silent_node_times_out_and_is_cancelled() -> None:
    backend, tunnel = _backend(HANG)
    quick = ChatRequest(model="smollm2", messages=REQUEST.messages, request_id="req-9", timeout_s=0.05)
    with pytest.raises(BackendTimeout, match="sent nothing for 0.05 s"):
        await backend.complete(quick)
    assert tunnel.cancelled == ["req-9.1"]


async def test_health_follows_the_link() -> None:
    backend, tunnel = _backend()
    assert (await backend.health()).ok
    tunnel.connected = False
    health = await backend.health()
    assert not health.ok and "plant7-a" in health.detail
    await backend.aclose()
