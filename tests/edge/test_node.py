"""The edge node agent against a loopback WebSocket server playing the gateway: enrolment, streaming through
`EdgeBackend`, cancel, reconnect after a drop, and the refused token that stops it.

The node runs in this process with a tiny random-weight model (the real engine, int4, a 2 MiB KV cache);
one test, marked `model`, runs the bundled SmolLM2 in the edge profile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.base import ChatRequest, FinishReason  # noqa: E402
from backends.edge import wire  # noqa: E402
from backends.edge.node import EXIT_OK, EXIT_UNAUTHORIZED, TOKEN_ENV, NodeOptions, run_node  # noqa: E402
from backends.edge.tunnel import EdgeBackend  # noqa: E402
from backends.errors import BackendRejected  # noqa: E402
from backends.local.loader import LoadedModel  # noqa: E402
from tests.support.edge_node import TOKEN, FakeGateway, NodeConnection, request, tiny_loaded  # noqa: E402

# slow: nodes run the engine and dial a loopback WebSocket server
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60), pytest.mark.slow]

Running = tuple[asyncio.Task[int], asyncio.Event]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_loaded()


def _options(gateway: FakeGateway, **overrides: Any) -> NodeOptions:
    fields: dict[str, Any] = dict(
        gateway_url=gateway.url,
        token=TOKEN,
        node_id="plant7-a",
        labels={"site": "plant-7"},
        usd_per_hour=0.25,
        served_name="tiny-edge",
        kv_cache_mb=2,
        max_batch=4,
        measure_tokens=8,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
    )
    return NodeOptions(**{**fields, **overrides})


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    async with FakeGateway(labels={"region": "eu"}) as gw:
        yield gw


@pytest.fixture
async def node(gateway: FakeGateway, tiny: LoadedModel) -> AsyncIterator[tuple[NodeConnection, Running]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_node(_options(gateway), stop=stop, loaded=tiny))
    conn = await gateway.next_connection()
    yield conn, (task, stop)
    stop.set()
    assert await asyncio.wait_for(task, 30) == EXIT_OK


async def test_debug_logging_shows_neither_the_token_nor_frame_text(
    gateway: FakeGateway, tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG, websockets logs each handshake header and the start of each frame; the node's connection
    must not: the token and the prompt and completion text stay out of the log."""
    caplog.set_level(logging.DEBUG)
    stop = asyncio.Event()
    task = asyncio.create_task(run_node(_options(gateway), stop=stop, loaded=tiny))
    conn = await gateway.next_connection()
    messages = ({"role": "user", "content": "secret-prompt-words"},)
    prompt = wire.Request("dbg.1", "tiny", messages, max_tokens=4)
    frames = await conn.collect(prompt)
    stop.set()
    assert await asyncio.wait_for(task, 30) == EXIT_OK
    assert isinstance(frames[-1], wire.Done)
    assert TOKEN not in caplog.text
    assert "secret-prompt-words" not in caplog.text
    assert any(r.name == "backends.edge.node" for r in caplog.records)  # the node's own lines still show


def _chat(**fields: Any) -> ChatRequest:
    base: dict[str, Any] = dict(
        model="tiny-edge",
        messages=({"role": "user", "content": "hello"},),
        request_id="req-1",
        max_tokens=12,
        temperature=0.0,
        timeout_s=30.0,
    )
    return ChatRequest(**{**base, **fields})


async def test_node_enrolls_with_its_hello_and_heartbeats(
    gateway: FakeGateway, node: tuple[NodeConnection, Running]
) -> None:
    conn, _ = node
    hello = conn.hello
    assert hello.node_id == "plant7-a"
    assert hello.models == ("tiny-edge", "tiny")
    assert hello.labels == {"site": "plant-7"}
    assert hello.capacity == wire.Capacity(max_batch=4, kv_cache_mb=2.0)
    assert hello.tokens_per_s > 0
    assert hello.usd_per_hour == 0.25
    assert hello.version and hello.protocol == wire.PROTOCOL_VERSION
    assert gateway.auth_headers == [f"Bearer {TOKEN}"]
    beat = await conn.idle_heartbeat()
    assert beat.tokens_per_s > 0


