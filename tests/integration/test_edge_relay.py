"""The relay between replicas (gateway/edge/relay.py) on a real Redis, each test under a prefix of its own.

Two `Relay`s play two replicas: `held` (holding node `n1` through a scripted link) and `asking` (routing to it
from the registry). Checked: the envelope, frames relayed in order, a cancel reaching the node, keepalives
holding a slow request, a silent or vanished holder failing retryably before the first chunk and as a cut
stream after it, stale and closed records, and Redis going away (only local nodes, one warning, no hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from backends.base import ChatRequest, Usage
from backends.edge import wire
from backends.edge.tunnel import EdgeBackend, ReplyFrame, TunnelClosed
from backends.errors import BackendBadResponse, BackendUnavailable
from gateway.edge.link import Load
from gateway.edge.pool import is_live
from gateway.edge.registry import NodeRecord, RedisRegistry
from gateway.edge.relay import Envelope, Relay, channel, pack, unpack
from tests.support.edge_records import node_record
from tests.support.services import REDIS_URL, delete_prefix
from tests.support.tcp_proxy import TcpProxy
from tests.support.timing import CUT_OFF_S

TTL_S = 2.0
RELAY_TIMEOUT_S = 0.6

Script = Callable[[wire.Request], AsyncIterator[ReplyFrame]]


async def words(request: wire.Request) -> AsyncIterator[ReplyFrame]:
    for i in range(40):
        yield wire.Chunk(request.id, f"w{i} ")
    yield wire.Done(request.id, "stop", Usage(3, 40))


@dataclass
class ScriptedLink:
    """A node link on the holding replica that answers from `script`; records what it was asked."""

    script: Script = words
    connected: bool = True
    load: Load = field(default_factory=lambda: Load(1, 2, 0.5, 30.0, 0.0, 0.0))
    started: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    async def exchange(self, request: wire.Request) -> AsyncIterator[ReplyFrame]:
        self.started.append(request.id)
        try:
            async for frame in self.script(request):
                yield frame
        finally:
            self.ended.append(request.id)


def relay_record(replica: str, **changes: object) -> NodeRecord:
    """A node connected to `replica` now (as of the wall clock); `changes` as `node_record`'s."""
    return node_record(at=time.time(), replica=replica, **changes)


def client(url: str = REDIS_URL) -> Redis:
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


@dataclass
class Pair:
    held: Relay
    asking: Relay
    registry: RedisRegistry
    link: ScriptedLink
    prefix: str
    redis: Redis

    def backend(self) -> EdgeBackend:
        tunnel = self.asking.tunnel("n1")
        assert tunnel is not None, "n1 is not routable through the relay"
        return EdgeBackend("edge/n1", tunnel)


def make_relay(redis: Redis, registry: RedisRegistry, prefix: str, replica: str) -> Relay:
    return Relay(
        redis,
        registry,
        prefix=prefix,
        replica_id=replica,
        poll_s=0.1,
        relay_timeout_s=RELAY_TIMEOUT_S,
        timeout_s=0.5,
        retry_after_s=0.2,
    )


@contextlib.asynccontextmanager
async def relay_pair(url: str = REDIS_URL, *, hold: bool = True) -> AsyncIterator[Pair]:
    prefix = f"test:relay:{uuid.uuid4().hex[:10]}:"
    redis = client(url)
    registry = RedisRegistry(
        redis, prefix=prefix + "edge:", ttl_s=TTL_S, expire_s=3 * TTL_S, timeout_s=0.5, retry_after_s=0.2
    )
    link = ScriptedLink()
    held, asking = (make_relay(redis, registry, prefix, name) for name in ("replica-a", "replica-b"))
    if hold:
        held.start(lambda node_id: link if node_id == "n1" else None, lambda: None)
    asking.start(lambda node_id: None, lambda: None)
    await registry.put(relay_record("replica-a"))
    pair = Pair(held, asking, registry, link, prefix, redis)
    try:
        await until(lambda: asking.tunnel("n1") is not None and (held.subscribed or not hold))
        yield pair
    finally:
        await asking.aclose()
        await held.aclose()
        await redis.aclose()
        delete_prefix(REDIS_URL, prefix)


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


def chat(request_id: str | None = None) -> ChatRequest:
    return ChatRequest(
        model="smollm2",
        messages=({"role": "user", "content": "hi"},),
        request_id=request_id or uuid.uuid4().hex,
        timeout_s=10.0,
    )


def test_envelopes_carry_wire_frames_unchanged() -> None:
    frame = wire.Chunk("req-1.1", "héllo\nworld")
    packed = pack(Envelope("n1", "host-1-ab", "req-1.1", frame))
    assert packed.split(b"\n", 1)[1].decode() == wire.encode(frame)  # the node's own frame format
    assert unpack(packed) == Envelope("n1", "host-1-ab", "req-1.1", frame)
    for bad in (b"no header", b"n1 r\n{}", b'n1 r id\n{"type": "hello"}', b"n1 r id\nnot json"):
        with pytest.raises(wire.FrameError) as info:
            unpack(bad)
        assert "not json" not in str(info.value)
    assert channel("sb:", "r1") == "sb:edge:relay:r1"


