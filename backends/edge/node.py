"""The edge node agent (`switchboard edge serve`): the local engine in an edge profile, dialling the gateway.

It loads the model once, builds the engine (int4 weights, small KV budget) with `backends.local.serving`,
measures one stream's decode rate, then keeps one WebSocket to `{gateway}/v1/edge/connect` open: `hello`,
`welcome`, a `heartbeat` every `heartbeat_s`, and each `request` run concurrently (the engine batches them)
with its text streamed back as `chunk`s and one `done` or `error`. A `cancel` or a dropped connection aborts
the engine request, freeing its KV blocks. After a drop it reconnects with full-jitter exponential backoff
(reset by each `welcome`); a refused token (HTTP 401/403 on the upgrade, or close 4401) stops it, exit code 2;
a 503 is retried. Token and frame text are never logged, websockets' DEBUG lines included (QuietWebSocketLog).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from importlib import metadata
from typing import Any, TypeVar

import orjson

from backends.base import Usage
from backends.edge import wire
from backends.edge.options import (
    TOKEN_ENV,
    Backoff,
    NodeOptions,
    QuietWebSocketLog,
    client_ssl_context,
    connect_url,
    untrusted_certificate,
)
from backends.local.build import one_compute_thread, stage
from backends.local.engine.engine import Finished, Tokens
from backends.local.engine.scheduler import SamplingParams
from backends.local.loader import LoadedModel, current_rss_mb, load_engine_model
from backends.local.serving import Done, EngineState, TextDelta, build_engine_state, due_within, start_chat
from backends.local.wire import ApiError, ChatCompletionBody, encode_chat, parse_json

__all__ = ["EXIT_OK", "EXIT_UNAUTHORIZED", "TOKEN_ENV", "NodeOptions", "main_node", "run_node"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNAUTHORIZED = 2
_MEASURE_PROMPT = [{"role": "user", "content": "Count from one to fifty in words."}]

Send = Callable[[wire.Frame], Awaitable[None]]


class Unauthorized(Exception):
    """The gateway refused the enrollment token; reconnecting cannot help."""


# ---- one connection ----------------------------------------------------------------------------------------


class Session:
    """One WebSocket to the gateway: hello/welcome, heartbeats, and the requests that arrive on it."""

    def __init__(self, node: EdgeNode, ws: Any) -> None:
        self._node = node
        self._ws = ws
        self._send_lock = asyncio.Lock()
        self._requests: dict[str, asyncio.Task[None]] = {}

    async def send(self, frame: wire.Frame) -> None:
        async with self._send_lock:
            await self._ws.send(wire.encode(frame))

    async def run(self, on_welcome: Callable[[], None]) -> None:
        """Enroll and serve until the connection closes (ConnectionClosed propagates)."""
        node = self._node
        await self.send(node.hello())
        async with asyncio.timeout(node.options.open_timeout_s):
            first = wire.decode(await self._ws.recv(), allowed=wire.GATEWAY_FRAMES)
        if not isinstance(first, wire.Welcome):
            raise wire.FrameError(f"expected `welcome` first, got `{first.type}`")
        on_welcome()
        every_s = first.heartbeat_s or node.options.heartbeat_s
        log.info("enrolled as %s (labels %s; heartbeat every %g s)", first.node_id, first.labels, every_s)
        heartbeats = asyncio.create_task(self._heartbeats(every_s))
        try:
            while True:
                self._handle(await self._ws.recv())
        finally:
            heartbeats.cancel()
            for task in self._requests.values():
                task.cancel()  # the gateway failed them already; free their KV blocks
            await asyncio.gather(heartbeats, *self._requests.values(), return_exceptions=True)

    def _handle(self, raw: str | bytes) -> None:
        try:
            frame = wire.decode(raw, allowed=wire.GATEWAY_FRAMES)
        except wire.FrameError as exc:
            log.warning("ignored a frame from the gateway: %s", exc)
            if (request_id := _request_id(raw)) is not None and request_id not in self._requests:
                refusal = wire.Error(request_id, 400, "bad_frame", str(exc))  # rather than a silent timeout
                self._track(request_id, self._send_quietly(refusal))
            return
        if isinstance(frame, wire.Request):
            if frame.id in self._requests:
                log.warning("ignored a duplicate request id %s", frame.id)
                return
            self._track(frame.id, self._serve(frame))
        elif isinstance(frame, wire.Cancel) and (running := self._requests.get(frame.id)) is not None:
            running.cancel()

    def _track(self, request_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._requests[request_id] = task
        task.add_done_callback(lambda _: self._requests.pop(request_id, None))

    async def _send_quietly(self, frame: wire.Frame) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            await self.send(frame)

    async def _heartbeats(self, every_s: float) -> None:
        while True:
            await self.send(self._node.heartbeat())
            await asyncio.sleep(every_s)

    async def _serve(self, request: wire.Request) -> None:
        from websockets.exceptions import ConnectionClosed

        limit = self._node.options.pending_limit
        try:
            if len(self._requests) > limit:  # this request is counted already
                raise ApiError(
                    503,
                    f"edge node holds its limit of {limit} requests (node: --max-pending)",
                    code="node_busy",
                )
            await self._node.generate(request, self.send)
            return
        except ApiError as exc:
            default = "invalid_request" if exc.status_code < 500 else "engine_error"
            error = wire.Error(request.id, exc.status_code, exc.code or default, exc.message)
        except ConnectionClosed:
            return
        except Exception:  # the top of one request: report it, keep serving the others
            log.exception("request %s failed", request.id)
            error = wire.Error(request.id, 500, "internal_error", "internal edge node error")
        await self._send_quietly(error)


# ---- the node ----------------------------------------------------------------------------------------------


class EdgeNode:
    """The engine plus what the node reports about it. `run` keeps a connection until `stop` is set."""

    def __init__(self, options: NodeOptions, state: EngineState, tokens_per_s: float) -> None:
        self.options = options
        self.state = state
        self.tokens_per_s = tokens_per_s  # startup measurement, then a moving average of served streams

    def hello(self) -> wire.Hello:
        return wire.Hello(
            node_id=self.options.node_id,
            models=self.state.served_names,
            labels=dict(self.options.labels),
            capacity=wire.Capacity(max_batch=self.options.max_batch, kv_cache_mb=self.options.kv_cache_mb),
            tokens_per_s=round(self.tokens_per_s, 2),
            usd_per_hour=self.options.usd_per_hour,
            version=_version(),
        )

    def heartbeat(self) -> wire.Heartbeat:
        stats = self.state.engine.stats()
        used = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        return wire.Heartbeat(
            in_flight=stats.running,
            queue_depth=stats.waiting,
            kv_used_frac=min(1.0, max(0.0, used)),
            tokens_per_s=round(self.tokens_per_s, 2),
        )

    async def generate(self, request: wire.Request, send: Send) -> None:
        """Run one request on the engine, sending `chunk`s then `done`; bad input raises ApiError."""
        gen = start_chat(self.state, _chat_body(request), due_within(request.deadline_ms))
        first_token_s: float | None = None
        try:
            async for item in gen.texts():
                if isinstance(item, TextDelta):
                    first_token_s = first_token_s or time.perf_counter()
                    await send(wire.Chunk(request.id, item.text))
                else:
                    self._observe(item, first_token_s)
                    usage = Usage(item.prompt_tokens, item.completion_tokens)
                    await send(wire.Done(request.id, str(item.finish_reason), usage))
        finally:
            gen.close()  # a cancel or a drop aborts the engine request, freeing its KV blocks

    def _observe(self, done: Done, first_token_s: float | None) -> None:
        if first_token_s is None or done.completion_tokens < 8:
            return
        rate = (done.completion_tokens - 1) / max(time.perf_counter() - first_token_s, 1e-6)
        self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * rate if self.tokens_per_s else rate

    async def run(self, stop: asyncio.Event, *, rng: random.Random | None = None) -> int:
        """Connect, serve, reconnect after drops; EXIT_UNAUTHORIZED when the token is refused."""
        url = connect_url(self.options.gateway_url)
        backoff = Backoff(self.options.backoff_base_s, self.options.backoff_cap_s, rng or random.Random())
        while not stop.is_set():
            try:
                await _until_stopped(self._connect_once(url, backoff.reset), stop)
            except Unauthorized as exc:
                log.error(
                    "the gateway refused the enrollment token (%s); not reconnecting. Fix: pass a valid "
                    "token with --token or %s (create one with `switchboard edge token create`)",
                    exc,
                    TOKEN_ENV,
                )
                return EXIT_UNAUTHORIZED
            if stop.is_set():
                break
            delay_s = backoff.next_delay_s()
            log.info("reconnecting to %s in %.1f s", url, delay_s)
            await _until_stopped(asyncio.sleep(delay_s), stop)
        return EXIT_OK

    async def _connect_once(self, url: str, on_welcome: Callable[[], None]) -> None:
        """One connection attempt and session; returns after any drop, raises Unauthorized on 4401/401."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        headers = {"Authorization": f"Bearer {self.options.token}"}
        tls = client_ssl_context(url, self.options.ca_file)
        try:
            async with connect(
                url,
                additional_headers=headers,
                ssl=tls,  # None for ws://
                open_timeout=self.options.open_timeout_s,
                compression=None,  # small token frames: deflate costs more latency than it saves bytes
                max_size=8 * 2**20,
                logger=QuietWebSocketLog(),  # its DEBUG lines would hold the token and prompt text
            ) as ws:
                try:
                    await Session(self, ws).run(on_welcome)
                except ConnectionClosed:
                    pass
                except (wire.FrameError, TimeoutError) as exc:
                    log.warning("closing the connection: %s", exc)
                    await ws.close(wire.CloseCode.BAD_HELLO, "protocol error")
                except asyncio.CancelledError:
                    await asyncio.shield(ws.close(wire.CloseCode.GOING_AWAY, "node shutting down"))
                    raise
                code, reason = ws.close_code, ws.close_reason
        except InvalidStatus as exc:
            status, why = exc.response.status_code, wire.refusal_reason(exc.response.body)
            if status in (401, 403):
                raise Unauthorized(f"HTTP {status}{why}") from None
            log.warning("the gateway refused the connection: HTTP %d%s", status, why)
            return
        except ssl.SSLCertVerificationError as exc:
            log.error("%s", untrusted_certificate(url, self.options.ca_file, exc))
            return
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.warning("cannot reach the gateway at %s: %s", url, exc or type(exc).__name__)
            return
        if code == wire.CloseCode.UNAUTHORIZED:
            raise Unauthorized(f"close {code}: {reason}" if reason else f"close {code}")
        log.warning("connection to the gateway closed (code %s%s)", code, f": {reason}" if reason else "")


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Await `work` unless `stop` is set first (then cancel it); exceptions of `work` propagate."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc


