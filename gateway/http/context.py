"""Pure-ASGI middleware: request id, per-request timing and the `x-switchboard-overhead-ms` header.

Overhead = (time the response headers are sent - time the request reached this middleware) - time spent
waiting on backends. It covers body reading, parsing, auth, routing, ledger enqueue and rendering; it excludes
uvicorn's HTTP parsing before the app is called and the transfer of the body after the headers. For streams it
is measured when the headers go out, i.e. after the first upstream chunk arrived.

It is also the last catch for errors nothing else handled: a 500 in the OpenAI envelope, logged with the
request id, and the connection stays open (Starlette's outer handler re-raises, and uvicorn then drops a
keep-alive connection for every client on it).
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.errors import SwitchboardError
from gateway.errors import error_body
from gateway.pipeline.request import Timing

log = logging.getLogger("switchboard")


def timing_of(scope: Scope) -> Timing:
    timing: Timing = scope["state"]["timing"]
    return timing


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = Timing(start_s=time.perf_counter(), request_id=uuid.uuid4().hex)
        scope.setdefault("state", {})["timing"] = timing

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                overhead_ms = max(0.0, timing.elapsed_ms() - timing.upstream_s * 1000)
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", timing.request_id.encode()))
                headers.append((b"x-switchboard-overhead-ms", f"{overhead_ms:.3f}".encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # noqa: BLE001 - the top-level handler: log, answer with the envelope, go on
            log.exception("unhandled error in request %s", timing.request_id)
            if started:
                return  # the response is under way: nothing more can be said on it
            body = error_body(SwitchboardError("internal error; the gateway log has details"))
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_with_headers({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
