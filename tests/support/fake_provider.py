"""A loopback fake cloud provider speaking the OpenAI and Anthropic wire protocols (tests and benchmarks).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /v1/messages,
POST /v1/embeddings (any path ending in those works), POST /_control (set knobs for one model or the
default), POST /_reset, GET /_requests?model=... .
Knobs are per model name so parallel tests do not collide. The hot path is a raw ASGI callable returning
orjson bytes: no framework, no validation. Run it alone with
`python -m tests.support.fake_provider --host 127.0.0.1 --port 9100 --ttft-ms 20`, or in-process with
`FakeProvider` (uvicorn in a background thread on a free port).

Tool calls (knobs, per model): `tool_calls=(("get_weather", '{"city":"Paris"}'), ...)` answers every request
that offers `tools` with those calls, in OpenAI (`call_...` ids, finish_reason `tool_calls`) or Anthropic
(`tool_use` blocks, `toolu_...` ids, stop_reason `tool_use`) shape; several pairs are parallel calls.
Arguments are raw text sent as given: script text that is not JSON for a malformed call. Streams send each
call's arguments in `tool_arg_pieces` pieces (OpenAI: a first delta with id, name and "" arguments;
Anthropic: `input_json_delta`s); `tool_interleave` alternates parallel calls' OpenAI deltas, and
`tool_with_finish` sends them whole in the finish_reason chunk instead; `tool_text` is said before the
calls. A request ending in tool results (`role: tool`, or `tool_result` blocks) gets "saw <call id>=<digest>
..." (`fake_tools.digest`: SHA-256 of the result text, 12 hex digits), proving the result came back.
`FakeProvider.sent_tool_calls(model)` lists the calls each answer carried.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qs

import orjson
import uvicorn

from tests.support import fake_tools, fake_wire

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Knobs:
    """How it behaves for one model. `fail_times=None` and `fail_every=None` fail all requests while
    `fail_status` is set."""

    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0  # 0 = no delay between tokens
    n_tokens: int = 8
    fail_status: int | None = None  # e.g. 429, 500, 401
    fail_times: int | None = None  # fail only the next N requests, then answer normally
    fail_every: int | None = None  # with fail_status: fail one request in N (the Nth, 2Nth, ...) forever
    retry_after_s: float = 1.0  # sent as Retry-After with 429
    hang: bool = False  # never answer; wait until the client disconnects
    cut_after_chunks: int | None = None  # streams: close the connection after k SSE events
    bad_json: bool = False  # answer 200 with a body (or an SSE event) that is not JSON
    models: tuple[str, ...] = ("fake-model",)  # listed by GET /v1/models (default knobs only)
    tool_calls: tuple[tuple[str, str], ...] = ()  # (name, raw arguments) answered when a request has tools
    tool_arg_pieces: int = 3  # streams: each call's arguments go out in this many pieces
    tool_interleave: bool = False  # OpenAI streams: parallel calls' deltas take turns
    tool_with_finish: bool = False  # OpenAI streams: the calls come whole in the finish_reason chunk
    tool_text: str = ""  # said before the tool calls (content beside tool_calls; an Anthropic text block)


_KNOB_NAMES = frozenset(f.name for f in fields(Knobs))
_CUT_MESSAGE = "ASGI callable returned without completing response."


class FakeProviderApp:
    """The ASGI app. All state lives on the instance; `configure`/`requests`/`reset` are thread-safe enough
    for tests (single dict operations under the GIL)."""

    def __init__(self, default: Knobs | None = None, *, max_recorded: int = 1000) -> None:
        self._default = default or Knobs()
        self._knobs: dict[str, Knobs] = {}
        self._failed: dict[str, int] = {}
        self._recorded: dict[str, deque[tuple[str, list[tuple[bytes, bytes]], Any]]] = {}
        self._sent_calls: dict[str, deque[tuple[fake_tools.ToolCall, ...]]] = {}
        self._max_recorded = max_recorded
        self._answers = 0  # numbers each answer, so its tool call ids are unique

    # ---- control -----------------------------------------------------------------------------------------

    def configure(self, model: str | None = None, **knobs: Any) -> Knobs:
        unknown = set(knobs) - _KNOB_NAMES
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}; known: {sorted(_KNOB_NAMES)}")
        if "models" in knobs:
            knobs["models"] = tuple(knobs["models"])
        if "tool_calls" in knobs:
            knobs["tool_calls"] = tuple((str(name), str(args)) for name, args in knobs["tool_calls"])
        if model is None:
            self._default = replace(self._default, **knobs)
            return self._default
        self._knobs[model] = replace(self._knobs.get(model, self._default), **knobs)
        self._failed.pop(model, None)
        return self._knobs[model]

    def forget(self, model: str) -> None:
        """Back to the default knobs for `model` (knobs otherwise persist from test to test)."""
        self._knobs.pop(model, None)
        self._failed.pop(model, None)

    def requests(self, model: str) -> list[dict[str, Any]]:
        """Every recorded request for `model`: {"path", "headers", "body"}, oldest first."""
        return [
            {"path": path, "headers": {k.decode(): v.decode() for k, v in headers}, "body": body}
            for path, headers, body in self._recorded.get(model, ())
        ]

    def sent_tool_calls(self, model: str) -> list[list[dict[str, str]]]:
        """The tool calls of every answer for `model` that had some: [[{"id", "name", "arguments"}]]."""
        return [[asdict(call) for call in calls] for calls in self._sent_calls.get(model, ())]

    def reset(self) -> None:
        self._default = Knobs()
        self._knobs.clear()
        self._failed.clear()
        self._recorded.clear()
        self._sent_calls.clear()

    # ---- ASGI --------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] == "GET":
            await self._get(path, scope, send)
            return
        raw = await _read_body(receive)
        if path.endswith("/chat/completions"):
            await self._chat(scope, raw, receive, send, anthropic=False)
        elif path.endswith("/messages"):
            await self._chat(scope, raw, receive, send, anthropic=True)
        elif path.endswith("/completions"):
            await self._text_completion(scope, raw, send)
        elif path.endswith("/embeddings"):
            await self._embeddings(scope, raw, send)
        elif path == "/_control":
            body = orjson.loads(raw or b"{}")
            knobs = self.configure(body.pop("model", None), **body)
            await _send_bytes(send, 200, orjson.dumps(asdict(knobs)))
        elif path == "/_reset":
            self.reset()
            await _send_bytes(send, 200, b"{}")
        else:
            await _send_bytes(send, 404, fake_wire.openai_error(404, f"no route {path}"))

    async def _get(self, path: str, scope: Scope, send: Send) -> None:
        if path.endswith("/models"):
            await _send_bytes(send, 200, fake_wire.openai_models(self._default.models))
        elif path == "/_requests":
            query = parse_qs(scope.get("query_string", b"").decode())
            model = query.get("model", [""])[0]
            await _send_bytes(send, 200, orjson.dumps(self.requests(model)))
        else:
            await _send_bytes(send, 404, fake_wire.openai_error(404, f"no route {path}"))

    def _knobs_for(self, model: str) -> Knobs:
        return self._knobs.get(model, self._default)

    def _should_fail(self, model: str, knobs: Knobs) -> bool:
        if knobs.fail_status is None:
            return False
        if knobs.fail_every is not None:
            seen = self._failed.get(model, 0) + 1
            self._failed[model] = seen
            return seen % knobs.fail_every == 0
        if knobs.fail_times is None:
            return True
        done = self._failed.get(model, 0)
        self._failed[model] = done + 1
        return done < knobs.fail_times

    def _record(self, model: str, path: str, headers: list[tuple[bytes, bytes]], body: Any) -> None:
        log = self._recorded.get(model)
        if log is None:
            log = self._recorded[model] = deque(maxlen=self._max_recorded)
        log.append((path, headers, body))

    async def _chat(self, scope: Scope, raw: bytes, receive: Receive, send: Send, *, anthropic: bool) -> None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _send_bytes(send, 400, fake_wire.openai_error(400, "body is not JSON"))
            return
        model = str(body.get("model", ""))
        self._record(model, scope["path"], scope["headers"], body)
        knobs = self._knobs_for(model)
        if knobs.hang:
            await _wait_for_disconnect(receive)
            return
        if self._should_fail(model, knobs):
            await _send_failure(send, knobs, anthropic=anthropic)
            return
        if knobs.bad_json:
            await _send_garbage(send, stream=bool(body.get("stream")))
            return
        self._answers += 1
        answer = fake_wire.make_answer(
            body,
            knobs.n_tokens,
            tool_calls=knobs.tool_calls,
            tool_text=knobs.tool_text,
            id_prefix="toolu_" if anthropic else "call_",
            nonce=f"{model}:{self._answers}",
        )
        if answer.tool_calls:
            sent = self._sent_calls.setdefault(model, deque(maxlen=self._max_recorded))
            sent.append(answer.tool_calls)
        created_s = int(time.time())
        if not body.get("stream"):
            await _sleep_ms(knobs.ttft_ms + _itl_ms(knobs) * max(0, len(answer.pieces) - 1))
            if anthropic:
                payload = fake_wire.anthropic_message(model, answer)
            else:
                payload = fake_wire.openai_completion(model, answer, created_s)
            await _send_bytes(send, 200, payload)
            return
        if anthropic:
            events = fake_wire.anthropic_stream_events(model, answer, arg_pieces=knobs.tool_arg_pieces)
        else:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = fake_wire.openai_stream_events(
                model,
                answer,
                created_s,
                include_usage,
                arg_pieces=knobs.tool_arg_pieces,
                interleave=knobs.tool_interleave,
                calls_with_finish=knobs.tool_with_finish,
            )
        await _send_stream(send, events, knobs)

    # ---- legacy text completions (POST .../completions) ---------------------------------------------

    async def _text_completion(self, scope: Scope, raw: bytes, send: Send) -> None:
        """The prompt is answered as a one-message chat would be; knobs: fail_status and n_tokens."""
        body = orjson.loads(raw)
        model = str(body.get("model", ""))
        self._record(model, scope["path"], scope["headers"], body)
        knobs = self._knobs_for(model)
        if self._should_fail(model, knobs):
            await _send_failure(send, knobs, anthropic=False)
            return
        as_chat = {**body, "messages": [{"role": "user", "content": body.get("prompt")}]}
        answer = fake_wire.make_answer(as_chat, knobs.n_tokens)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = fake_wire.text_stream_events(model, answer, int(time.time()), include_usage)
            await _send_stream(send, events, knobs)
        else:
            await _send_bytes(send, 200, fake_wire.text_completion(model, answer, int(time.time())))

    # ---- embeddings ---------------------------------------------------------------------------------

    async def _embeddings(self, scope: Scope, raw: bytes, send: Send) -> None:
        """Recorded like chat; `fail_status`/`fail_times` knobs apply; vectors from fake_wire."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _send_bytes(send, 400, fake_wire.openai_error(400, "body is not JSON"))
            return
        model = str(body.get("model", ""))
        self._record(model, scope["path"], scope["headers"], body)
        knobs = self._knobs_for(model)
        if self._should_fail(model, knobs):
            await _send_failure(send, knobs, anthropic=False)
            return
        await _send_bytes(send, 200, fake_wire.openai_embeddings(body))


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        continue


