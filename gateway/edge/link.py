"""`NodeLink`: one node's WebSocket as the hub holds it, implementing `backends.edge.tunnel.Tunnel`.

Frames go out through one writer task (so `cancel` never blocks and sends never interleave); frames coming
in are handed to the pending request they name. Invariant: once a link is dropped every pending request has
received an `error` frame (code `DISCONNECTED`), so a stream cut mid-way ends with an error event and its
ledger row, and a request that had no chunk yet raises a retryable error that sends it to another node.
`NodeBackends` is the name -> Backend mapping dispatch uses: configured backends plus one `EdgeBackend` per
node (`{edge backend}/{node_id}`, held here or relayed); a node gone since routing chose it fails retryably.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect

from backends.base import (
    Backend,
    BackendHealth,
    BackendInfo,
    BackendKind,
    ChatRequest,
    ChatResult,
    StreamChunk,
)
from backends.edge import wire
from backends.edge.tunnel import DISCONNECTED, EdgeBackend, ReplyFrame, Tunnel, TunnelClosed
from backends.errors import BackendUnavailable
from gateway.edge.pool import LiveNode, split_node_backend

log = logging.getLogger(__name__)

# Errors a send or close on a dropped socket raises: starlette's state checks, uvicorn's ClientDisconnected.
SOCKET_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)
CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's reason must fit in 123 bytes


def close_reason(text: str) -> str:
    encoded = text.encode("utf-8")[:CLOSE_REASON_BYTES]
    return encoded.decode("utf-8", "ignore")


@dataclass(slots=True)
class Load:
    """What the node's latest heartbeat said; `seen_s` is this replica's monotonic clock, `seen` epoch s."""

    in_flight: int
    queue_depth: int
    kv_used_frac: float
    tokens_per_s: float
    seen_s: float
    seen: float


class NodeLink:
    def __init__(
        self,
        ws: WebSocket,
        hello: wire.Hello,
        *,
        token_id: str,
        labels: Mapping[str, str],
        link_id: str,
        load: Load,
        connected_at: float,
    ) -> None:
        self.ws = ws
        self.hello = hello
        self.token_id = token_id
        self.labels = MappingProxyType(dict(labels))
        self.link_id = link_id
        self.load = load
        self.connected_at = connected_at
        self.backends: dict[str, EdgeBackend] = {}  # by backend name, made on first use
        self._pending: dict[str, asyncio.Queue[ReplyFrame]] = {}
        self._open: set[str] = set()  # sent, and neither `done`/`error` received nor cancelled
        self._outbox: asyncio.Queue[wire.Frame | None] = asyncio.Queue()
        self._dropped = False
        self._writer = asyncio.create_task(self._write(), name=f"edge-writer {hello.node_id}")

    # ---- Tunnel --------------------------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.hello.node_id

    @property
    def connected(self) -> bool:
        return not self._dropped

    async def exchange(self, request: wire.Request) -> AsyncIterator[ReplyFrame]:
        if self._dropped:
            raise TunnelClosed(f"edge node `{self.node_id}` is disconnected")
        if request.id in self._pending:
            raise TunnelClosed(f"request id `{request.id}` is already pending on edge node `{self.node_id}`")
        replies: asyncio.Queue[ReplyFrame] = asyncio.Queue()
        self._pending[request.id] = replies
        self._open.add(request.id)
        try:
            self._outbox.put_nowait(request)
            while True:
                frame = await replies.get()
                if not isinstance(frame, wire.Chunk):
                    self._open.discard(request.id)
                yield frame
                if not isinstance(frame, wire.Chunk):
                    return
        finally:
            # However the consumer stopped early (closed, cancelled, timed out), the node is told once.
            self.cancel(request.id)

    def cancel(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        if request_id in self._open:
            self._open.discard(request_id)
            if not self._dropped:
                self._outbox.put_nowait(wire.Cancel(request_id))

    # ---- the hub's side ------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    def deliver(self, frame: wire.Chunk | wire.Done | wire.Error) -> None:
        """A reply frame from the node; one for a request no longer pending (cancelled) is dropped."""
        replies = self._pending.get(frame.id)
        if replies is not None:
            replies.put_nowait(frame)

    def heartbeat(self, beat: wire.Heartbeat, *, now_s: float, now: float) -> None:
        self.load = Load(beat.in_flight, beat.queue_depth, beat.kv_used_frac, beat.tokens_per_s, now_s, now)

    def live_node(self) -> LiveNode:
        load = self.load
        return LiveNode(
            node_id=self.node_id,
            models=frozenset(self.hello.models),
            labels=self.labels,
            usd_per_hour=Decimal(repr(self.hello.usd_per_hour)),
            tokens_per_s=load.tokens_per_s,
            in_flight=load.in_flight,
            queue_depth=load.queue_depth,
            kv_used_frac=load.kv_used_frac,
            last_seen_s=load.seen_s,
        )

    def drop(self) -> None:
        """The connection is gone: fail every pending request (idempotent)."""
        if self._dropped:
            return
        self._dropped = True
        self._open.clear()
        for request_id, replies in list(self._pending.items()):
            message = f"edge node `{self.node_id}` disconnected while serving the request"
            replies.put_nowait(wire.Error(request_id, 503, DISCONNECTED, message))
        self._outbox.put_nowait(None)

    async def close(self, code: int, reason: str) -> None:
        """Close the socket with `code` (e.g. 4401 after a revoke); pending requests fail at once."""
        self.drop()
        with contextlib.suppress(*SOCKET_ERRORS):
            await self.ws.close(code, close_reason(reason))

    async def aclose(self) -> None:
        """Wait for the writer to stop (after `drop`)."""
        self.drop()
        await asyncio.gather(self._writer, return_exceptions=True)

    def queue(self, frame: wire.Frame) -> None:
        """Send a frame of the hub's own (the welcome) in order with the others."""
        if not self._dropped:
            self._outbox.put_nowait(frame)

    async def _write(self) -> None:
        while True:
            frame = await self._outbox.get()
            if frame is None:
                return
            try:
                await self.ws.send_text(wire.encode(frame))
            except SOCKET_ERRORS as exc:
                log.info(
                    "edge node %s: send failed (%s); dropping the link", self.node_id, type(exc).__name__
                )
                self.drop()
                with contextlib.suppress(*SOCKET_ERRORS):
                    await self.ws.close(wire.CloseCode.GOING_AWAY)
                return


