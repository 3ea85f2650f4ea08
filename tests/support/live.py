"""Run an ASGI app under a real uvicorn server in a background thread, on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LiveServer:
    """`with LiveServer(app) as srv:` serves `app` (with lifespan) at `srv.base_url` until the block ends."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        port: int | None = None,
        startup_timeout_s: float = 120.0,
        make_config: Callable[[ASGIApp, int], uvicorn.Config] | None = None,
    ) -> None:
        """`make_config(app, port)` replaces the plain uvicorn config (e.g. `gateway.http.server`)."""
        self.port = port or free_port()
        if make_config is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        else:
            config = make_config(app, self.port)
        self.base_url = f"{'https' if config.is_ssl else 'http'}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self._startup_timeout_s = startup_timeout_s

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start (see log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {self.port} did not start in {self._startup_timeout_s} s")
            time.sleep(0.02)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
