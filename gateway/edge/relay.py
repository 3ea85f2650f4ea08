"""The relay: every replica routes to every live node, the ones other replicas hold through Redis pub/sub.

Each replica subscribes to `{prefix}edge:relay:{replica}`. A message is one header line `{node_id} {sender
replica} {frame id}` then one `backends.edge.wire` frame: `request`/`cancel` for a node this replica holds
(forwarded to its `NodeLink`; the node's `chunk`/`done`/`error` go back to the sender's channel, in order), or
`chunk`/`done`/`error`/`heartbeat` for a request this replica relayed. The holder sends a `heartbeat` (the
node's load) whenever the node was silent for a third of `edge.relay_timeout_s`, so a relay silent
for `relay_timeout_s` is gone (holder dead, Redis down) and fails as a dropped link does: retryable before
the first chunk, an error event after. Nodes held elsewhere come from the registry every `heartbeat_s`;
while Redis fails, only this replica's nodes are routed (one warning).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from backends.edge import wire
from backends.edge.tunnel import DISCONNECTED, EdgeBackend, ReplyFrame, TunnelClosed
from gateway.background import TaskSet, cancel_and_wait, raise_if_cancelling
from gateway.edge.link import Load
from gateway.edge.pool import LiveNode
from gateway.edge.registry import NodeRecord, RedisRegistry
from gateway.outage import OutageGuard

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_TO_HOLDER = (wire.Request, wire.Cancel)
_TO_SENDER = (wire.Chunk, wire.Done, wire.Error, wire.Heartbeat)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One relay message: the node, the replica that sent it, the request's frame id, and the frame."""

    node_id: str
    sender: str
    frame_id: str
    frame: wire.Frame


def pack(envelope: Envelope) -> bytes:
    header = f"{envelope.node_id} {envelope.sender} {envelope.frame_id}\n"
    return (header + wire.encode(envelope.frame)).encode()


def unpack(data: bytes | str) -> Envelope:
    """Raises `wire.FrameError` on a malformed message (never echoing its content)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    header, newline, body = text.partition("\n")
    parts = header.split(" ", 2)
    if not newline or len(parts) != 3 or not all(parts):
        raise wire.FrameError("malformed relay message: expected `node sender frame_id` then a frame")
    frame = wire.decode(body, allowed=(*_TO_HOLDER, *_TO_SENDER))
    return Envelope(parts[0], parts[1], parts[2], frame)


def channel(prefix: str, replica: str) -> str:
    return f"{prefix}edge:relay:{replica}"


class HeldLink(Protocol):
    """What the holder needs of a node's link (`gateway.edge.link.NodeLink`)."""

    @property
    def connected(self) -> bool: ...

    @property
    def load(self) -> Load: ...

    def exchange(self, request: wire.Request) -> AsyncIterator[ReplyFrame]: ...


def live_node(record: NodeRecord, *, now_s: float, now: float) -> LiveNode:
    """A registry record as routing sees it; its wall-clock `last_seen` moved onto this monotonic clock."""
    return LiveNode(
        node_id=record.node_id,
        models=frozenset(record.models),
        labels=record.labels,
        usd_per_hour=Decimal(repr(record.usd_per_hour)),
        tokens_per_s=record.tokens_per_s,
        in_flight=record.in_flight,
        queue_depth=record.queue_depth,
        kv_used_frac=record.kv_used_frac,
        last_seen_s=now_s - max(0.0, now - record.last_seen),
    )


class RemoteNode:
    """A node another replica holds, as a `Tunnel` through the relay (one per node and holding link)."""

    def __init__(self, relay: Relay, record: NodeRecord, live: LiveNode) -> None:
        self.relay = relay
        self.holder = record.replica
        self.link_id = record.link_id
        self.live = live
        self.backends: dict[str, EdgeBackend] = {}

    @property
    def node_id(self) -> str:
        return self.live.node_id

    @property
    def connected(self) -> bool:
        return self.relay.current(self)

    def exchange(self, request: wire.Request) -> AsyncIterator[ReplyFrame]:
        return self.relay.exchange(self, request)

    def cancel(self, request_id: str) -> None:
        self.relay.cancel(self, request_id)


