"""MetricsPoller against a real loopback HTTP server: readings arrive, outages pass, aclose ends it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from gateway.live.engine_load import EngineLoad, MetricsPoller


class MetricsServer:
    """A raw asyncio HTTP/1.1 server answering every request with `body` (or `status`), closing each time."""

    def __init__(self) -> None:
        self.body = "switchboard_engine_queue_depth 1\nswitchboard_engine_running_requests 2\n"
        self.status = 200
        self.hang = False
        self.hits = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/metrics"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        if self.hang:
            await reader.read()  # until the client gives up and closes
            writer.close()
            return
        body = self.body.encode()
        head = (
            f"HTTP/1.1 {self.status} X\r\nContent-Type: text/plain; version=0.0.4\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    srv = MetricsServer()
    yield srv
    await srv.aclose()


async def wait_for(condition: object, timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_poller_reads_survives_errors_and_closes(server: MetricsServer) -> None:
    url = await server.start()
    readings: list[EngineLoad] = []
    poller = MetricsPoller(url, 0.02, readings.append, timeout_s=0.2)
    poller.start()
    await wait_for(lambda: len(readings) >= 2)
    assert readings[0] == EngineLoad(queue_depth=1, running=2, kv_cache_used_frac=None)

    server.status = 503  # an outage: no readings, but the loop goes on
    await asyncio.sleep(0.05)
    count, hits = len(readings), server.hits
    await wait_for(lambda: server.hits >= hits + 3)
    assert len(readings) <= count + 1  # at most one poll was already in flight

    server.hang = True  # slower than the timeout
    hits = server.hits
    await wait_for(lambda: server.hits >= hits + 2)

    server.hang, server.status = False, 200
    server.body = 'vllm:num_requests_waiting{engine="0"} 5\nvllm:kv_cache_usage_perc{engine="0"} 0.5\n'
    await wait_for(lambda: readings[-1].queue_depth == 5)
    assert readings[-1] == EngineLoad(queue_depth=5, running=None, kv_cache_used_frac=0.5)

    await poller.aclose()
    hits = server.hits
    await asyncio.sleep(0.08)
    assert server.hits == hits


async def test_poller_survives_a_failing_callback_and_a_dead_port(
    server: MetricsServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = await server.start()
    calls: list[EngineLoad] = []

    def flaky(load: EngineLoad) -> None:
        calls.append(load)
        if len(calls) == 1:
            raise RuntimeError("bug in the consumer")

    poller = MetricsPoller(url, 0.02, flaky, timeout_s=0.2)
    poller.start()
    await wait_for(lambda: len(calls) >= 2)
    await poller.aclose()

    await server.aclose()  # nothing listens there any more
    caplog.set_level(logging.DEBUG, logger="gateway.live.engine_load")
    caplog.clear()
    count = len(calls)
    dead = MetricsPoller(url, 0.01, calls.append, timeout_s=0.2)
    dead.start()

    def poller_records() -> list[logging.LogRecord]:  # not httpx's own (the log scan runs the root at DEBUG)
        return [r for r in caplog.records if r.name == "gateway.live.engine_load"]

    await wait_for(lambda: len(poller_records()) >= 3)
    await dead.aclose()
    assert len(calls) == count
    levels = [r.levelno for r in poller_records()]
    assert levels[0] == logging.WARNING and set(levels[1:]) == {logging.DEBUG}  # warned once per outage
    assert "ConnectError" in poller_records()[0].getMessage()
