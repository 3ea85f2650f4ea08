"""The edge protocol: JSON text frames over one WebSocket (`GET /v1/edge/connect`, node dials out).

node -> gateway: hello{node_id, models, labels, capacity{max_batch, kv_cache_mb}, tokens_per_s,
  usd_per_hour, version, protocol}; heartbeat{in_flight, queue_depth, kv_used_frac, tokens_per_s};
  chunk{id, delta{content}}; done{id, finish_reason, usage{prompt_tokens, completion_tokens}};
  error{id, status, code, message}.
gateway -> node: welcome{node_id, labels, heartbeat_s?}; request{id, model, messages, max_tokens, temperature,
  top_p, stop, seed, deadline_ms?}; cancel{id}. `deadline_ms`: within how long the first token is wanted (the
  team's SLO); the node's engine queues earliest deadline first. Close codes: `CloseCode`. Every frame is
  `{"type": ..., fields}`.
Pure: no I/O. `decode` raises `FrameError` naming the field on any malformed frame and never echoes values
(a frame may carry prompt text); unknown fields are ignored so a newer peer can add optional ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar

import orjson

from backends.base import DEADLINE_RANGE_MS, Usage

PROTOCOL_VERSION = 1
CONNECT_PATH = "/v1/edge/connect"


class CloseCode(IntEnum):
    """WebSocket close codes. The node reconnects after any close except `UNAUTHORIZED`."""

    NORMAL = 1000
    GOING_AWAY = 1001  # gateway or node shutting down
    POLICY = 1008  # RFC 6455 policy violation: edge nodes are off on this gateway (config: edge.enabled)
    TRY_LATER = 1013  # RFC 6455 "try again later": the gateway could not check the token (database down)
    BAD_HELLO = 4400  # first frame missing, malformed, or an unsupported protocol version
    UNAUTHORIZED = 4401  # enrollment token unknown, expired or revoked: the node stops
    STALE = 4408  # no heartbeat for 3 x edge.ttl_s: the gateway presumed the node gone
    DUPLICATE_NODE = 4409  # another live connection holds this node_id


class FrameError(ValueError):
    """A frame that is not valid JSON, has an unknown type, or a missing / mistyped field."""


# ---- frames ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capacity:
    max_batch: int
    kv_cache_mb: float


@dataclass(frozen=True, slots=True)
class Hello:
    type: ClassVar[str] = "hello"
    node_id: str
    models: tuple[str, ...]
    labels: Mapping[str, str]
    capacity: Capacity
    tokens_per_s: float  # measured decode rate of one stream at start
    usd_per_hour: float = 0.0
    version: str = ""  # the node's software version, for the admin listing
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    type: ClassVar[str] = "welcome"
    node_id: str
    labels: Mapping[str, str]  # effective labels: the token's override the node's
    heartbeat_s: float | None = None  # None: the node keeps its own default


@dataclass(frozen=True, slots=True)
class Heartbeat:
    type: ClassVar[str] = "heartbeat"
    in_flight: int  # requests the engine is running
    queue_depth: int  # requests waiting for a batch slot or KV blocks
    kv_used_frac: float  # 0..1
    tokens_per_s: float


@dataclass(frozen=True, slots=True)
class Request:
    type: ClassVar[str] = "request"
    id: str
    model: str
    messages: tuple[Mapping[str, Any], ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    deadline_ms: float | None = None  # the first token's deadline (ms after arrival); None: engine default


@dataclass(frozen=True, slots=True)
class Chunk:
    type: ClassVar[str] = "chunk"
    id: str
    content: str  # on the wire: "delta": {"content": ...}


@dataclass(frozen=True, slots=True)
class Done:
    type: ClassVar[str] = "done"
    id: str
    finish_reason: str
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class Error:
    type: ClassVar[str] = "error"
    id: str
    status: int  # HTTP-style: 4xx the request itself is wrong, 503 node busy / shutting down, 500 engine
    code: str
    message: str  # never prompt text


@dataclass(frozen=True, slots=True)
class Cancel:
    type: ClassVar[str] = "cancel"
    id: str


Frame = Hello | Welcome | Heartbeat | Request | Chunk | Done | Error | Cancel
NodeFrame = Hello | Heartbeat | Chunk | Done | Error
GatewayFrame = Welcome | Request | Cancel
NODE_FRAMES: tuple[type[Any], ...] = (Hello, Heartbeat, Chunk, Done, Error)
GATEWAY_FRAMES: tuple[type[Any], ...] = (Welcome, Request, Cancel)
_BY_TYPE: dict[str, type[Any]] = {cls.type: cls for cls in (*NODE_FRAMES, *GATEWAY_FRAMES)}


# ---- encode ------------------------------------------------------------------------------------------------


def _body(frame: Frame) -> dict[str, Any]:
    if isinstance(frame, Hello):
        return {
            "node_id": frame.node_id,
            "models": list(frame.models),
            "labels": dict(frame.labels),
            "capacity": {"max_batch": frame.capacity.max_batch, "kv_cache_mb": frame.capacity.kv_cache_mb},
            "tokens_per_s": frame.tokens_per_s,
            "usd_per_hour": frame.usd_per_hour,
            "version": frame.version,
            "protocol": frame.protocol,
        }
    if isinstance(frame, Welcome):
        return {"node_id": frame.node_id, "labels": dict(frame.labels), "heartbeat_s": frame.heartbeat_s}
    if isinstance(frame, Request):
        return {
            "id": frame.id,
            "model": frame.model,
            "messages": [dict(m) for m in frame.messages],
            "max_tokens": frame.max_tokens,
            "temperature": frame.temperature,
            "top_p": frame.top_p,
            "stop": list(frame.stop),
            "seed": frame.seed,
            "deadline_ms": frame.deadline_ms,
        }
    if isinstance(frame, Chunk):
        return {"id": frame.id, "delta": {"content": frame.content}}
    if isinstance(frame, Done):
        usage = frame.usage
        counts = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        return {"id": frame.id, "finish_reason": frame.finish_reason, "usage": counts}
    if isinstance(frame, Heartbeat | Error | Cancel):
        return {f.name: getattr(frame, f.name) for f in fields(frame)}
    raise TypeError(f"not an edge frame: {type(frame).__name__}")


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def encode(frame: Frame) -> str:
    """The frame as a JSON text (send it as a WebSocket text frame)."""
    return orjson.dumps({"type": frame.type, **_body(frame)}, default=_json_default).decode()


# ---- decode ------------------------------------------------------------------------------------------------


class _Fields:
    """Typed reads of one frame's fields; every failure names `type.field`."""

    def __init__(self, kind: str, data: Mapping[str, Any]) -> None:
        self._kind = kind
        self._data = data

    def fail(self, name: str, expected: str) -> FrameError:
        return FrameError(f"malformed `{self._kind}` frame: field `{name}` must be {expected}")

    def present(self, name: str) -> bool:
        return self._data.get(name) is not None

    def text(self, name: str, *, empty: bool = False) -> str:
        value = self._data.get(name)
        if not isinstance(value, str) or (not empty and not value):
            raise self.fail(name, "a string" if empty else "a non-empty string")
        return value

    def integer(self, name: str, *, minimum: int | None = 0) -> int:
        value = self._data.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            raise self.fail(name, "an integer" if minimum is None else f"an integer >= {minimum}")
        return value

    def number(self, name: str, *, minimum: float = 0.0) -> float:
        value = self._data.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(name, f"a number >= {minimum}")
        number = float(value)
        if not math.isfinite(number) or number < minimum:
            raise self.fail(name, f"a number >= {minimum}")
        return number

    def optional_int(self, name: str) -> int | None:
        return self.integer(name, minimum=None) if self.present(name) else None

    def optional_float(self, name: str) -> float | None:
        return self.number(name) if self.present(name) else None

    def obj(self, name: str) -> _Fields:
        value = self._data.get(name)
        if not isinstance(value, dict):
            raise self.fail(name, "an object")
        return _Fields(f"{self._kind}.{name}", value)

    def labels(self, name: str) -> dict[str, str]:
        value = self._data.get(name, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
        ):
            raise self.fail(name, "an object of non-empty string keys to string values")
        return value

    def strings(self, name: str, *, non_empty: bool = False) -> tuple[str, ...]:
        value = self._data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise self.fail(name, "a list of non-empty strings")
        if non_empty and not value:
            raise self.fail(name, "a non-empty list of non-empty strings")
        return tuple(value)

    def messages(self, name: str) -> tuple[Mapping[str, Any], ...]:
        value = self._data.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise self.fail(name, "a non-empty list of message objects")
        return tuple(value)


