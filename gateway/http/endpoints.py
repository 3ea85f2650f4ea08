"""Endpoints at the HTTP edge: one generic ASGI handler runs any translator over the shared pipeline.

A `Translator` parses its API's body into a `GatewayRequest` and renders the pipeline's `Answer` or
`ChunkStream` back, errors in its API's envelope. This module authenticates, reads the body, calls the
pipeline and sends the response, JSON or SSE, on the fast lane: raw ASGI sends with no Starlette response
task group. A client that disconnects mid-stream cancels the handler, and the stream is closed either way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from backends.errors import SwitchboardError
from gateway.eager import Ready, run_until_wait
from gateway.errors import PayloadTooLarge
from gateway.http.auth import presented_key
from gateway.http.coalesce import send_batches
from gateway.http.disconnect import DisconnectWatch, until_disconnect
from gateway.http.server import ABORT_EXTENSION
from gateway.metrics import GatewayMetrics
from gateway.pipeline.access import ModelAccess
from gateway.pipeline.flow import Answer, ChunkStream, Pipeline
from gateway.pipeline.request import GatewayRequest, Hints, RequestContext, Timing
from gateway.store.responses import ResponseStore

T = TypeVar("T")
log = logging.getLogger("switchboard")
JSON = "application/json"
_JSON_TYPE = (b"content-type", JSON.encode())
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class Translator(Protocol):
    """One wire API on the pipeline (gateway/translate/).

    Optional, for /openapi.json only: `body_model` and `answer_model`, pydantic models of the request body
    and of the JSON answer (`parse` and `render` stay what reads and writes them). Optional for the edge:
    `api_key_header` (a header that may carry the key when `Authorization` is absent), `forwarded_headers`
    (request headers handed to `to_request` in `ctx.headers`) and `error_status(exc) -> int` (the API's own
    status for an error, when it differs from `exc.status_code`).

    Optional, for an API that keeps state between requests (the Responses API), two awaited hooks around
    the pipeline, which itself stays stateless: `async prepare(body, ctx, store) -> body`, after `parse`
    and before `to_request` (it may read `store`, a `ResponseStore`, and refuse the request), and
    `async after(answer, body, request)`, after a whole answer and before `render` (a stream's
    `render_stream` does its own at the end)."""

    endpoint: str
    path: str

    def parse(self, raw: bytes) -> Any: ...

    def to_request(self, body: Any, ctx: RequestContext) -> GatewayRequest: ...

    def render(self, answer: Answer, body: Any, request: GatewayRequest) -> bytes: ...

    def render_stream(
        self, stream: ChunkStream, body: Any, request: GatewayRequest
    ) -> AsyncIterator[bytes]: ...

    def error_body(self, exc: SwitchboardError) -> bytes: ...


@dataclass(frozen=True, slots=True)
class EndpointDeps:
    """What an endpoint handler uses: nothing else of the app."""

    access: ModelAccess
    pipeline: Pipeline
    metrics: GatewayMetrics
    max_body_bytes: int
    request_timeout_s: float
    responses: ResponseStore  # conversation state, for translators with a `prepare` hook
    write_timeout_s: float = 30.0  # server.write_timeout_s: a stream's client that stops reading


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes (config: server.max_body_bytes)")


def enveloped_response(exc: SwitchboardError, body: bytes, status: int | None = None) -> Response:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in exc.headers}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return Response(body, status_code=status or exc.status_code, media_type=JSON, headers=headers)


def translator_error(translator: Translator, exc: SwitchboardError) -> Response:
    status_of = getattr(translator, "error_status", None)
    return enveloped_response(exc, translator.error_body(exc), status_of(exc) if status_of else None)


async def serve(
    translator: Translator, deps: EndpointDeps, scope: Scope, receive: Receive, send: Send
) -> None:
    """The whole of one endpoint request: auth, body, translate, pipeline, respond."""
    request = Request(scope, receive)
    timing: Timing = scope["state"]["timing"]
    try:
        received_at = dt.datetime.now(dt.UTC)
        key = presented_key(request.headers, getattr(translator, "api_key_header", None))
        identity = await deps.access.authenticate(key, now=received_at)
        try:
            body = translator.parse(await read_body(request, deps.max_body_bytes))
        except SwitchboardError:
            deps.metrics.rejected.labels("invalid_request").inc()
            raise
        ctx = RequestContext(
            identity,
            timing.request_id,
            received_at,
            Hints.from_asgi(scope["headers"]),
            deps.request_timeout_s,
            tuple(
                (n, v) for n in getattr(translator, "forwarded_headers", ()) if (v := request.headers.get(n))
            ),
        )
        prepare = getattr(translator, "prepare", None)
        if prepare is not None:
            body = await prepare(body, ctx, deps.responses)
        greq = translator.to_request(body, ctx)
        if greq.stream:
            stream = await deps.pipeline.open_stream(greq, timing)
            chunks = translator.render_stream(stream, body, greq)
            await send_sse(scope, receive, send, stream, chunks, deps.write_timeout_s)
            return
        rendered: list[bytes] = []
        after = getattr(translator, "after", None)

        async def deliver(answer: Answer) -> None:  # in the pipeline, so the row says what the client gets
            if after is not None:
                await after(answer, body, greq)
            rendered.append(translator.render(answer, body, greq))

        answer = await until_disconnect(receive, deps.pipeline.complete(greq, timing, deliver), scope)
        if answer is None:
            return  # the client went away: the pipeline recorded it and cancelled the attempt
        content = rendered[0]
        # What Starlette's `Response(content, media_type=JSON)` sends, without building one (~1.5 us).
        headers = [(b"content-length", str(len(content)).encode()), _JSON_TYPE, *answer.headers]
    except SwitchboardError as exc:
        await translator_error(translator, exc)(scope, receive, send)
        return
    except Exception:  # noqa: BLE001 - the top-level handler of the fast lane
        log.exception("unhandled error in request %s", timing.request_id)
        error = SwitchboardError("internal error; the gateway log has details")
        await translator_error(translator, error)(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class _Stalled(Exception):
    """The client stopped reading: a write waited longer than server.write_timeout_s."""


async def _write(send: Send, message: Message, timeout_s: float) -> None:
    """`send`, bounded: a timer is armed only when the write has to wait (the client's buffers are full)."""
    step = run_until_wait(send(message))
    if isinstance(step, Ready):
        return
    try:
        async with asyncio.timeout(timeout_s):
            await step
    except TimeoutError:
        raise _Stalled from None


async def send_sse(
    scope: Scope,
    receive: Receive,
    send: Send,
    stream: ChunkStream,
    body: AsyncIterator[bytes],
    write_timeout_s: float = 30.0,
) -> None:
    """SSE straight onto the ASGI `send`; `stream.aclose()` runs however it ends (even if never read).

    One watcher waits for the client's `http.disconnect` and cancels this task, so a client that leaves
    stops the upstream at once instead of at the next chunk. Pieces ready together go out in one send.
    A client that stops reading for `write_timeout_s` is dropped: its connection aborted, its row
    client_closed (charged for what was produced), its upstream freed."""
    watch = DisconnectWatch(receive, scope)
    ended = False

    def write(piece: bytes, more: bool) -> Awaitable[None]:
        message = {"type": "http.response.body", "body": piece, "more_body": more}
        return _write(send, message, write_timeout_s)

    try:
        start = {"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *stream.headers]}
        await _write(send, start, write_timeout_s)
        await send_batches(body, write)
        ended = stream.ended
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        watch.task.uncancel()
    except _Stalled:
        log.warning(
            "request %s: the client read nothing for %g s (server.write_timeout_s); connection dropped",
            stream.rec.request.request_id,
            write_timeout_s,
        )
        abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
        if abort is not None:
            abort()
    finally:
        watch.stop()
        if ended:  # the body and the stream ran to their ends: closing them cannot wait, so needs no shield
            await _close(body, stream)
        else:
            await asyncio.shield(_close(body, stream))


async def _close(body: AsyncIterator[bytes], stream: ChunkStream) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
    await stream.aclose()
