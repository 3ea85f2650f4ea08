"""How the gateway is served: the uvicorn config, TLS, and a hardened HTTP protocol (`[server]` settings).

`GuardedHttpProtocol` (uvicorn's httptools protocol) bounds what a connection may cost before its request
runs: header bytes and fields (431), the time from connect or the last response to the end of the headers
(408), open connections per client address and in total (503). A refused connection gets its answer, then a
half-close and a short linger that discards input, so the client can read the answer before the socket goes.
Each connection holds one slot in its server's `ConnectionSlots` from accept until close, WebSocket included.
No `server` header is sent; X-Forwarded-* is believed only from `server.trusted_proxies`. At shutdown
(gateway/http/drain.py) a connection accepted before the listener closed still gets its first request served.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from gateway.config import Config, ConfigError, ServerConfig
from gateway.http.disconnect import DISCONNECT_EXTENSION, DisconnectHook
from gateway.http.drain import DrainingServer

LINGER_S = 2.0  # after a refusal: input is read and dropped this long, so the answer is not lost to a reset
FIRST_REQUEST_GRACE_S = 1.0  # at shutdown: how long a new connection that has sent nothing yet is kept
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


ABORT_EXTENSION = "switchboard.abort"  # scope["extensions"][...]: drop this connection now


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    max_per_client: int
    max_total: int
    trusted_proxies: tuple[Network, ...] = ()

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(
            server.max_header_bytes,
            server.max_headers,
            server.header_timeout_s,
            server.max_connections_per_client,
            server.max_connections,
            tuple(ipaddress.ip_network(p, strict=False) for p in server.trusted_proxies),
        )

    def is_proxy(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_proxies)


class ConnectionSlots:
    """Open connections of one server, per client address and in total. Keyed by transport: idempotent."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        self._held: dict[object, str | None] = {}
        self._per_client: dict[str, int] = {}

    @property
    def total(self) -> int:
        return len(self._held)

    def acquire(self, transport: object, host: str | None) -> str | None:
        """Take a slot; on refusal, the reason (and nothing is taken)."""
        if len(self._held) >= self._limits.max_total:
            return "the gateway is at its connection limit"
        # A trusted proxy carries many clients: it counts toward the total only.
        key = None if host is None or self._limits.is_proxy(host) else host
        if key is not None:
            if self._per_client.get(key, 0) >= self._limits.max_per_client:
                return "too many open connections from this address"
            self._per_client[key] = self._per_client.get(key, 0) + 1
        self._held[transport] = key
        return None

    def release(self, transport: object) -> None:
        if transport not in self._held:
            return
        key = self._held.pop(transport)
        if key is not None:
            left = self._per_client[key] - 1
            if left:
                self._per_client[key] = left
            else:
                del self._per_client[key]


class _HeadRefused(Exception):
    """Raised from a parser callback: the request head broke a limit (answered with 431)."""


def _refusal(status: int, code: str, message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    )
    lines = [STATUS_LINE[status]]
    for name, value in default_headers:
        lines += [name, b": ", value, b"\r\n"]
    if status == 503:
        lines.append(b"retry-after: 1\r\n")
    lines += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
        body,
    ]
    return b"".join(lines)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `guarded_protocols` binds limits and slots."""

    limits: ConnectionLimits
    slots: ConnectionSlots

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True  # between messages or inside a head: bytes count toward the head
        self._head_bytes = 0  # bytes received while awaiting a head (its size so far, to within one read)
        self._head_size = 0  # exact: url + header names and values of the head being parsed
        self._head_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._upgraded = False
        self._draining = False
        self._disconnect = DisconnectHook()

    # ---- connection ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        reason = self.slots.acquire(transport, self.client[0] if self.client else None)
        if reason is not None:
            self.logger.info("refused a connection from %s: %s", self._peer(), reason)
            self._refuse(503, "too_many_connections", f"{reason}; retry later")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if not self._upgraded:
            self.slots.release(self.transport)
        super().connection_lost(exc)
        self._disconnect.lost()  # after uvicorn marked the cycle disconnected

    def shutdown(self) -> None:
        """Graceful shutdown. A connection with no request yet keeps its first one: it was accepted before
        the listener closed, so its client cannot know (the head timer still bounds it). uvicorn would
        close it, and a request already on its way would fail unanswered. Busy ones close after the answer."""
        self._draining = True
        if self.cycle is not None or self._refused:
            super().shutdown()
        elif self._head_bytes == 0 and self._head_timer is not None:
            self._disarm_head_timer()
            grace_s = min(FIRST_REQUEST_GRACE_S, self.limits.header_timeout_s)
            self._head_timer = self.loop.call_later(grace_s, self._head_timed_out)

    def handle_websocket_upgrade(self) -> None:
        # From here the WebSocket protocol owns the transport and releases its slot (`guarded_protocols`).
        self._disarm_head_timer()
        self._upgraded = True
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: drop what the client still sends
        self._unset_keepalive_if_required()
        if self._awaiting_head:
            if self._head_timer is None:  # the first byte of a request on a kept-alive connection
                self._arm_head_timer()
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadRefused):
                self._refuse_head(str(exc.__context__))
                return
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        if self._awaiting_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head(f"the request head is over {self.limits.max_header_bytes} bytes")

    # ---- parser callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = self._head_fields = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        self._head_size += len(name) + len(value) + 4
        if self._head_fields > self.limits.max_headers:
            raise _HeadRefused(f"the request has more than {self.limits.max_headers} header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        if self._head_size > self.limits.max_header_bytes:
            raise _HeadRefused(f"the request head is over {self.limits.max_header_bytes} bytes")
        self._awaiting_head = False
        self._head_bytes = 0
        # The app may drop a connection whose client stopped reading (a stream's write timeout): abort()
        # discards the unsent bytes, where close() would wait for a reader that never comes.
        extensions: dict[str, Any] = dict(self.scope.get("extensions") or {})
        extensions[ABORT_EXTENSION] = self.transport.abort
        extensions[DISCONNECT_EXTENSION] = self._disconnect
        self.scope["extensions"] = extensions
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with `connection: close`

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True

    # ---- refusals ----------------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:  # nothing of a request arrived: an idle connection, closed quietly
            self.transport.close()
            return
        self.logger.info("closed a connection from %s: its request head took too long", self._peer())
        self._refuse(
            408,
            "request_timeout",
            f"the request headers did not arrive within {self.limits.header_timeout_s:g} s",
        )

    def _refuse_head(self, reason: str) -> None:
        self.logger.info("refused a request from %s: %s", self._peer(), reason)
        self._refuse(431, "request_header_fields_too_large", f"{reason}; send fewer or smaller headers")

    def _bad_request(self) -> None:
        self.logger.warning("Invalid HTTP request received.")
        self._disarm_head_timer()
        self.send_400_response("Invalid HTTP request received.")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer (unless a response is under way), half-close, drop input for LINGER_S, then close."""
        self._refused = True
        self._disarm_head_timer()
        self._unset_keepalive_if_required()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_refusal(status, code, message, self.server_state.default_headers))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a unix socket"


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """The WebSocket side of an upgraded connection: it gives back the slot the HTTP side took."""

    slots: ConnectionSlots

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self.slots.release(self.transport)