class GoneNode:
    """Stands in for a node that disconnected after routing chose it: every call fails retryably."""

    def __init__(self, name: str) -> None:
        self._info = BackendInfo(name, BackendKind.EDGE, supports_tools=False, supports_response_format=False)

    @property
    def info(self) -> BackendInfo:
        return self._info

    def _gone(self) -> BackendUnavailable:
        return BackendUnavailable(f"edge node `{self._info.name}` disconnected before the request was sent")

    async def complete(self, request: ChatRequest) -> ChatResult:
        raise self._gone()

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        raise self._gone()
        yield StreamChunk()  # unreachable: makes this an async generator, as the protocol expects

    async def health(self) -> BackendHealth:
        return BackendHealth(ok=False, detail="disconnected")

    async def aclose(self) -> None:
        return None


class NodeTunnel(Tunnel, Protocol):
    """A node reachable from this replica: its `NodeLink`, or a `RemoteNode` through the relay."""

    backends: dict[str, EdgeBackend]  # by backend name, made on first use


class NodeBackends(Mapping[str, Backend]):
    """Configured backends by name, then `{edge backend}/{node_id}` resolved through `link_of`."""

    def __init__(
        self,
        static: Mapping[str, Backend],
        edge_names: frozenset[str],
        link_of: Callable[[str], NodeTunnel | None],
    ) -> None:
        self._static = static
        self._edge_names = edge_names
        self._link_of = link_of

    def __getitem__(self, name: str) -> Backend:
        backend = self._static.get(name)
        if backend is not None:
            return backend
        pair = split_node_backend(name)
        if pair is None or pair[0] not in self._edge_names:
            raise KeyError(name)
        link = self._link_of(pair[1])
        if link is None or not link.connected:
            return GoneNode(name)
        edge = link.backends.get(name)
        if edge is None:
            edge = link.backends[name] = EdgeBackend(name, link)
        return edge

    def __iter__(self) -> Iterator[str]:
        return iter(self._static)

    def __len__(self) -> int:
        return len(self._static)


class NodeTimeouts(Mapping[str, float]):
    """`backends.X.timeout_s` by backend name; a node's backend (`X/node`) takes its edge backend's."""

    def __init__(self, static: Mapping[str, float]) -> None:
        self._static = dict(static)

    def __getitem__(self, name: str) -> float:
        found = self._static.get(name)
        if found is not None:
            return found
        pair = split_node_backend(name)
        if pair is None:
            raise KeyError(name)
        return self._static[pair[0]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._static)

    def __len__(self) -> int:
        return len(self._static)
