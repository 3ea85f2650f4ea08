"""What an edge node is told (`NodeOptions`, the flags of `switchboard edge serve`) and how it redials.

`connect_url` turns the gateway's http(s)/ws(s) base into the WebSocket URL; `Backoff` is full-jitter
exponential backoff (AWS's "full jitter": uniform in [0, min(cap, base * 2**n))), reset after a welcome.
`client_ssl_context` is the TLS trust for a wss:// gateway: the system's CAs, or only `--ca-file`'s.
`QuietWebSocketLog` is websockets' logger for the connection, never at DEBUG (that would log the token).
No I/O but reading `--ca-file`; torch is imported only when options are checked against the engine's.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from backends.edge import wire
from backends.local.loader import DEFAULT_MODEL_SPEC

if TYPE_CHECKING:
    from backends.local.build import EngineOptions

TOKEN_ENV = "SWITCHBOARD_EDGE_TOKEN"


class QuietWebSocketLog(logging.LoggerAdapter[logging.Logger]):
    """websockets' logger for an edge connection, with DEBUG always off: at DEBUG websockets logs every
    handshake header (`Authorization: Bearer sbe_...`) and the start of every frame (prompt and completion
    text). INFO and above pass through to `name` as before."""

    def __init__(self, name: str = "websockets.client") -> None:
        super().__init__(logging.getLogger(name), {})

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's name
        return level > logging.DEBUG and self.logger.isEnabledFor(level)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        return


def default_node_id() -> str:
    """Hostname plus a short random suffix: unique per process, stable only when `--node-id` is given."""
    return f"{socket.gethostname().split('.')[0] or 'node'}-{random.SystemRandom().getrandbits(24):06x}"


@dataclass(frozen=True, slots=True)
class NodeOptions:
    gateway_url: str  # http(s):// or ws(s):// base of the gateway; the path /v1/edge/connect is appended
    token: str
    node_id: str = field(default_factory=default_node_id)
    labels: Mapping[str, str] = field(default_factory=dict)
    usd_per_hour: float = 0.0
    model: str = DEFAULT_MODEL_SPEC
    served_name: str = "smollm2"
    quant: str = "auto"  # timed on the device at first start, as `engine serve` does (autotune.py)
    kv_cache_mb: float = 64.0
    threads: int | None = None
    max_batch: int = 8
    max_pending: int | None = None  # requests held at once (running + queued); default 4 x max_batch
    max_tokens_default: int = 512  # cap for a request without max_tokens
    heartbeat_s: float = 2.0  # when the gateway's welcome names no interval
    measure_tokens: int = 32  # greedy tokens generated at start to measure tokens/s (0: report 0)
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    open_timeout_s: float = 10.0
    ca_file: str | None = None  # PEM CA(s) the gateway's certificate must chain to (wss only); None: system's

    def __post_init__(self) -> None:
        client_ssl_context(connect_url(self.gateway_url), self.ca_file)  # raises on a bad URL or CA file
        if not self.token:
            raise ValueError(f"an enrollment token is required: --token or {TOKEN_ENV}")
        if not self.node_id or not self.served_name:
            raise ValueError("--node-id and --served-name must not be empty")
        for name in ("usd_per_hour", "measure_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        for name in ("max_batch", "max_tokens_default", "heartbeat_s", "backoff_base_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        self.engine_options()  # the engine's own checks: --quant, --kv-cache-mb

    @property
    def pending_limit(self) -> int:
        return self.max_pending or 4 * self.max_batch

    def engine_options(self) -> EngineOptions:
        from backends.local.build import EngineOptions  # imports torch: only once a node is configured

        return EngineOptions(
            quant=self.quant, kv_cache_mb=self.kv_cache_mb, threads=self.threads, max_batch=self.max_batch
        )


def connect_url(gateway_url: str) -> str:
    """`http://gw:8080` (or `.../v1`, or a ws:// URL) -> `ws://gw:8080/v1/edge/connect`."""
    parts = urlsplit(gateway_url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"--gateway `{gateway_url}` must be an http(s):// or ws(s):// URL with a host")
    path = parts.path.rstrip("/")
    if not path.endswith(wire.CONNECT_PATH):
        path = path.removesuffix("/v1") + wire.CONNECT_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def client_ssl_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """TLS for a wss:// connect URL (certificate and host name verified): None for ws://. With `ca_file`,
    only the CAs in that file are trusted (a private CA); without, the system's."""
    if not url.startswith("wss://"):
        if ca_file is not None:
            raise ValueError(f"--ca-file is for a TLS gateway: make --gateway https:// or wss:// (got {url})")
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError as exc:
        raise ValueError(f"--ca-file {ca_file}: cannot read it ({exc.strerror})") from None
    except ssl.SSLError as exc:
        raise ValueError(f"--ca-file {ca_file}: not a PEM CA certificate ({exc.reason or exc})") from None


def untrusted_certificate(url: str, ca_file: str | None, exc: ssl.SSLCertVerificationError) -> str:
    """What to do when the gateway's certificate fails verification (the node keeps retrying)."""
    why = exc.verify_message or exc.reason or "verification failed"
    if ca_file is None:
        fix = "if a private CA signed it, pass that CA's PEM file with --ca-file PATH"
    else:
        fix = f"check that --ca-file {ca_file} holds the CA that signed it, and that it names this host"
    return f"the gateway's TLS certificate at {url} is not trusted ({why}); {fix}"


@dataclass(slots=True)
class Backoff:
    """Full-jitter exponential backoff: the n-th delay is uniform in [0, min(cap, base * 2**n))."""

    base_s: float
    cap_s: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