async def test_without_an_interval_in_welcome_the_node_uses_its_own(tiny: LoadedModel) -> None:
    async with FakeGateway(heartbeat_s=None) as gw:
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(_options(gw, heartbeat_s=0.05), stop=stop, loaded=tiny))
        conn = await gw.next_connection()
        for _ in range(3):
            await conn.idle_heartbeat(timeout_s=2)
        stop.set()
        assert await asyncio.wait_for(task, 30) == EXIT_OK


async def test_stream_through_edge_backend_matches_the_whole_answer(
    node: tuple[NodeConnection, Running],
) -> None:
    conn, _ = node
    backend = EdgeBackend("edge/plant7-a", conn)
    chunks = [chunk async for chunk in backend.stream(_chat())]
    *deltas, last = chunks
    assert deltas and deltas[0].delta["role"] == "assistant"
    text = "".join(c.delta["content"] for c in deltas)
    assert last.finish_reason == FinishReason.LENGTH and last.usage is not None
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 0
    # With the team's deadline (the node's engine queues earliest deadline first): the order, not the answer.
    result = await backend.complete(dataclasses.replace(_chat(request_id="req-2"), deadline_ms=2500.0))
    assert result.message == {"role": "assistant", "content": text}  # greedy: the same answer both ways
    assert result.usage == last.usage


async def test_concurrent_requests_each_get_their_own_frames(node: tuple[NodeConnection, Running]) -> None:
    conn, _ = node
    replies = await asyncio.gather(*(conn.collect(request(f"r{i}", max_tokens=5 + i)) for i in range(4)))
    for i, frames in enumerate(replies):
        done = frames[-1]
        assert isinstance(done, wire.Done) and done.id == f"r{i}"
        assert done.usage.completion_tokens == 5 + i
        assert all(isinstance(f, wire.Chunk) and f.id == f"r{i}" for f in frames[:-1])


async def test_bad_requests_get_error_frames_not_a_dropped_connection(
    node: tuple[NodeConnection, Running],
) -> None:
    conn, _ = node
    [unknown] = await conn.collect(request("r1", model="gpt-9"))
    assert isinstance(unknown, wire.Error) and (unknown.status, unknown.code) == (404, "model_not_found")
    [too_long] = await conn.collect(request("r2", max_tokens=100_000))
    assert isinstance(too_long, wire.Error) and too_long.code == "context_length_exceeded"
    assert "hello" not in too_long.message  # never the prompt text
    with pytest.raises(BackendRejected, match="context_length_exceeded"):
        await EdgeBackend("edge/plant7-a", conn).complete(_chat(max_tokens=100_000))
    replies: asyncio.Queue[Any] = asyncio.Queue()
    conn.pending["bad"] = replies
    await conn.ws.send('{"type": "request", "id": "bad", "model": "tiny", "messages": []}')
    refused = await asyncio.wait_for(replies.get(), 10)
    assert isinstance(refused, wire.Error) and (refused.status, refused.code) == (400, "bad_frame")
    assert "`messages`" in refused.message
    frames = await conn.collect(request("r3"))
    assert isinstance(frames[-1], wire.Done)


async def test_closing_a_stream_early_cancels_it_and_frees_the_engine(
    node: tuple[NodeConnection, Running],
) -> None:
    conn, _ = node
    backend = EdgeBackend("edge/plant7-a", conn)
    stream = backend.stream(_chat(max_tokens=200))
    first = await anext(stream)
    assert first.delta["content"]
    await stream.aclose()
    assert conn.cancelled == ["req-1.1"]
    await conn.idle_heartbeat()  # the engine aborted it: nothing running, no KV block held
    assert "req-1.1" not in conn.finished  # aborted, not run to its end
    frames = await conn.collect(request("after"))  # and the node keeps serving
    assert isinstance(frames[-1], wire.Done)


async def test_a_cancel_frame_aborts_a_running_request(node: tuple[NodeConnection, Running]) -> None:
    conn, _ = node
    replies = conn.exchange(request("long", max_tokens=200))
    first = await anext(replies)
    assert isinstance(first, wire.Chunk)
    await conn.ws.send(wire.encode(wire.Cancel("long")))
    await conn.idle_heartbeat()
    assert "long" not in conn.finished  # aborted: the node sends no `done` for it
    await replies.aclose()


