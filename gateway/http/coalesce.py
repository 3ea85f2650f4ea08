"""`ready_batches(body)`: the pieces of an async byte iterator, joined into one batch per wait.

An upstream read often carries several SSE events; rendered one by one they became one ASGI send (and one
socket write) each. Here every piece the iterator can produce without waiting joins one batch, and the batch
goes out the moment the iterator would wait, so nothing is held back: latency is unchanged, writes fewer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator
from typing import Any, Protocol, cast


class _Step(Protocol):
    """What an `__anext__()` awaitable is underneath: a coroutine or an async generator's asend object."""

    def send(self, value: Any, /) -> Any: ...

    def throw(self, exc: BaseException, /) -> Any: ...

    def close(self) -> None: ...


async def ready_batches(body: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    batch: list[bytes] = []
    while True:
        # The trick: take one step of `__anext__` by hand. StopIteration means the piece was ready without
        # waiting; a yielded future means it waits on I/O, so the batch goes out first and the same step is
        # then resumed under this task (`_Resumed`), exactly as `await` would have resumed it.
        step = cast(_Step, body.__anext__())
        try:
            blocked_on = step.send(None)
        except StopIteration as ready:
            batch.append(ready.value)
            continue
        except StopAsyncIteration:
            break
        except BaseException:
            if batch:
                yield b"".join(batch)
            raise
        if batch:
            try:
                yield b"".join(batch)
            except BaseException:
                _abandon(step)  # the consumer stopped (client gone): the waiting step must not dangle
                raise
            batch = []
        try:
            batch.append(await _Resumed(step, blocked_on))
        except StopAsyncIteration:
            break
    if batch:
        yield b"".join(batch)


def _abandon(step: _Step) -> None:
    """End a step left waiting by throwing GeneratorExit into it. (`close()` would not do: on Python 3.11
    closing an async generator's `__anext__` step leaves the generator marked running, and its `aclose()`
    then fails.)"""
    try:
        step.throw(GeneratorExit())
    except (GeneratorExit, StopIteration, StopAsyncIteration):
        return
    step.close()  # it awaited again while cleaning up: nothing more can be done without awaiting


class _Resumed:
    """Awaiting it continues a coroutine that has already yielded `blocked_on` once (what `await` does)."""

    __slots__ = ("_blocked_on", "_step")

    def __init__(self, step: _Step, blocked_on: Any) -> None:
        self._step, self._blocked_on = step, blocked_on

    def __await__(self) -> Generator[Any, None, bytes]:
        blocked_on = self._blocked_on
        while True:
            try:
                sent = yield blocked_on
            except GeneratorExit:
                _abandon(self._step)
                raise
            except BaseException as exc:  # noqa: BLE001 - any throw (cancellation) goes on to the step, as `await` does
                try:
                    blocked_on = self._step.throw(exc)
                except StopIteration as done:
                    result: bytes = done.value
                    return result
                continue
            try:
                blocked_on = self._step.send(sent)
            except StopIteration as done:
                result = done.value
                return result
