"""`send_batches(body, write)`: an async byte iterator's pieces, written in one batch per wait.

An upstream read often carries several SSE events; rendered one by one they became one ASGI send (and one
socket write) each. Here every piece the iterator can produce without waiting joins one batch, and the batch
goes out the moment the iterator would wait, so nothing is held back: latency is unchanged, writes fewer.
The last batch is written as the final one (`more=False`), so the end of the response shares its write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.eager import Paused, run_until_wait

Write = Callable[[bytes, bool], Awaitable[None]]  # (batch, more to come)


async def send_batches(body: AsyncIterator[bytes], write: Write) -> None:
    """Every batch goes to `write`, the last (possibly empty) with `more=False`. An error from `body` is
    raised after the pieces ready before it were written; a failed write leaves `body` closable."""
    batch: list[bytes] = []
    while True:
        try:
            step = run_until_wait(body.__anext__())
        except StopAsyncIteration:
            break
        except BaseException:
            if batch:
                await write(b"".join(batch), True)
            raise
        if isinstance(step, Paused):
            if batch:
                try:
                    await write(b"".join(batch), True)  # before the body waits: nothing ready is held back
                except BaseException:
                    step.abandon()  # the client is gone or stalled: the waiting step must not dangle
                    raise
                batch = []
            try:
                batch.append(await step)
            except StopAsyncIteration:
                break
        else:
            batch.append(step.value)
    await write(b"".join(batch), False)