async def test_frames_are_relayed_in_order_both_ways() -> None:
    async with relay_pair() as pair:
        backend = pair.backend()
        result = await backend.complete(chat())
        assert result.message["content"] == "".join(f"w{i} " for i in range(40))
        assert result.usage == Usage(3, 40)
        chunks = [c async for c in backend.stream(chat())]
        text = "".join(str(c.delta.get("content", "")) for c in chunks)
        assert text == result.message["content"] and chunks[-1].finish_reason == "stop"
        assert len(pair.link.started) == 2 and pair.link.ended == pair.link.started


async def test_a_consumer_that_stops_early_cancels_on_the_node() -> None:
    async def endless(request: wire.Request) -> AsyncIterator[ReplyFrame]:
        for i in range(10_000):
            yield wire.Chunk(request.id, f"{i} ")
            await asyncio.sleep(0.02)

    async with relay_pair() as pair:
        pair.link.script = endless
        stream = pair.backend().stream(chat())
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await until(lambda: pair.link.ended == pair.link.started, timeout_s=2.0)
        assert not pair.held._serving


async def test_keepalives_hold_a_request_the_node_is_slow_to_start() -> None:
    async def slow(request: wire.Request) -> AsyncIterator[ReplyFrame]:
        await asyncio.sleep(RELAY_TIMEOUT_S * 2.5)  # queued on the node: no chunk for a while
        yield wire.Chunk(request.id, "late")
        yield wire.Done(request.id, "stop", Usage(1, 1))

    async with relay_pair() as pair:
        pair.link.script = slow
        result = await pair.backend().complete(chat())
        assert result.message["content"] == "late"


async def test_a_silent_holder_fails_retryably_within_the_relay_timeout() -> None:
    async with relay_pair(hold=False) as pair:
        listener = pair.redis.pubsub()
        await listener.subscribe(channel(pair.prefix, "replica-a"))  # subscribed, never answers
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as info:
                await pair.backend().complete(chat())
            assert info.value.retryable
            assert RELAY_TIMEOUT_S * 0.9 <= time.monotonic() - started <= RELAY_TIMEOUT_S + CUT_OFF_S
        finally:
            await listener.aclose()
        # nobody subscribed at all: refused at once (Redis says no listener), not after the relay timeout
        with pytest.raises(BackendUnavailable) as gone:
            await pair.backend().complete(chat())
        assert gone.value.retryable and isinstance(gone.value.__cause__, TunnelClosed)
        assert "not listening" in str(gone.value.__cause__)


async def test_a_holder_dying_mid_stream_cuts_it_like_a_dropped_link() -> None:
    async def endless(request: wire.Request) -> AsyncIterator[ReplyFrame]:
        while True:
            yield wire.Chunk(request.id, "x")
            await asyncio.sleep(0.05)

    async with relay_pair() as pair:
        pair.link.script = endless
        stream = pair.backend().stream(chat())
        first = await stream.__anext__()  # type: ignore[attr-defined]
        assert first.delta == {"role": "assistant", "content": "x"}
        await pair.held.aclose()  # the holding replica stops: no more frames, no error frame either
        started = time.monotonic()
        with pytest.raises(BackendBadResponse) as cut:
            async for _ in stream:
                pass
        assert "cut the stream" in cut.value.message  # what a local link's drop raises mid-stream
        assert time.monotonic() - started <= RELAY_TIMEOUT_S + CUT_OFF_S


async def test_a_node_gone_from_the_holder_fails_retryably() -> None:
    async with relay_pair() as pair:
        pair.link.connected = False
        with pytest.raises(BackendUnavailable) as info:
            await pair.backend().complete(chat())
        assert info.value.retryable and pair.link.started == []


async def test_stale_and_closed_records_and_our_own_nodes_are_not_routed_remotely() -> None:
    async with relay_pair() as pair:
        old = time.time() - TTL_S - 1.0
        await pair.registry.put(relay_record("replica-a", node_id="stale", last_seen=old))
        await pair.registry.put(relay_record("replica-a", node_id="closed", closed=True))
        await pair.registry.put(relay_record("replica-b", node_id="mine"))
        await pair.asking.poll_once()
        now_s = time.monotonic()
        live = {n.node_id for n in pair.asking.remote_nodes() if is_live(n, now_s, TTL_S)}
        assert live == {"n1"}
        assert {n.node_id for n in pair.asking.remote_nodes()} == {"n1", "stale"}


async def test_redis_down_routes_only_local_nodes_logs_once_and_never_hangs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = TcpProxy("127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    try:
        async with relay_pair(f"redis://127.0.0.1:{proxy.port}/0") as pair:
            backend = pair.backend()
            assert (await backend.complete(chat())).finish_reason == "stop"
            caplog.set_level(logging.INFO, logger="gateway.edge.relay")
            await proxy.cut()
            await until(lambda: not pair.asking.remote_nodes(), timeout_s=3.0)
            assert pair.asking.tunnel("n1") is None
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await backend.complete(chat())  # chosen before the outage: fails at once, retryably
            assert time.monotonic() - started < CUT_OFF_S
            await asyncio.sleep(1.0)  # several polls and resubscriptions fail meanwhile
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Redis" in r.message]
            assert len(warnings) == 2, [r.message for r in warnings]  # one per replica, not one per try
            await proxy.restore()
            await until(lambda: pair.asking.tunnel("n1") is not None and pair.held.ready, timeout_s=5.0)
            assert (await pair.backend().complete(chat())).finish_reason == "stop"
    finally:
        await proxy.aclose()
