"""`ready_batches`: pieces ready together become one batch; a wait sends the batch first; closing works."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.http.coalesce import ready_batches


async def pieces(plan: list[list[bytes]], gate: asyncio.Queue[None], log: list[str]) -> AsyncIterator[bytes]:
    """Yields each group's pieces back to back, waiting on `gate` before every group after the first."""
    try:
        for i, group in enumerate(plan):
            if i:
                await gate.get()
            for piece in group:
                yield piece
    finally:
        log.append("closed")


async def test_ready_pieces_join_and_a_wait_flushes_first() -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    log: list[str] = []
    batches = ready_batches(pieces([[b"a", b"b"], [b"c"], [b"d", b"e", b"f"]], gate, log))
    assert await batches.__anext__() == b"ab"  # sent before the body waits on the gate
    gate.put_nowait(None)
    assert await batches.__anext__() == b"c"
    gate.put_nowait(None)
    assert await batches.__anext__() == b"def"
    with pytest.raises(StopAsyncIteration):
        await batches.__anext__()
    assert log == ["closed"]


async def test_cancelled_while_waiting_reaches_the_body() -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    log: list[str] = []
    body = pieces([[b"a"], [b"b"]], gate, log)
    batches = ready_batches(body)

    async def consume() -> list[bytes]:
        return [b async for b in batches]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["closed"]


async def test_consumer_that_stops_mid_stream_leaves_a_closable_body() -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    log: list[str] = []
    body = pieces([[b"a"], [b"b"]], gate, log)
    batches = ready_batches(body)
    assert await batches.__anext__() == b"a"  # the body now waits on the gate, its step held by the batcher
    await batches.aclose()
    await body.aclose()  # would raise "already running" if the waiting step were left dangling
    assert log == ["closed"]


async def test_an_error_after_ready_pieces_sends_them_then_raises() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"a"
        raise ValueError("boom")

    batches = ready_batches(failing())
    assert await batches.__anext__() == b"a"
    with pytest.raises(ValueError, match="boom"):
        await batches.__anext__()
