"""`ready_batches(body)`: the pieces of an async byte iterator, joined into one batch per wait.

An upstream read often carries several SSE events; rendered one by one they became one ASGI send (and one
socket write) each. Here every piece the iterator can produce without waiting joins one batch, and the batch
goes out the moment the iterator would wait, so nothing is held back: latency is unchanged, writes fewer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from gateway.eager import Paused, run_until_wait


async def ready_batches(body: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    batch: list[bytes] = []
    while True:
        try:
            step = run_until_wait(body.__anext__())
        except StopAsyncIteration:
            break
        except BaseException:
            if batch:
                yield b"".join(batch)
            raise
        if isinstance(step, Paused):
            if batch:
                try:
                    yield b"".join(batch)  # before the body waits: nothing ready is held back
                except BaseException:
                    step.abandon()  # the consumer stopped (client gone): the waiting step must not dangle
                    raise
                batch = []
            try:
                batch.append(await step)
            except StopAsyncIteration:
                break
        else:
            batch.append(step.value)
    if batch:
        yield b"".join(batch)