def _request_id(raw: str | bytes) -> str | None:
    """The id of a `request` frame that failed validation, when it has a usable one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and data.get("type") == "request" and isinstance(data.get("id"), str):
        return data["id"] or None
    return None


def _chat_body(request: wire.Request) -> ChatCompletionBody:
    """The engine server's own body model, so both take and refuse exactly the same requests."""
    fields: dict[str, Any] = {"model": request.model, "messages": list(request.messages)}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if (value := getattr(request, name)) is not None:
            fields[name] = value
    if request.stop:
        fields["stop"] = list(request.stop)
    return parse_json(orjson.dumps(fields), ChatCompletionBody)


def _version() -> str:
    try:
        return metadata.version("switchboard")
    except metadata.PackageNotFoundError:
        return "unknown"


async def measure_tokens_per_s(state: EngineState, max_tokens: int) -> float:
    """Decode rate of one greedy stream (first token excluded, so prefill is not counted); 0 if too short."""
    if max_tokens < 2:
        return 0.0
    prompt_ids = encode_chat(state.loaded.tokenizer, _MEASURE_PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    handle = state.engine.submit(prompt_ids, params)
    first_s: float | None = None
    tokens = 0
    async for event in handle.events():
        if isinstance(event, Tokens):
            first_s = first_s or time.perf_counter()
            tokens += len(event.token_ids)
        elif not isinstance(event, Finished):
            log.warning("tokens/s measurement failed: %s", event.message)
            return 0.0
    elapsed_s = time.perf_counter() - first_s if first_s is not None else 0.0
    return (tokens - 1) / elapsed_s if tokens > 1 and elapsed_s > 0 else 0.0


T = TypeVar("T")


def _on_one_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on this worker thread with one torch compute thread (see `build.one_compute_thread`)."""
    one_compute_thread()
    return fn(*args, **kwargs)


async def run_node(
    options: NodeOptions, *, stop: asyncio.Event | None = None, loaded: LoadedModel | None = None
) -> int:
    """Load (unless `loaded` is given), start the engine, measure, and serve until `stop`; the exit code."""
    stop = stop or asyncio.Event()
    started_s = time.perf_counter()
    engine_options = options.engine_options()
    if loaded is None:
        with stage(f"load {options.model}"):
            loaded = await asyncio.to_thread(_on_one_thread, load_engine_model, options.model)
        engine_options = replace(engine_options, release_source=True)
    names = dict.fromkeys((options.served_name, loaded.name))
    state = await asyncio.to_thread(
        _on_one_thread, build_engine_state, loaded, engine_options,
        served_names=names, default_max_tokens=options.max_tokens_default,
    )  # fmt: skip
    state.engine.start()
    try:
        tokens_per_s = await measure_tokens_per_s(state, options.measure_tokens)
        log.info(
            "edge node %s ready: %s (%s, %s, quant %s, KV %g MB), %.1f tok/s, load %.1f s, RSS %.0f MB",
            options.node_id,
            loaded.name,
            ", ".join(names),
            state.config.get("dtype", "?"),
            state.config.get("quant", options.quant),
            options.kv_cache_mb,
            tokens_per_s,
            time.perf_counter() - started_s,
            current_rss_mb(),
        )
        return await EdgeNode(options, state, tokens_per_s).run(stop)
    finally:
        await asyncio.to_thread(state.engine.stop)


def main_node(options: NodeOptions) -> int:
    """Blocking entry point for the CLI: run until SIGINT/SIGTERM; returns the process exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_node(options, stop=stop)

    return asyncio.run(main())
