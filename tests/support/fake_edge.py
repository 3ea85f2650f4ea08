"""A scripted edge node over a real WebSocket (the `websockets` client), for gateway-side tests.

It speaks `backends.edge.wire` like the real node but answers from a script instead of an engine: each
`request` frame is served by `answer(request, node)` (default: three chunks and `done`), so tests can make a
node slow, silent, failing, or drop mid-stream. `requests` records every request frame it got; `cancels` the
ids it was told to cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from backends.base import Usage
from backends.edge import wire
from backends.edge.options import QuietWebSocketLog

Answer = Callable[[wire.Request, "FakeNode"], AsyncIterator[wire.Frame]]


async def words(request: wire.Request, node: FakeNode) -> AsyncIterator[wire.Frame]:
    for word in ("Hello", " from", f" {node.node_id}"):
        yield wire.Chunk(request.id, word)
    yield wire.Done(request.id, "stop", Usage(5, 3))


@dataclass
class FakeNode:
    url: str  # ws://127.0.0.1:PORT/v1/edge/connect
    token: str
    node_id: str
    models: tuple[str, ...] = ("smollm2",)
    labels: Mapping[str, str] = field(default_factory=dict)
    tokens_per_s: float = 40.0
    usd_per_hour: float = 0.0
    answer: Answer = words
    heartbeats: bool = True
    load: wire.Heartbeat = field(default_factory=lambda: wire.Heartbeat(0, 0, 0.0, 40.0))
    requests: list[wire.Request] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    welcome: wire.Welcome | None = None
    ws: ClientConnection | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _serving: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def hello(self) -> wire.Hello:
        return wire.Hello(
            node_id=self.node_id,
            models=self.models,
            labels=dict(self.labels),
            capacity=wire.Capacity(4, 64.0),
            tokens_per_s=self.tokens_per_s,
            usd_per_hour=self.usd_per_hour,
            version="fake",
        )

    async def start(self) -> FakeNode:
        """Connect and enroll; raises `ConnectionClosed` (with the close code) when refused."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.ws = await connect(
            self.url, additional_headers=headers, open_timeout=10, logger=QuietWebSocketLog()
        )
        await self.ws.send(wire.encode(self.hello()))
        frame = wire.decode(await asyncio.wait_for(self.ws.recv(), 10), allowed=wire.GATEWAY_FRAMES)
        assert isinstance(frame, wire.Welcome), frame
        self.welcome = frame
        self._tasks.append(asyncio.create_task(self._read()))
        if self.heartbeats:
            self._tasks.append(asyncio.create_task(self._beat(frame.heartbeat_s)))
        return self

    async def send(self, frame: wire.Frame) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(wire.encode(frame))

    async def _beat(self, every_s: float) -> None:
        while True:
            await self.send(self.load)
            await asyncio.sleep(every_s)

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                frame = wire.decode(raw, allowed=wire.GATEWAY_FRAMES)
                if isinstance(frame, wire.Request):
                    self.requests.append(frame)
                    self._serving[frame.id] = asyncio.create_task(self._serve(frame))
                elif isinstance(frame, wire.Cancel):
                    self.cancels.append(frame.id)
                    task = self._serving.pop(frame.id, None)
                    if task is not None:
                        task.cancel()

    async def _serve(self, request: wire.Request) -> None:
        async for frame in self.answer(request, self):
            await self.send(frame)

    @property
    def close_code(self) -> int | None:
        return None if self.ws is None else self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return None if self.ws is None else self.ws.close_reason

    async def wait_closed(self, timeout_s: float = 10.0) -> int | None:
        assert self.ws is not None
        await asyncio.wait_for(self.ws.wait_closed(), timeout_s)
        return self.ws.close_code

    async def stop(self, code: int = 1000) -> None:
        """Close the connection cleanly (a node shutting down)."""
        for task in self._tasks + list(self._serving.values()):
            task.cancel()
        if self.ws is not None:
            await self.ws.close(code)
        await asyncio.gather(*self._tasks, *self._serving.values(), return_exceptions=True)

    async def vanish(self) -> None:
        """Drop the TCP connection without a close frame (a node killed or unplugged)."""
        for task in self._tasks + list(self._serving.values()):
            task.cancel()
        if self.ws is not None:
            self.ws.transport.abort()
        await asyncio.gather(*self._tasks, *self._serving.values(), return_exceptions=True)


async def refused(url: str, token: str, node_id: str = "refused-node") -> tuple[int | None, str | None]:
    """Try to enroll; the close code and reason the gateway answered with."""
    node = FakeNode(url, token, node_id)
    try:
        await node.start()
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)
    await node.stop()
    raise AssertionError("the gateway accepted the node")


@dataclass(frozen=True, slots=True)
class Denial:
    """The gateway's HTTP answer instead of the upgrade."""

    status: int
    error: dict[str, Any]  # the OpenAI envelope's "error"
    retry_after: str | None


async def denied(url: str, token: str) -> Denial:
    """Try to connect; the HTTP refusal of the upgrade (AssertionError if the upgrade went through)."""
    node = FakeNode(url, token, "denied-node")
    try:
        await node.start()
    except InvalidStatus as exc:
        response = exc.response
        body = orjson.loads(response.body or b"{}")
        return Denial(response.status_code, body.get("error", {}), response.headers.get("retry-after"))
    await node.stop()
    raise AssertionError("the gateway upgraded the connection")


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> Awaitable[None]:
    async def wait() -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not check():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"condition not met within {timeout_s} s")
            await asyncio.sleep(0.02)

    return wait()
