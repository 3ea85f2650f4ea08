"""`FastTransport`: an HTTP/1.1 keep-alive transport for httpx on plain asyncio, parsed by httptools.

httpx's default transport (httpcore + anyio) cost about half of the gateway's event-loop CPU; this one does a
checkout in O(1) (LIFO idle list), queues callers FIFO beyond `max_connections`, and wakes a reader once per
`data_received`. Invariant: a connection goes back to the idle list only after its response was read to the
end with keep-alive and nothing else arrived; anything else (server close, unread bytes, `connection: close`,
an error, a timeout, cancellation) closes it. Every failure leaves as an httpx exception. Only `http://` is
served here; other schemes go to a lazily built `httpx.AsyncHTTPTransport` (cloud calls use litellm anyway).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TypeVar, cast

import httptools
import httpx

_T = TypeVar("_T")
_HIGH_WATER_BYTES = 256 * 1024  # buffered, unread response body above which we stop reading the socket
_WAITER_TIMED_OUT = object()  # a pool waiter's result when its pool timeout fired
_SLOT = object()  # a pool waiter's result: "you may open a new connection"
_CLOSED = object()  # a pool waiter's result when the transport was closed under it
_STALE_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)


class FastTransport(httpx.AsyncBaseTransport):
    """Pools per (scheme, host, port). Timeouts come from `request.extensions["timeout"]`, as httpx sets."""

    def __init__(self, *, max_connections: int = 100, keepalive_expiry_s: float = 4.0) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        # Below uvicorn's default 5 s keep-alive timeout (vLLM, llama.cpp's server and ours run uvicorn-like
        # servers), so we rarely pick a connection the server is about to close.
        self._max_connections = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._fallback: httpx.AsyncHTTPTransport | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(
                    limits=httpx.Limits(max_connections=self._max_connections)
                )
            return await self._fallback.handle_async_request(request)
        key = ("http", url.host, url.port or 80)
        pool = self._pools.get(key)
        if pool is None:
            if self._closed:
                raise httpx.ConnectError("the transport is closed", request=request)
            pool = _Pool(key[1], key[2], url.netloc, self._max_connections, self._keepalive_expiry_s)
            self._pools[key] = pool
        return await pool.send(request)

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    def stats(self) -> dict[str, int]:
        """Connections ever opened, open now and idle now, over every pool (tests and debugging)."""
        pools = self._pools.values()
        return {
            "opened": sum(p.n_opened for p in pools),
            "open": sum(p.n_open for p in pools),
            "idle": sum(len(p.idle) for p in pools),
        }


class _Pool:
    """Keep-alive connections to one origin. `n_open` counts connecting, busy and idle connections."""

    def __init__(
        self, host: str, port: int, netloc: bytes, max_connections: int, keepalive_expiry_s: float
    ) -> None:
        self._host = host
        self._port = port
        self._netloc = netloc  # the Host header when a request has none
        self._max = max_connections
        self._expiry_s = keepalive_expiry_s
        self.idle: list[_Connection] = []  # most recently used last
        self._all: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[object]] = deque()
        self.n_open = 0
        self.n_opened = 0
        self._closed = False

    async def send(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout") or {}
        head, body = _encode_request(request, await _request_body(request), self._netloc)
        message = head + body if len(body) < 65536 else None  # one write for small bodies
        while True:
            conn = await self._acquire(request, timeouts)
            reused = conn.n_requests > 0
            try:
                return await conn.request(request, message or head, None if message else body, timeouts, self)
            except _StaleConnection as stale:
                self.release(conn, reusable=False)
                if not reused:
                    raise stale.error from None
                # A kept-alive connection the server closed as we reused it: retry on another one. The
                # server sent nothing back; at worst it got the POST and died, and we send it twice.
            except BaseException:
                self.release(conn, reusable=False)
                raise

    async def _acquire(self, request: httpx.Request, timeouts: dict[str, float | None]) -> _Connection:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        idle = self.idle
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()
                if conn.is_reusable(now, self._expiry_s):
                    return conn
                self._drop(conn)
        if self.n_open < self._max:
            self.n_open += 1
            return await self._connect(request, timeouts)
        got = await self._wait(request, timeouts.get("pool"))
        if isinstance(got, _Connection):
            if not got.closed:
                return got
            self._all.discard(got)  # closed while handed over: keep its slot and open a fresh one
        return await self._connect(request, timeouts)

    async def _wait(self, request: httpx.Request, timeout: float | None) -> object:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[object] = loop.create_future()
        self._waiters.append(waiter)
        handle = None if timeout is None else loop.call_later(timeout, _resolve, waiter, _WAITER_TIMED_OUT)
        try:
            got = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                got = waiter.result()
                if got is _SLOT or isinstance(got, _Connection):
                    self._give_back(got)  # handed a connection or a slot, then cancelled
            raise
        finally:
            if handle is not None:
                handle.cancel()
        if got is _WAITER_TIMED_OUT:
            raise httpx.PoolTimeout(
                f"no free connection to {self._host}:{self._port} within {timeout:g} s", request=request
            )
        if got is _CLOSED:
            raise httpx.ConnectError("the transport is closed", request=request)
        return got

    async def _connect(self, request: httpx.Request, timeouts: dict[str, float | None]) -> _Connection:
        """Opens a connection for a slot already counted in `n_open`; frees the slot if that fails."""
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self._host, self._port), timeouts.get("connect")
            )
        except TimeoutError as exc:
            self._free_slot()
            raise httpx.ConnectTimeout(
                f"connecting to {self._host}:{self._port} timed out", request=request
            ) from exc
        except OSError as exc:
            self._free_slot()
            raise httpx.ConnectError(
                f"cannot connect to {self._host}:{self._port}: {exc}", request=request
            ) from exc
        except BaseException:
            self._free_slot()
            raise
        self.n_opened += 1
        if self._closed:
            conn.close()
            self._free_slot()
            raise httpx.ConnectError("the transport is closed", request=request)
        self._all.add(conn)
        return conn

    def release(self, conn: _Connection, *, reusable: bool) -> None:
        if reusable and not self._closed and conn.is_reusable(None, 0.0):
            conn.idle_since = asyncio.get_running_loop().time()
            self._give_back(conn)
        else:
            self._drop(conn)

    def _give_back(self, got: object) -> None:
        """Hands an idle connection or a free slot to the oldest live waiter, else keeps it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(got)
                return
        if isinstance(got, _Connection):
            self.idle.append(got)
        elif got is _SLOT:
            self.n_open -= 1

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._all.discard(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        if self._closed:
            self.n_open -= 1
            return
        self._give_back(_SLOT)

    def close(self) -> None:
        self._closed = True
        for conn in self._all:
            conn.close()
        self._all.clear()
        self.idle.clear()
        while self._waiters:
            _resolve(self._waiters.popleft(), _CLOSED)


def _resolve(waiter: asyncio.Future[_T], value: _T) -> None:
    if not waiter.done():
        waiter.set_result(value)


class _StaleConnection(Exception):
    """The server closed the connection before any byte of the response (the keep-alive race)."""

    def __init__(self, error: httpx.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


class _Connection(asyncio.Protocol):
    """One socket and its parser. At most one request in flight; the reader waits on `_waiter`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[bool] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self.closed = False
        self.n_requests = 0
        self.idle_since = 0.0
        self._request: httpx.Request | None = None  # in flight; None while idle
        self._head_only = False
        self._reset_response()

    def _reset_response(self) -> None:
        self._got_bytes = False
        self._status_reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._interim = False
        self._delimited = False  # content-length or chunked: the end is not the server closing
        self.complete = False
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self._buffered = 0
        self.error: httpx.TransportError | None = None

    def is_reusable(self, now: float | None, expiry_s: float) -> bool:
        if self.closed or self._request is not None:
            return False
        return now is None or now - self.idle_since < expiry_s

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # ---- one exchange ------------------------------------------------------------------------------------

    async def request(
        self,
        request: httpx.Request,
        message: bytes,
        rest: bytes | None,
        timeouts: dict[str, float | None],
        pool: _Pool,
    ) -> httpx.Response:
        assert self._transport is not None
        self._reset_response()
        self._request = request
        self._head_only = request.method == "HEAD"
        self.n_requests += 1
        self._transport.write(message)
        if rest:
            self._transport.write(rest)
        if self._write_paused:
            await self._wait_drain(request, timeouts.get("write"))
        read_timeout = timeouts.get("read")
        while not self._headers_done:
            if self.error is not None:
                if not self._got_bytes and isinstance(self.error, _STALE_ERRORS):
                    raise _StaleConnection(self.error)
                raise self.error
            await self.wait(read_timeout)
        stream = _ResponseStream(self, pool, read_timeout)
        return httpx.Response(
            self._parser.get_status_code(),
            headers=self._headers,
            stream=stream,
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": self._status_reason},
        )

    async def wait(self, timeout: float | None) -> None:
        """Until the next `data_received` or the end of the connection; `ReadTimeout` after `timeout`."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter
        handle = None if timeout is None else self._loop.call_later(timeout, _resolve, waiter, False)
        try:
            woken = await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()
        if not woken:
            raise httpx.ReadTimeout(f"no data from the server in {timeout:g} s", request=self._request)

    async def _wait_drain(self, request: httpx.Request, timeout: float | None) -> None:
        drain: asyncio.Future[None] = self._loop.create_future()
        self._drain = drain
        try:
            await asyncio.wait_for(drain, timeout)
        except TimeoutError as exc:
            raise httpx.WriteTimeout(
                "the server did not take the request body in time", request=request
            ) from exc
        finally:
            self._drain = None

    def take_chunks(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self._buffered = 0
        if self._read_paused and self._transport is not None and not self.closed:
            self._read_paused = False
            self._transport.resume_reading()
        return data

    def finish(self) -> bool:
        """Ends the exchange; True when the connection may serve another request."""
        self._request = None
        return self.complete and self.keep_alive and not self.chunks and not self.closed

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        self.close()

    # ---- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._request is None or self.complete:
            self.close()  # bytes nobody asked for: this connection's framing can no longer be trusted
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}", request=self._request))
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._request is not None and not self.complete and self.error is None:
            if self._headers_done and not self._delimited:
                self.complete = True  # a body delimited by the server closing the connection
                self.keep_alive = False
            elif exc is not None:
                self.error = httpx.ReadError(f"connection lost: {exc}", request=self._request)
            else:
                what = "in the response body" if self._headers_done else "before a complete response"
                self.error = httpx.RemoteProtocolError(f"server disconnected {what}", request=self._request)
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(httpx.WriteError("connection lost while writing", request=self._request))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ---- httptools callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self._fail(httpx.RemoteProtocolError("server sent a second response", request=self._request))

    def on_status(self, reason: bytes) -> None:
        self._status_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(name) in (14, 17):  # len(b"content-length"), len(b"transfer-encoding"): skip lower() mostly
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._delimited = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # interim (e.g. 103 Early Hints): the real response follows
            self._interim = True
            self._headers = []
            self._status_reason = b""
            return
        self._headers_done = True
        if self._head_only or status in (204, 304):
            self._delimited = True
            if self._head_only:
                # httptools cannot be told the request was HEAD, so it would read a body that never comes.
                self.complete = True
                self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER_BYTES and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive() and not self._head_only


class _ResponseStream(httpx.AsyncByteStream):
    """Yields body bytes as they arrive; `aclose` returns the connection only after a complete read."""

    def __init__(self, conn: _Connection, pool: _Pool, read_timeout: float | None) -> None:
        self._conn = conn
        self._pool = pool
        self._read_timeout = read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take_chunks()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.wait(self._read_timeout)

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._conn, reusable=self._conn.finish())


# ---- request encoding -----------------------------------------------------------------------------------


async def _request_body(request: httpx.Request) -> bytes:
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):  # `content=` bytes, or `stream=ByteStream(...)`: one piece
        return b"".join(stream)
    return await request.aread()  # a streamed body: read it whole (our callers send small JSON)


def _encode_request(request: httpx.Request, body: bytes, netloc: bytes) -> tuple[bytes, bytes]:
    """The request head and the body as they go on the wire; Host and Content-Length are added when the
    request lacks them (an `httpx.Request(stream=...)` gets no auto-populated headers)."""
    parts: list[bytes] = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    has_host = chunked = has_length = False
    for name, value in request.headers.raw:
        lowered = name.lower()
        if lowered == b"host":
            has_host = True
        elif lowered == b"content-length":
            has_length = True
        elif lowered == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        parts += (name, b": ", value, b"\r\n")
    if not has_host:
        parts += (b"Host: ", netloc, b"\r\n")
    if chunked:
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif body and not has_length:
        parts += (b"Content-Length: ", b"%d" % len(body), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), body
