"""What the edge node tests share: a tiny random-weight model, and a loopback WebSocket server that plays the
gateway's part of the protocol (`FakeGateway`), with each accepted connection usable as a `Tunnel`.

The tokenizer is a test double (one letter per token id, a plain-text chat template) because the tiny model
has a 256-token vocabulary no real tokenizer matches; everything else (engine, WebSocket, frames) is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from backends.edge import wire
from backends.edge.options import QuietWebSocketLog
from backends.edge.tunnel import DISCONNECTED, ReplyFrame, TunnelClosed
from backends.local.loader import LoadedModel
from tests.support import logscan

TOKEN = "sbe_test_token"
logscan.register(TOKEN, "enrollment token (the fake gateway's)")
EOS_ID = 0


class CharTokenizer:
    """One lower-case letter per token id; the chat template is `role:content;` per message."""

    eos_token_id = EOS_ID

    def apply_chat_template(self, messages: list[Mapping[str, str]], **_: Any) -> dict[str, list[int]]:
        text = "".join(f"{m['role']}:{m['content']};" for m in messages)
        return {"input_ids": [1 + ord(c) % 255 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids if not (skip_special_tokens and i == EOS_ID))


def tiny_loaded() -> LoadedModel:
    from tests.support.tiny_models import tiny_hf_model

    return LoadedModel(
        model=tiny_hf_model("llama"), tokenizer=CharTokenizer(), name="tiny", load_s=0, rss_mb=0
    )


@dataclass(eq=False)
class NodeConnection:
    """One node's connection as the fake gateway sees it; also a `Tunnel` for `EdgeBackend`."""

    ws: ServerConnection
    hello: wire.Hello
    heartbeats: asyncio.Queue[wire.Heartbeat] = field(default_factory=asyncio.Queue)
    pending: dict[str, asyncio.Queue[ReplyFrame | None]] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # ids of every `done`/`error`, wanted or not
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def node_id(self) -> str:
        return self.hello.node_id

    @property
    def connected(self) -> bool:
        return not self.closed.is_set()

    async def exchange(self, request: wire.Request) -> AsyncIterator[ReplyFrame]:
        if self.closed.is_set():
            raise TunnelClosed("link closed")
        replies: asyncio.Queue[ReplyFrame | None] = asyncio.Queue()
        self.pending[request.id] = replies
        try:
            await self.ws.send(wire.encode(request))
            while (frame := await replies.get()) is not None:
                yield frame
                if not isinstance(frame, wire.Chunk):
                    return
            yield wire.Error(request.id, 503, DISCONNECTED, "link dropped")
        finally:
            self.pending.pop(request.id, None)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.pending.pop(request_id, None)
        if not self.closed.is_set():
            task = asyncio.get_running_loop().create_task(self._send(wire.Cancel(request_id)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, frame: wire.Frame) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(wire.encode(frame))

    async def collect(self, request: wire.Request) -> list[ReplyFrame]:
        """Send one request and gather its frames up to `done` or `error`."""
        return [frame async for frame in self.exchange(request)]

    async def idle_heartbeat(self, timeout_s: float = 10.0) -> wire.Heartbeat:
        """The first heartbeat that shows no request running or queued and no KV block held."""
        async with asyncio.timeout(timeout_s):
            while True:
                beat = await self.heartbeats.get()
                if beat.in_flight == 0 and beat.queue_depth == 0 and beat.kv_used_frac == 0.0:
                    return beat

    def dispatch(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Heartbeat):
            self.heartbeats.put_nowait(frame)
            return
        if isinstance(frame, wire.Done | wire.Error):
            self.finished.append(frame.id)
        if isinstance(frame, wire.Chunk | wire.Done | wire.Error) and frame.id in self.pending:
            self.pending[frame.id].put_nowait(frame)

    def drop(self) -> None:
        self.closed.set()
        for replies in self.pending.values():
            replies.put_nowait(None)


class FakeGateway:
    """A loopback WebSocket server speaking the gateway's side: token check, hello -> welcome, frame routing.

    `refuse_http` answers the handshake with 401, as the gateway refuses a bad token; `unavailable_first`
    answers the first that many handshakes with 503 + Retry-After, as a gateway whose database is down.
    """

    def __init__(
        self,
        *,
        token: str = TOKEN,
        heartbeat_s: float | None = 0.05,
        labels: Mapping[str, str] | None = None,
        refuse_http: bool = False,
        unavailable_first: int = 0,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.token = token
        self.tls = tls  # serve wss (the url says https)
        self.port = port
        self.heartbeat_s = heartbeat_s
        self.labels = dict(labels or {})
        self.refuse_http = refuse_http
        self.unavailable_left = unavailable_first
        self.connections: asyncio.Queue[NodeConnection] = asyncio.Queue()
        self.close_codes: list[int | None] = []
        self.auth_headers: list[str | None] = []
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeGateway:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            process_request=self._check_http,
            compression=None,
            ssl=self.tls,
            logger=QuietWebSocketLog("websockets.server"),  # DEBUG would log the token and prompt text
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def next_connection(self, timeout_s: float = 20.0) -> NodeConnection:
        async with asyncio.timeout(timeout_s):
            return await self.connections.get()

    def _check_http(self, connection: ServerConnection, request: Request) -> Response | None:
        self.auth_headers.append(request.headers.get("Authorization"))
        if request.path != wire.CONNECT_PATH:
            return connection.respond(404, "no such path\n")
        if self.refuse_http and not self._authorized(request.headers):
            return connection.respond(401, '{"error": {"message": "unknown enrollment token"}}')
        if self.unavailable_left > 0:
            self.unavailable_left -= 1
            refusal = connection.respond(503, '{"error": {"message": "cannot check the token now"}}')
            refusal.headers["Retry-After"] = "5"
            return refusal
        return None

    def _authorized(self, headers: Headers) -> bool:
        return headers.get("Authorization") == f"Bearer {self.token}"

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        hello = wire.decode(await ws.recv(), allowed=(wire.Hello,))
        assert isinstance(hello, wire.Hello)
        if not self._authorized(ws.request.headers):
            await ws.close(wire.CloseCode.UNAUTHORIZED, "enrollment token revoked")
            return
        conn = NodeConnection(ws, hello)
        labels = {**hello.labels, **self.labels}
        await ws.send(wire.encode(wire.Welcome(hello.node_id, labels, self.heartbeat_s)))
        self.connections.put_nowait(conn)
        try:
            async for raw in ws:
                conn.dispatch(wire.decode(raw, allowed=wire.NODE_FRAMES))
        except ConnectionClosed:
            pass
        finally:
            self.close_codes.append(ws.close_code)
            conn.drop()


def request(request_id: str, model: str = "tiny", **fields: Any) -> wire.Request:
    fields.setdefault("max_tokens", 8)
    fields.setdefault("temperature", 0.0)
    return wire.Request(request_id, model, ({"role": "user", "content": "hello"},), **fields)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def wait_until(
    check: Callable[[], bool], what: str, timeout_s: float, logs: Callable[[], str]
) -> float:
    """Poll `check` every 0.1 s; the seconds it took, or AssertionError naming `what` with `logs()`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s\n{logs()}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started
