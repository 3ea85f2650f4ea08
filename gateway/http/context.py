"""Pure-ASGI middleware: request id, per-request timing and the `x-switchboard-overhead-ms` header.

Overhead = (time the response headers are sent - time the request reached this middleware) - time spent
waiting on backends. It covers body reading, parsing, auth, routing, ledger enqueue and rendering; it excludes
uvicorn's HTTP parsing before the app is called and the transfer of the body after the headers. For streams it
is measured when the headers go out, i.e. after the first upstream chunk arrived.
"""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.pipeline.request import Timing


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

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                overhead_ms = max(0.0, timing.elapsed_ms() - timing.upstream_s * 1000)
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", timing.request_id.encode()))
                headers.append((b"x-switchboard-overhead-ms", f"{overhead_ms:.3f}".encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
