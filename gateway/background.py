"""Background work: fire-and-forget tasks that must still finish (`TaskSet`), and stopping a loop task.

Each task logs its own failures; `aclose` waits for every task, including ones spawned while it waits.
`cancel_and_wait` reaps a cancelled loop without swallowing a cancellation aimed at the caller itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, *, cancel: bool = False) -> None:
        """Wait for every task; with `cancel`, cancel them first (work that may be dropped at shutdown)."""
        while self._tasks:
            if cancel:
                for task in self._tasks:
                    task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait for it to end; re-raise only if the caller is being cancelled too."""
    if task is None:
        return
    task.cancel()
    current = asyncio.current_task()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling():
            raise


def raise_if_cancelling() -> None:
    """In a loop that catches I/O errors: end it if this task was asked to stop.

    A cancellation can arrive while a Redis call is inside its own timeout; the client or the timeout may
    then report it as an error that the loop catches, and the loop would sleep on, never to end (the
    edge relay's poller hung `aclose` that way). Call this after such a step, before sleeping.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
