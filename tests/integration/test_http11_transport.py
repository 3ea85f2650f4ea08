"""`FastTransport` against the loopback fake provider and tiny raw servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
import uvloop

from backends.http11 import FastTransport
from tests.support.fake_provider import FakeProvider

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(20)]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def chat_body(model: str, *, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


class RawServer:
    """A loopback server that hands each accepted connection to `handler`; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.accepted = 0
        self.closed_by_client = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await self._handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and content-length body), or None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def keep_alive(response: bytes = OK_RESPONSE) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(response)
            await writer.drain()

    return handler


def once(response: bytes, *pieces_delay_s: float) -> Handler:
    """Answers one request with `response`, written in one go or split by the given delays, then closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        for delay_s in pieces_delay_s:
            await asyncio.sleep(delay_s)

    return handler


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = FastTransport(max_connections=4)
    async with httpx.AsyncClient(transport=transport, timeout=5.0) as client:
        yield client


def stats(client: httpx.AsyncClient) -> dict[str, int]:
    transport = client._transport
    assert isinstance(transport, FastTransport)
    return transport.stats()


# ---- against the fake provider --------------------------------------------------------------------------


async def test_complete_and_keep_alive_reuse(client: httpx.AsyncClient, fake_provider: FakeProvider) -> None:
    fake_provider.configure("h11-complete", n_tokens=3)
    url = fake_provider.openai_base_url + "/chat/completions"
    for _ in range(5):
        response = await client.post(url, content=chat_body("h11-complete"))
        assert response.status_code == 200 and response.reason_phrase == "OK"
        assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        assert response.headers["content-type"] == "application/json"
    assert stats(client) == {"opened": 1, "open": 1, "idle": 1}
    received = fake_provider.received("h11-complete")[-1]
    assert received["headers"]["host"] == fake_provider.base_url.removeprefix("http://")
    assert received["headers"]["content-length"] == str(len(chat_body("h11-complete")))


async def test_sse_streams_as_it_arrives(client: httpx.AsyncClient, fake_provider: FakeProvider) -> None:
    fake_provider.configure("h11-sse", n_tokens=6, tokens_per_s=20)  # 50 ms between events
    url = fake_provider.openai_base_url + "/chat/completions"
    arrivals: list[float] = []
    data = b""
    async with client.stream("POST", url, content=chat_body("h11-sse", stream=True)) as response:
        assert response.headers["content-type"] == "text/event-stream"
        async for piece in response.aiter_raw():
            arrivals.append(time.monotonic())
            data += piece
    assert data.endswith(b"data: [DONE]\n\n") and data.count(b"data:") >= 7
    assert len(arrivals) >= 5, "events must come as they are sent, not buffered into one read"
    assert arrivals[-1] - arrivals[0] > 0.15
    assert stats(client)["idle"] == 1  # read to the end: back in the pool


async def test_upstream_error_status_keeps_the_connection(
    client: httpx.AsyncClient, fake_provider: FakeProvider
) -> None:
    fake_provider.configure("h11-500", fail_status=500)
    url = fake_provider.openai_base_url + "/chat/completions"
    for _ in range(2):
        response = await client.post(url, content=chat_body("h11-500"))
        assert response.status_code == 500 and "failing with" in response.text
    assert stats(client)["opened"] == 1


async def test_cut_stream_is_a_protocol_error_and_discards(
    client: httpx.AsyncClient, fake_provider: FakeProvider
) -> None:
    fake_provider.configure("h11-cut", n_tokens=10, cut_after_chunks=3, tokens_per_s=200)
    url = fake_provider.openai_base_url + "/chat/completions"
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", url, content=chat_body("h11-cut", stream=True)) as response:
            async for piece in response.aiter_raw():
                received += piece
    assert received.count(b"data:") == 3
    assert stats(client) == {"opened": 1, "open": 0, "idle": 0}


async def test_hang_is_a_read_timeout(fake_provider: FakeProvider) -> None:
    fake_provider.configure("h11-hang", hang=True)
    transport = FastTransport()
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, read=0.2)) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                fake_provider.openai_base_url + "/chat/completions", content=chat_body("h11-hang")
            )
        assert 0.15 < time.monotonic() - started < 2.0
        assert transport.stats()["open"] == 0


async def test_stream_closed_early_discards_the_connection(
    client: httpx.AsyncClient, fake_provider: FakeProvider
) -> None:
    fake_provider.configure("h11-early", n_tokens=50, tokens_per_s=500)
    url = fake_provider.openai_base_url + "/chat/completions"
    async with client.stream("POST", url, content=chat_body("h11-early", stream=True)) as response:
        async for _ in response.aiter_raw():
            break
    assert stats(client) == {"opened": 1, "open": 0, "idle": 0}
    assert (await client.post(url, content=chat_body("h11-early"))).status_code == 200
    assert stats(client)["opened"] == 2


async def test_concurrency_is_capped(client: httpx.AsyncClient, fake_provider: FakeProvider) -> None:
    fake_provider.configure("h11-many", ttft_ms=10)
    url = fake_provider.openai_base_url + "/chat/completions"
    responses = await asyncio.gather(*(client.post(url, content=chat_body("h11-many")) for _ in range(40)))
    assert {r.status_code for r in responses} == {200}
    assert stats(client) == {"opened": 4, "open": 4, "idle": 4}  # max_connections=4


async def test_runs_on_uvloop(fake_provider: FakeProvider) -> None:
    """The gateway runs on uvloop, whose transports are not `asyncio.Transport` subclasses."""
    fake_provider.configure("h11-uvloop", n_tokens=2)

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(transport=FastTransport(), timeout=5.0) as client:
            url = fake_provider.openai_base_url + "/chat/completions"
            responses = [await client.post(url, content=chat_body("h11-uvloop")) for _ in range(3)]
            async with client.stream("POST", url, content=chat_body("h11-uvloop", stream=True)) as streamed:
                await streamed.aread()
            return [r.status_code for r in responses] + [streamed.status_code]

    assert await asyncio.to_thread(uvloop.run, scenario()) == [200, 200, 200, 200]


# ---- against raw servers --------------------------------------------------------------------------------


async def test_reuse_counted_by_connections_accepted(client: httpx.AsyncClient) -> None:
    async with RawServer(keep_alive()) as server:
        for _ in range(5):
            assert (await client.get(server.url + "/x?q=1")).text == "ok"
        assert server.accepted == 1


async def test_stream_body_gets_host_and_length_on_the_wire() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            heads.append(request)
            writer.write(OK_RESPONSE)

    transport = FastTransport()
    async with RawServer(handler) as server:
        request = httpx.Request("POST", server.url + "/p?q=1", stream=httpx.ByteStream(b"hello"))
        response = await transport.handle_async_request(request)
        assert await response.aread() == b"ok"
        await transport.aclose()
        netloc = server.url.removeprefix("http://").encode()
    assert heads == [b"POST /p?q=1 HTTP/1.1\r\nHost: " + netloc + b"\r\nContent-Length: 5\r\n\r\nhello"]


async def test_connection_close_is_not_reused(client: httpx.AsyncClient) -> None:
    response = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    async with RawServer(keep_alive(response)) as server:
        for _ in range(3):
            assert (await client.get(server.url)).text == "ok"
        assert server.accepted == 3


async def test_chunked_split_at_odd_boundaries(client: httpx.AsyncClient) -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ntrailer: x\r\n\r\n"
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            for start in range(0, len(wire), 7):  # 7-byte pieces cut through sizes, CRLFs and data
                writer.write(wire[start : start + 7])
                await writer.drain()
                await asyncio.sleep(0.001)

    async with RawServer(handler) as server:
        for _ in range(2):
            assert (await client.get(server.url)).content == b"hello abcdefghijklmnopqrstuvwxyz"
        assert server.accepted == 1


async def test_server_closing_mid_body(client: httpx.AsyncClient) -> None:
    async with RawServer(once(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url)
    assert stats(client)["open"] == 0


async def test_server_closing_before_answering(client: httpx.AsyncClient) -> None:
    async with RawServer(once(b"")) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(server.url)


async def test_body_delimited_by_close(client: httpx.AsyncClient) -> None:
    async with RawServer(once(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")) as server:
        assert (await client.get(server.url)).text == "until the end"
    assert stats(client)["open"] == 0


@pytest.mark.parametrize(
    "wire", [b"HTTP/1.1 abc\r\n\r\n", b"NOT HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"]
)
async def test_malformed_response(client: httpx.AsyncClient, wire: bytes) -> None:
    async with RawServer(once(wire, 1.0)) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await client.get(server.url)


async def test_interim_response_is_skipped(client: httpx.AsyncClient) -> None:
    wire = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK_RESPONSE
    async with RawServer(keep_alive(wire)) as server:
        for _ in range(2):
            response = await client.get(server.url)
            assert response.status_code == 200 and response.text == "ok" and "link" not in response.headers
        assert server.accepted == 1


async def test_unsolicited_bytes_discard_the_connection(client: httpx.AsyncClient) -> None:
    async with RawServer(keep_alive(OK_RESPONSE + b"HTTP/1.1 200 OK\r\n")) as server:
        for _ in range(2):
            assert (await client.get(server.url)).text == "ok"
        assert server.accepted == 2


async def test_idle_connection_closed_by_server_is_replaced(client: httpx.AsyncClient) -> None:
    async with RawServer(once(OK_RESPONSE)) as server:  # answers once, then closes the kept-alive socket
        for _ in range(3):
            assert (await client.get(server.url)).text == "ok"
            await asyncio.sleep(0.05)
        assert server.accepted == 3


async def test_keep_alive_race_is_retried(client: httpx.AsyncClient) -> None:
    """The server closes a kept-alive connection as our next request arrives: retried on a new one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_RESPONSE)
        await writer.drain()
        await read_request(reader)  # read the second request, then close without answering

    async with RawServer(handler) as server:
        for _ in range(3):
            assert (await client.get(server.url)).text == "ok"
        assert server.accepted == 3