async def test_node_reconnects_after_a_drop_and_aborts_what_was_running(
    gateway: FakeGateway, node: tuple[NodeConnection, Running]
) -> None:
    conn, (task, _) = node
    replies = conn.exchange(request("cut", max_tokens=200))
    assert isinstance(await anext(replies), wire.Chunk)
    await conn.ws.close(1011, "gateway restarting")
    again = await gateway.next_connection()
    assert again.hello.node_id == "plant7-a" and not task.done()
    await again.idle_heartbeat()  # the request cut by the drop no longer runs
    frames = await again.collect(request("next"))
    assert isinstance(frames[-1], wire.Done)
    await replies.aclose()


async def test_node_retries_a_503_on_the_upgrade_then_enrolls(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that cannot check tokens answers the upgrade with 503: the node backs off and retries, as it
    did after close 1013."""
    caplog.set_level(logging.WARNING, logger="backends.edge.node")
    async with FakeGateway(unavailable_first=2) as gw:
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(_options(gw), stop=stop, loaded=tiny))
        conn = await gw.next_connection()
        assert conn.hello.node_id == "plant7-a" and len(gw.auth_headers) == 3
        stop.set()
        assert await asyncio.wait_for(task, 30) == EXIT_OK
    refusals = [r.getMessage() for r in caplog.records if "HTTP 503" in r.getMessage()]
    assert len(refusals) == 2 and "cannot check the token now" in refusals[0]


async def test_node_reconnects_when_the_gateway_is_down_at_first(tiny: LoadedModel) -> None:
    async with FakeGateway() as gone:
        port = gone.port
    stop = asyncio.Event()
    task = asyncio.create_task(run_node(_options(gone), stop=stop, loaded=tiny))
    await asyncio.sleep(0.5)  # a few refused attempts
    assert not task.done()
    async with FakeGateway(port=port) as gw:
        conn = await gw.next_connection()
        assert conn.hello.node_id == "plant7-a"
        stop.set()
        assert await asyncio.wait_for(task, 30) == EXIT_OK


@pytest.mark.parametrize("refuse_http", [False, True], ids=["close-4401", "http-401"])
async def test_a_refused_token_stops_the_node_with_a_clear_message(
    tiny: LoadedModel, caplog: pytest.LogCaptureFixture, refuse_http: bool
) -> None:
    caplog.set_level(logging.INFO, logger="backends.edge.node")
    async with FakeGateway(token="sbe_other", refuse_http=refuse_http) as gw:
        code = await asyncio.wait_for(run_node(_options(gw), loaded=tiny), 30)
        assert code == EXIT_UNAUTHORIZED
        assert len(gw.auth_headers) == 1  # no reconnect attempts
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "--token" in errors[0] and TOKEN_ENV in errors[0]
    assert not refuse_http or "HTTP 401: unknown enrollment token" in errors[0]  # the gateway's reason
    assert TOKEN not in caplog.text  # the token itself is never logged


async def test_stop_closes_the_connection_as_going_away(gateway: FakeGateway, tiny: LoadedModel) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_node(_options(gateway), stop=stop, loaded=tiny))
    conn = await gateway.next_connection()
    stop.set()
    assert await asyncio.wait_for(task, 30) == EXIT_OK
    await asyncio.wait_for(conn.closed.wait(), 10)
    assert gateway.close_codes == [wire.CloseCode.GOING_AWAY]


@pytest.mark.model
@pytest.mark.timeout(300)  # loading SmolLM2 takes 10-40 s on two busy cores
async def test_smollm2_int4_node_streams_an_answer(gateway: FakeGateway) -> None:
    from backends.local.loader import DEFAULT_MODEL_SPEC, load_model

    stop = asyncio.Event()
    options = _options(gateway, served_name="smollm2", kv_cache_mb=64, measure_tokens=4)
    loaded = await asyncio.to_thread(load_model, DEFAULT_MODEL_SPEC)
    task = asyncio.create_task(run_node(options, stop=stop, loaded=loaded))
    try:
        conn = await gateway.next_connection(timeout_s=120)
        assert conn.hello.models[0] == "smollm2" and conn.hello.tokens_per_s > 0
        backend = EdgeBackend("edge/plant7-a", conn)
        question = ({"role": "user", "content": "What is the capital of France?"},)
        chat = _chat(model="smollm2", messages=question, max_tokens=8)
        chunks = [c async for c in backend.stream(chat)]
        text = "".join(c.delta.get("content", "") for c in chunks)
        assert text.strip() and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens <= 8
        result = await backend.complete(dataclasses.replace(chat, request_id="req-2"))
        assert result.message["content"] == text  # greedy int4: the same tokens again
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == EXIT_OK