def _decode_fields(kind: str, f: _Fields) -> Frame:
    if kind == "hello":
        cap = f.obj("capacity")
        return Hello(
            node_id=f.text("node_id"),
            models=f.strings("models", non_empty=True),
            labels=f.labels("labels"),
            capacity=Capacity(cap.integer("max_batch", minimum=1), cap.number("kv_cache_mb")),
            tokens_per_s=f.number("tokens_per_s"),
            usd_per_hour=f.optional_float("usd_per_hour") or 0.0,
            version=f.text("version", empty=True) if f.present("version") else "",
            protocol=f.integer("protocol", minimum=1) if f.present("protocol") else PROTOCOL_VERSION,
        )
    if kind == "welcome":
        heartbeat_s = f.optional_float("heartbeat_s")
        if heartbeat_s is not None and heartbeat_s <= 0:
            raise f.fail("heartbeat_s", "a positive number")
        return Welcome(node_id=f.text("node_id"), labels=f.labels("labels"), heartbeat_s=heartbeat_s)
    if kind == "heartbeat":
        kv = f.number("kv_used_frac")
        if kv > 1.0:
            raise f.fail("kv_used_frac", "a number in [0, 1]")
        return Heartbeat(
            in_flight=f.integer("in_flight"),
            queue_depth=f.integer("queue_depth"),
            kv_used_frac=kv,
            tokens_per_s=f.number("tokens_per_s"),
        )
    if kind == "request":
        max_tokens = f.integer("max_tokens", minimum=1) if f.present("max_tokens") else None
        return Request(
            id=f.text("id"),
            model=f.text("model"),
            messages=f.messages("messages"),
            max_tokens=max_tokens,
            temperature=f.optional_float("temperature"),
            top_p=f.optional_float("top_p"),
            stop=f.strings("stop") if f.present("stop") else (),
            seed=f.optional_int("seed"),
            deadline_ms=(
                f.number("deadline_ms", minimum=DEADLINE_RANGE_MS[0]) if f.present("deadline_ms") else None
            ),
        )
    if kind == "chunk":
        return Chunk(id=f.text("id"), content=f.obj("delta").text("content", empty=True))
    if kind == "done":
        usage = f.obj("usage")
        return Done(
            id=f.text("id"),
            finish_reason=f.text("finish_reason"),
            usage=Usage(usage.integer("prompt_tokens"), usage.integer("completion_tokens")),
        )
    if kind == "error":
        return Error(
            id=f.text("id"),
            status=f.integer("status", minimum=100),
            code=f.text("code"),
            message=f.text("message"),
        )
    return Cancel(id=f.text("id"))


def decode(data: str | bytes, *, allowed: tuple[type[Any], ...] | None = None) -> Frame:
    """Parse and validate one frame; `allowed` (e.g. `NODE_FRAMES`) refuses frames from the wrong side."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"malformed frame: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise FrameError("malformed frame: a frame must be a JSON object with a `type`")
    kind = raw.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FrameError(f"malformed frame: unknown or missing `type`; known: {', '.join(_BY_TYPE)}")
    if allowed is not None and cls not in allowed:
        expected = ", ".join(c.type for c in allowed)
        raise FrameError(f"unexpected `{cls.type}` frame on this side of the connection; expects {expected}")
    return _decode_fields(cls.type, _Fields(cls.type, raw))


def refusal_reason(body: bytes | bytearray | None) -> str:
    """`: message` from the error envelope of a refused upgrade (the gateway's own words, never a secret)."""
    try:
        message = orjson.loads(body or b"null")["error"]["message"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return ""
    return f": {message}" if isinstance(message, str) and message else ""
