"""A client that leaves cancels the handler's work: through the server's hook, or a watcher on `receive`."""

from __future__ import annotations

import asyncio

from gateway.http.disconnect import DISCONNECT_EXTENSION, DisconnectHook, until_disconnect


async def _never() -> str:
    await asyncio.sleep(3600)
    return "answered"


async def _stay() -> dict[str, str]:
    await asyncio.Event().wait()
    return {"type": "http.request"}


def test_the_hook_cancels_the_work_when_the_connection_is_lost() -> None:
    async def run() -> tuple[str | None, bool]:
        hook = DisconnectHook()
        scope = {"extensions": {DISCONNECT_EXTENSION: hook}}
        task = asyncio.ensure_future(until_disconnect(_stay, _never(), scope))
        await asyncio.sleep(0)
        hook.lost()
        result = await task
        return result, task.cancelled()

    assert asyncio.run(run()) == (None, False)


def test_an_answer_before_the_client_leaves_unregisters_from_the_hook() -> None:
    async def run() -> tuple[str | None, int]:
        hook = DisconnectHook()
        scope = {"extensions": {DISCONNECT_EXTENSION: hook}}

        async def answer() -> str:
            return "answered"

        result = await until_disconnect(_stay, answer(), scope)
        left = len(hook._callbacks)
        hook.lost()  # the connection closes later: nothing of the finished request may run
        return result, left

    assert asyncio.run(run()) == ("answered", 0)


def test_a_connection_already_lost_falls_back_to_receive() -> None:
    async def run() -> str | None:
        hook = DisconnectHook()
        hook.lost()

        async def receive() -> dict[str, str]:
            return {"type": "http.disconnect"}

        return await until_disconnect(receive, _never(), {"extensions": {DISCONNECT_EXTENSION: hook}})

    assert asyncio.run(run()) is None


def test_other_servers_are_watched_through_receive() -> None:
    async def run() -> str | None:
        gone = asyncio.Event()

        async def receive() -> dict[str, str]:
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(until_disconnect(receive, _never(), {}))
        await asyncio.sleep(0)
        gone.set()
        return await task

    assert asyncio.run(run()) is None


def test_a_cancellation_that_is_not_a_disconnect_propagates() -> None:
    async def run() -> bool:
        hook = DisconnectHook()
        task = asyncio.ensure_future(
            until_disconnect(_stay, _never(), {"extensions": {DISCONNECT_EXTENSION: hook}})
        )
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return not hook._callbacks
        return False

    assert asyncio.run(run())