async def _sleep_ms(delay_ms: float) -> None:
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)


def _itl_ms(knobs: Knobs) -> float:
    return 1000.0 / knobs.tokens_per_s if knobs.tokens_per_s > 0 else 0.0


async def _send_bytes(
    send: Send, status: int, payload: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _send_failure(send: Send, knobs: Knobs, *, anthropic: bool) -> None:
    status = knobs.fail_status or 500
    message = f"fake provider failing with {status} as configured"
    payload = (
        fake_wire.anthropic_error(status, message) if anthropic else fake_wire.openai_error(status, message)
    )
    extra = ((b"retry-after", b"%g" % knobs.retry_after_s),) if status == 429 else ()
    await _send_bytes(send, status, payload, extra)


async def _send_garbage(send: Send, *, stream: bool) -> None:
    if not stream:
        await _send_bytes(send, 200, b'{"choices": [tru')
        return
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"data: {not json}\n\ndata: [DONE]\n\n"})


async def _send_stream(send: Send, events: list[bytes], knobs: Knobs) -> None:
    """Headers and the first event at once, then the rest after ttft, spaced by the inter-token delay.
    A cut returns without finishing the response, which makes uvicorn close the connection mid-body."""
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if knobs.cut_after_chunks is not None:
        events = events[: knobs.cut_after_chunks]
    await send({"type": "http.response.body", "body": events[0] if events else b"", "more_body": True})
    await _sleep_ms(knobs.ttft_ms)
    itl_ms = _itl_ms(knobs)
    if itl_ms == 0:
        await send({"type": "http.response.body", "body": b"".join(events[1:]), "more_body": True})
    else:
        for i, event in enumerate(events[1:]):
            if i:
                await _sleep_ms(itl_ms)
            await send({"type": "http.response.body", "body": event, "more_body": True})
    if knobs.cut_after_chunks is None:
        await send({"type": "http.response.body", "body": b""})