async def test_slow_server_is_a_read_timeout() -> None:
    slow_headers = once(b"", 2.0)
    slow_body = once(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", 2.0)
    async with httpx.AsyncClient(transport=FastTransport(), timeout=httpx.Timeout(5.0, read=0.2)) as client:
        for handler in (slow_headers, slow_body):
            async with RawServer(handler) as server:
                with pytest.raises(httpx.ReadTimeout):
                    await client.get(server.url)


async def test_refused_port_is_a_connect_error(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connecting is refused
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")
    assert stats(client)["open"] == 0


async def test_pool_exhaustion_is_a_pool_timeout() -> None:
    transport = FastTransport(max_connections=1)
    timeout = httpx.Timeout(5.0, pool=0.1)
    async with (
        RawServer(keep_alive()) as server,
        httpx.AsyncClient(transport=transport, timeout=timeout) as client,
    ):
        async with client.stream("GET", server.url) as held:  # holds the only connection
            with pytest.raises(httpx.PoolTimeout):
                await client.get(server.url)
            await held.aread()  # read to the end, so it goes back to the pool
        assert (await client.get(server.url)).text == "ok"
        assert server.accepted == 1


async def test_waiters_are_served_in_order() -> None:
    order: list[int] = []
    transport = FastTransport(max_connections=1)
    async with RawServer(keep_alive()) as server, httpx.AsyncClient(transport=transport) as client:

        async def fetch(i: int) -> None:
            await client.get(server.url)
            order.append(i)

        async with client.stream("GET", server.url) as held:
            tasks = [asyncio.create_task(fetch(i)) for i in range(5)]
            await asyncio.sleep(0.05)
            tasks[2].cancel()  # a cancelled waiter gives up its place, nobody else's
            await asyncio.sleep(0)
            await held.aread()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == [0, 1, 3, 4]
        assert server.accepted == 1 and transport.stats()["open"] == 1


async def test_aclose_closes_every_connection() -> None:
    closed = asyncio.Event()
    n_closed = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal n_closed
        await keep_alive()(reader, writer)
        n_closed += 1
        if n_closed == 3:
            closed.set()

    transport = FastTransport()
    async with RawServer(handler) as server:
        client = httpx.AsyncClient(transport=transport)
        await asyncio.gather(*(client.get(server.url) for _ in range(3)))
        assert server.accepted == 3
        await client.aclose()
        await asyncio.wait_for(closed.wait(), 2.0)
        with pytest.raises(httpx.ConnectError, match="closed"):
            await transport.handle_async_request(httpx.Request("GET", server.url))


async def test_https_falls_back_to_the_httpx_transport(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(httpx.ConnectError):
            await client.get(f"https://127.0.0.1:{port}/")
    assert stats(client)["opened"] == 0
