"""A client that leaves: how a handler learns of it after its request body has been read.

Our server (gateway/http/server.py) puts a `DisconnectHook` in each request's `scope["extensions"]`; its
callbacks run when the connection is lost. `DisconnectWatch` cancels the handler's task through it, or, on
any other ASGI server, through a watcher task parked in `receive()` for the `http.disconnect` message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Message, Receive, Scope

T = TypeVar("T")

DISCONNECT_EXTENSION = "switchboard.disconnect"  # scope["extensions"][...]: this connection's DisconnectHook


class DisconnectHook:
    """Callbacks run when the connection is lost: a handler learns of a client that left without a task
    parked in `receive()` for it (creating and cancelling one costs about 10 us per request)."""

    __slots__ = ("connected", "_callbacks")

    def __init__(self) -> None:
        self.connected = True
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def lost(self) -> None:
        self.connected = False
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class DisconnectWatch:
    """Cancels the current task when the client leaves (the body has been read, so nothing else would
    notice). `gone` tells that cancellation apart from any other; `stop()` before answering. On our server
    (gateway/http/server.py) a callback on the connection's `DisconnectHook` does it; on any other ASGI
    server a watcher task awaits `receive()` for the `http.disconnect` message."""

    def __init__(self, receive: Receive, scope: Scope | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task, self.gone = task, False
        hook = scope.get("extensions", {}).get(DISCONNECT_EXTENSION) if scope is not None else None
        self._watcher: asyncio.Future[Message] | None = None
        self._hook: DisconnectHook | None = None
        if hook is not None and hook.connected:
            self._hook = hook
            hook.add(self._left)
        else:
            self._watcher = asyncio.ensure_future(receive())
            self._watcher.add_done_callback(self._on_message)

    def _left(self) -> None:
        self.gone = True
        self.task.cancel()

    def _on_message(self, done: asyncio.Future[Message]) -> None:
        if not done.cancelled() and done.exception() is None and done.result()["type"] == "http.disconnect":
            self._left()

    def stop(self) -> None:
        if self._hook is not None:
            self._hook.discard(self._left)
        if self._watcher is not None:
            self._watcher.remove_done_callback(self._on_message)
            self._watcher.cancel()


async def until_disconnect(receive: Receive, work: Awaitable[T], scope: Scope | None = None) -> T | None:
    """`work`'s result, or None if the client disconnects first; then `work` is cancelled where it waits
    (the backend call, a limiter, the cache), so the pipeline records `client_closed` and the upstream
    stops generating an answer nobody will read."""
    watch = DisconnectWatch(receive, scope)
    try:
        return await work
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        watch.task.uncancel()
        return None
    finally:
        watch.stop()
