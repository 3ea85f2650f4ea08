"""`send_batches`: pieces ready together become one write; a wait writes the batch first; the last write is
final; errors and failed writes leave the body closed or closable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.http.coalesce import send_batches


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


class Writes:
    """A `write` that records (batch, more) and lets the test see each one as it happens."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.seen: list[tuple[bytes, bool]] = []
        self.fail_on = fail_on
        self.event = asyncio.Event()

    async def __call__(self, batch: bytes, more: bool) -> None:
        if self.fail_on is not None and len(self.seen) == self.fail_on:
            raise ConnectionResetError("client gone")
        self.seen.append((batch, more))
        self.event.set()

    async def next(self) -> tuple[bytes, bool]:
        await asyncio.wait_for(self.event.wait(), 5)
        self.event.clear()
        return self.seen[-1]


async def test_ready_pieces_join_a_wait_flushes_first_and_the_end_shares_the_last_write() -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    log: list[str] = []
    writes = Writes()
    task = asyncio.create_task(
        send_batches(pieces([[b"a", b"b"], [b"c"], [b"d", b"e", b"f"]], gate, log), writes)
    )
    assert await writes.next() == (b"ab", True)  # written before the body waits on the gate
    gate.put_nowait(None)
    assert await writes.next() == (b"c", True)
    gate.put_nowait(None)
    await asyncio.wait_for(task, 5)
    assert writes.seen[-1] == (b"def", False)  # the body ended without waiting: the last batch is final
    assert len(writes.seen) == 3 and log == ["closed"]


async def test_a_body_that_ends_after_a_wait_gets_an_empty_final_write() -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    log: list[str] = []
    writes = Writes()
    task = asyncio.create_task(send_batches(pieces([[b"a"], []], gate, log), writes))
    assert await writes.next() == (b"a", True)
    gate.put_nowait(None)
    await asyncio.wait_for(task, 5)
    assert writes.seen == [(b"a", True), (b"", False)]


async def test_cancelled_while_waiting_reaches_the_body() -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    log: list[str] = []
    writes = Writes()
    task = asyncio.create_task(send_batches(pieces([[b"a"], [b"b"]], gate, log), writes))
    assert await writes.next() == (b"a", True)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["closed"]


async def test_a_failed_write_mid_stream_leaves_a_closable_body() -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()
    log: list[str] = []
    body = pieces([[b"a"], [b"b"]], gate, log)
    with pytest.raises(ConnectionResetError):
        await send_batches(body, Writes(fail_on=0))  # fails while the body's step waits on the gate
    await body.aclose()  # would raise "already running" if the waiting step were left dangling
    assert log == ["closed"]


async def test_an_error_after_ready_pieces_writes_them_then_raises() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"a"
        raise ValueError("boom")

    writes = Writes()
    with pytest.raises(ValueError, match="boom"):
        await send_batches(failing(), writes)
    assert writes.seen == [(b"a", True)]