class Relay:
    def __init__(
        self,
        redis: Redis,
        registry: RedisRegistry,
        *,
        prefix: str,
        replica_id: str,
        poll_s: float,
        relay_timeout_s: float,
        timeout_s: float,
        retry_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._redis, self._registry = redis, registry
        self._prefix, self.replica = prefix, replica_id
        self._poll_s, self._relay_timeout_s, self._timeout_s = poll_s, relay_timeout_s, timeout_s
        self._retry_after_s = retry_after_s
        self._clock, self._wall = clock, wall
        self._outage = OutageGuard(
            log,
            "edge relay",
            retry_after_s=retry_after_s,
            clock=clock,
            while_down="only nodes connected to this replica are routed",
            when_back="nodes held by other replicas are routed again",
        )
        self.subscribed = False  # listening on our channel: replies can reach us
        self.remote: dict[str, RemoteNode] = {}
        self._waiting: dict[str, asyncio.Queue[wire.Frame]] = {}  # frame id -> frames from the holder
        self._open: set[str] = set()  # relayed, not ended: the holder must hear of a cancel
        self._serving: dict[str, asyncio.Task[None]] = {}  # frame id -> forwarding to a node we hold
        self._tasks = TaskSet()
        self._loops: list[asyncio.Task[None]] = []
        self._held: Callable[[str], HeldLink | None] = lambda node_id: None
        self._on_change: Callable[[], None] = lambda: None

    @property
    def ready(self) -> bool:
        return self.subscribed and not self._outage.skipping

    def start(self, held: Callable[[str], HeldLink | None], on_change: Callable[[], None]) -> None:
        """Serve relayed requests for the links `held` finds; `on_change` runs when remote nodes change."""
        self._held, self._on_change = held, on_change
        self._loops = [
            asyncio.create_task(self._listen(), name="edge-relay listener"),
            asyncio.create_task(self._poll(), name="edge-relay poller"),
        ]

    async def aclose(self) -> None:
        for task in self._loops:
            await cancel_and_wait(task)
        self._fail_waiting("the gateway is shutting down")
        serving = list(self._serving.values())
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        await self._tasks.aclose()

    # ---- remote nodes --------------------------------------------------------------------------------------

    def remote_nodes(self) -> list[LiveNode]:
        """Nodes other replicas hold, live or not (routing keeps those heard from within ttl_s)."""
        if not self.ready:
            return []
        return [node.live for node in self.remote.values()]

    def tunnel(self, node_id: str) -> RemoteNode | None:
        node = self.remote.get(node_id)
        return node if node is not None and self.ready else None

    def current(self, node: RemoteNode) -> bool:
        return self.ready and self.remote.get(node.node_id) is node

    async def poll_once(self) -> None:
        """Re-read the registry; on failure keep what is known until Redis counts as down, then drop it."""
        if self._outage.skipping:
            self._set_remote([])
            return
        now_s, now = self._clock(), self._wall()
        try:
            records = await self._registry.nodes(now)
        except REDIS_ERRORS as exc:
            self._outage.failed("read", exc)
            if self._outage.skipping:
                self._set_remote([])
            return
        if self.subscribed:
            self._outage.succeeded()
        remote = [r for r in records if r.replica != self.replica and not r.closed]
        self._set_remote([(r, live_node(r, now_s=now_s, now=now)) for r in remote])

    def _set_remote(self, found: list[tuple[NodeRecord, LiveNode]]) -> None:
        before = {n: (r.holder, r.link_id) for n, r in self.remote.items()}
        remote = {}
        for record, live in found:
            node = self.remote.get(record.node_id)
            if node is None or (node.holder, node.link_id) != (record.replica, record.link_id):
                node = RemoteNode(self, record, live)
            node.live = live
            remote[record.node_id] = node
        self.remote = remote
        if before != {n: (r.holder, r.link_id) for n, r in remote.items()}:
            self._on_change()

    async def _poll(self) -> None:
        while True:
            await self.poll_once()
            raise_if_cancelling()
            await asyncio.sleep(self._poll_s)

    # ---- the requesting side -------------------------------------------------------------------------------

    async def exchange(self, node: RemoteNode, request: wire.Request) -> AsyncIterator[ReplyFrame]:
        """`Tunnel.exchange` through the holder; silence for relay_timeout_s reads as a dropped link."""
        if not self.current(node):
            raise TunnelClosed(f"edge node `{node.node_id}` is no longer reachable through the relay")
        if request.id in self._waiting:
            raise TunnelClosed(f"request id `{request.id}` is already pending on edge node `{node.node_id}`")
        replies: asyncio.Queue[wire.Frame] = asyncio.Queue()
        self._waiting[request.id] = replies
        self._open.add(request.id)
        try:
            await self._send_request(node, request)
            while True:
                try:
                    async with asyncio.timeout(self._relay_timeout_s):
                        frame = await replies.get()
                except TimeoutError:
                    log.warning(
                        "edge relay: replica %s sent nothing for node %s within %g s (config: "
                        "edge.relay_timeout_s); treating it as a dropped link",
                        node.holder,
                        node.node_id,
                        self._relay_timeout_s,
                    )
                    frame = wire.Error(request.id, 503, DISCONNECTED, "the relay went silent")
                if isinstance(frame, wire.Heartbeat):
                    continue  # the holder is alive; the node's load arrives through the registry
                assert isinstance(frame, wire.Chunk | wire.Done | wire.Error)
                if not isinstance(frame, wire.Chunk):
                    self._open.discard(request.id)
                yield frame
                if not isinstance(frame, wire.Chunk):
                    return
        finally:
            self.cancel(node, request.id)

    async def _send_request(self, node: RemoteNode, request: wire.Request) -> None:
        envelope = Envelope(node.node_id, self.replica, request.id, request)
        try:
            receivers = await self._publish(node.holder, envelope)
        except REDIS_ERRORS as exc:
            self._outage.failed("publish", exc)
            self._open.discard(request.id)
            raise TunnelClosed(f"cannot relay to edge node `{node.node_id}`: Redis failed") from exc
        if receivers == 0:
            self._open.discard(request.id)
            raise TunnelClosed(f"the replica holding edge node `{node.node_id}` is not listening")

    def cancel(self, node: RemoteNode, request_id: str) -> None:
        self._waiting.pop(request_id, None)
        if request_id in self._open:
            self._open.discard(request_id)
            self._tasks.spawn(self._publish_quietly(node.holder, Envelope(
                node.node_id, self.replica, request_id, wire.Cancel(request_id)
            )))  # fmt: skip

    def _fail_waiting(self, why: str) -> None:
        for frame_id, replies in list(self._waiting.items()):
            replies.put_nowait(wire.Error(frame_id, 503, DISCONNECTED, why))

    # ---- the holding side ----------------------------------------------------------------------------------

    def _take(self, envelope: Envelope) -> None:
        frame = envelope.frame
        if isinstance(frame, wire.Cancel):
            task = self._serving.pop(envelope.frame_id, None)
            if task is not None:
                task.cancel()
            return
        assert isinstance(frame, wire.Request)
        link = self._held(envelope.node_id)
        if link is None or not link.connected or envelope.frame_id in self._serving:
            message = f"edge node `{envelope.node_id}` is not connected to replica {self.replica}"
            gone = wire.Error(frame.id, 503, DISCONNECTED, message)
            self._tasks.spawn(self._publish_quietly(envelope.sender, self._reply(envelope, gone)))
            return
        task = asyncio.get_running_loop().create_task(self._forward(link, envelope, frame))
        self._serving[envelope.frame_id] = task
        task.add_done_callback(lambda _: self._serving.pop(envelope.frame_id, None))

    def _reply(self, envelope: Envelope, frame: wire.Frame) -> Envelope:
        return Envelope(envelope.node_id, self.replica, envelope.frame_id, frame)

    async def _forward(self, link: HeldLink, envelope: Envelope, request: wire.Request) -> None:
        """Relay one request to the node and its frames back, keeping the sender's wait alive."""
        frames = link.exchange(request).__aiter__()
        keepalive_s = self._relay_timeout_s / 3
        upcoming: asyncio.Future[ReplyFrame] | None = None
        try:
            while True:
                upcoming = asyncio.ensure_future(frames.__anext__())
                while not (await asyncio.wait({upcoming}, timeout=keepalive_s))[0]:
                    if not await self._answer(envelope, _beat(link.load)):
                        return
                try:
                    frame: wire.Frame = upcoming.result()
                except (StopAsyncIteration, TunnelClosed):  # the link dropped under us
                    message = f"edge node `{envelope.node_id}` disconnected while serving the request"
                    frame = wire.Error(request.id, 503, DISCONNECTED, message)
                if not await self._answer(envelope, frame) or not isinstance(frame, wire.Chunk):
                    return
        finally:
            if upcoming is not None and not upcoming.done():
                upcoming.cancel()  # runs the exchange's own cleanup: the node is told to cancel
                await asyncio.gather(upcoming, return_exceptions=True)
            aclose = getattr(frames, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _answer(self, envelope: Envelope, frame: wire.Frame) -> bool:
        """Publish one frame to the sender; False once nobody listens or Redis failed (stop forwarding)."""
        try:
            return await self._publish(envelope.sender, self._reply(envelope, frame)) > 0
        except REDIS_ERRORS as exc:
            self._outage.failed("publish", exc)
            return False

    # ---- Redis ---------------------------------------------------------------------------------------------

    async def _publish(self, replica: str, envelope: Envelope) -> int:
        async with asyncio.timeout(self._timeout_s):
            receivers: int = await self._redis.publish(channel(self._prefix, replica), pack(envelope))
        return receivers

    async def _publish_quietly(self, replica: str, envelope: Envelope) -> None:
        try:
            await self._publish(replica, envelope)
        except REDIS_ERRORS as exc:
            self._outage.failed("publish", exc)

    async def _listen(self) -> None:
        """Stay subscribed to our channel; after a failure, resubscribe every retry_after_s."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await self._subscribe(pubsub)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except REDIS_ERRORS as exc:
                self._outage.failed("subscribe", exc)
            finally:
                if self.subscribed:
                    self.subscribed = False
                    self._on_change()  # nodes held elsewhere leave routing until we listen again
                self._fail_waiting("the relay's Redis connection failed")
                await _close_quietly(pubsub)
            raise_if_cancelling()
            await asyncio.sleep(self._retry_after_s)

    async def _subscribe(self, pubsub: PubSub) -> None:
        async with asyncio.timeout(self._timeout_s * 4):
            await pubsub.subscribe(channel(self._prefix, self.replica))
            while await pubsub.get_message(timeout=self._timeout_s) is None:
                pass  # the subscription's confirmation
        self.subscribed = True
        self._outage.succeeded()
        self._on_change()

    def _dispatch(self, data: Any) -> None:
        try:
            envelope = unpack(data)
        except wire.FrameError as exc:
            log.warning("edge relay: ignored a message: %s", exc)
            return
        if isinstance(envelope.frame, _TO_HOLDER):
            self._take(envelope)
            return
        replies = self._waiting.get(envelope.frame_id)
        if replies is not None:
            replies.put_nowait(envelope.frame)


def _beat(load: Load) -> wire.Heartbeat:
    return wire.Heartbeat(load.in_flight, load.queue_depth, load.kv_used_frac, load.tokens_per_s)


async def _close_quietly(pubsub: PubSub) -> None:
    try:
        async with asyncio.timeout(1.0):
            await pubsub.aclose()
    except REDIS_ERRORS:
        return