def guarded_protocols(
    limits: ConnectionLimits,
) -> tuple[type[GuardedHttpProtocol], type[GuardedWebSocketProtocol]]:
    """Protocol classes for one server, sharing one `ConnectionSlots`."""
    shared = ConnectionSlots(limits)

    class Http(GuardedHttpProtocol):
        pass

    class WebSocket(GuardedWebSocketProtocol):
        pass

    Http.limits, Http.slots, WebSocket.slots = limits, shared, shared
    return Http, WebSocket


_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context for `server.tls_*`, or None without a certificate. Bad files raise ConfigError."""
    if server.tls_cert_file is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[server.tls_min_version]
    ctx.set_alpn_protocols(["http/1.1"])
    for setting, path in (("tls_cert_file", server.tls_cert_file), ("tls_key_file", server.tls_key_file)):
        try:
            if path is not None:
                Path(path).read_bytes()
        except OSError as exc:
            problem = f"server.{setting}: cannot read {path}: {exc.strerror}"
            raise ConfigError("TLS setup", [problem]) from None
    try:
        ctx.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    except ssl.SSLError as exc:
        key = "server.tls_key_file" if server.tls_key_file else "server.tls_cert_file"
        problem = (
            f"server.tls_cert_file / {key}: not a PEM certificate with its matching private key "
            f"({exc.reason or exc}); check both files"
        )
        raise ConfigError("TLS setup", [problem]) from None
    return ctx


def uvicorn_config(
    app: Any, cfg: Config, *, host: str, port: int, access_log: bool, log_level: str = "info"
) -> uvicorn.Config:
    """The uvicorn config `switchboard serve` runs: guarded protocols, TLS, no server header, proxy trust."""
    server = cfg.server
    ssl_ctx = server_ssl_context(server)
    http, ws = guarded_protocols(ConnectionLimits.of(server))
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=access_log,
        log_level=log_level,
        loop="auto",
        http=http,
        ws=ws,
        server_header=False,
        timeout_keep_alive=server.keep_alive_s,  # type: ignore[arg-type]  # a float works (call_later)
        proxy_headers=bool(server.trusted_proxies),  # uvicorn's default believes 127.0.0.1 (and its env)
        forwarded_allow_ips=list(server.trusted_proxies),
        ssl_context_factory=None if ssl_ctx is None else (lambda _config, _default: ssl_ctx),
    )


def run_server(app: Any, cfg: Config, *, host: str, port: int, access_log: bool) -> None:
    """Serve `app` until SIGINT/SIGTERM, then drain (as `uvicorn.run` does for one process without reload)."""
    config = uvicorn_config(app, cfg, host=host, port=port, access_log=access_log)
    server = DrainingServer(config, drain_timeout_s=cfg.server.drain_timeout_s)
    server.run()
    if not server.started:  # the lifespan failed (its error is logged): exit as uvicorn.run does
        raise SystemExit(STARTUP_FAILURE)
