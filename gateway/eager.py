"""`run_until_wait(awaitable)`: run an awaitable by hand until it first waits, in the calling task.

It returns `Ready(value)` when the awaitable finished without waiting (no event-loop turn was spent), or a
`Paused` that the same task then awaits to resume it exactly where `await` would have, or abandons. Callers
use the difference: the SSE edge sends what was ready together in one write, and the stream's idle timeout
is armed only when a chunk really has to be waited for. Exceptions raised before the first wait propagate
from `run_until_wait` itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from typing import Any, Generic, Protocol, TypeVar, cast

T = TypeVar("T")


class _Step(Protocol):
    """What `__await__`-able objects are underneath: a coroutine, or an async generator's asend object."""

    def send(self, value: Any, /) -> Any: ...

    def throw(self, exc: BaseException, /) -> Any: ...

    def close(self) -> None: ...


class Ready(Generic[T]):
    """What it returned, without waiting. (A plain slotted class: a frozen dataclass's `__init__` costs
    several times more, and one is made per stream chunk.)"""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


class Paused(Generic[T]):
    """An awaitable stopped at its first wait; await it once (from the same task), or `abandon()` it."""

    __slots__ = ("_blocked_on", "_step")

    def __init__(self, step: _Step, blocked_on: Any) -> None:
        self._step, self._blocked_on = step, blocked_on

    def __await__(self) -> Generator[Any, None, T]:
        # Hand the future it waits on to the task, then pass on whatever the task sends or throws
        # (cancellation included): what `yield from` would do, which a started coroutine does not allow.
        blocked_on = self._blocked_on
        while True:
            try:
                sent = yield blocked_on
            except GeneratorExit:
                self.abandon()
                raise
            except BaseException as exc:  # noqa: BLE001 - every throw goes on to the step, as `await` does
                try:
                    blocked_on = self._step.throw(exc)
                except StopIteration as done:
                    return cast(T, done.value)
                continue
            try:
                blocked_on = self._step.send(sent)
            except StopIteration as done:
                return cast(T, done.value)

    def abandon(self) -> None:
        """End it by throwing GeneratorExit in. (`close()` would not do: on Python 3.11 closing an async
        generator's `__anext__` step leaves the generator marked running, and its `aclose()` then fails.)"""
        try:
            self._step.throw(GeneratorExit())
        except (GeneratorExit, StopIteration, StopAsyncIteration):
            return
        self._step.close()  # it waited again while cleaning up: nothing more can be done without awaiting


def run_until_wait(awaitable: Awaitable[T]) -> Ready[T] | Paused[T]:
    step = cast(_Step, awaitable.__await__())
    try:
        blocked_on = step.send(None)
    except StopIteration as done:
        return Ready(cast(T, done.value))
    return Paused(step, blocked_on)