class _DropCutLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _CUT_MESSAGE


class FakeProvider:
    """Runs `FakeProviderApp` with uvicorn in a daemon thread on a free loopback port.

    Use as a context manager (or `start()`/`stop()`). `base_url` is the root ("http://127.0.0.1:PORT");
    OpenAI clients want `openai_base_url` (root + "/v1").
    """

    def __init__(
        self, default: Knobs | None = None, *, host: str = "127.0.0.1", max_recorded: int = 1000
    ) -> None:
        self.app = FakeProviderApp(default, max_recorded=max_recorded)
        self._host = host
        self._port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._filter = _DropCutLogs()

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    def configure(self, model: str | None = None, **knobs: Any) -> Knobs:
        return self.app.configure(model, **knobs)

    def forget(self, model: str) -> None:
        self.app.forget(model)

    def requests(self, model: str) -> list[dict[str, Any]]:
        """Bodies of every request received for `model`, oldest first."""
        return [entry["body"] for entry in self.app.requests(model)]

    def received(self, model: str) -> list[dict[str, Any]]:
        """Like `requests` but with path and headers: {"path", "headers", "body"}."""
        return self.app.requests(model)

    def sent_tool_calls(self, model: str) -> list[list[dict[str, str]]]:
        """The tool calls each answer for `model` carried, oldest first: [[{"id", "name", "arguments"}]]."""
        return self.app.sent_tool_calls(model)

    def reset(self) -> None:
        self.app.reset()

    def start(self, timeout_s: float = 10.0) -> FakeProvider:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            http="httptools",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        logging.getLogger("uvicorn.error").addFilter(self._filter)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"fake provider did not start on {self.base_url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        logging.getLogger("uvicorn.error").removeFilter(self._filter)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    parser.add_argument("--n-tokens", type=int, default=8)
    parser.add_argument("--max-recorded", type=int, default=1000, help="requests kept per model")
    args = parser.parse_args(argv)
    default = Knobs(ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, n_tokens=args.n_tokens)
    app = FakeProviderApp(default, max_recorded=args.max_recorded)
    logging.getLogger("uvicorn.error").addFilter(_DropCutLogs())
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        lifespan="off",
        access_log=False,
        http="httptools",
        log_level="warning",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
