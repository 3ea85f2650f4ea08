"""`OpenAICompatBackend` (kind `openai`): any OpenAI-compatible server (vLLM, llama.cpp, Ollama, our engine).

Chat, embeddings and token-count requests go as `httpx.Request`s straight to a pooled keep-alive
`FastTransport` (backends/http11.py); bodies built and parsed with orjson (embeddings: embedding_wire.py,
vLLM's `/tokenize`: tokenize_wire.py).
Invariant: only `BackendError`s leave this module, and every httpx failure / upstream status is mapped
in one place, `_translate_errors`. Error messages carry upstream's error text, never the request body.
`timeout_s` bounds each wait on the upstream (connect excluded), not the whole answer; the gateway's
dispatch owns the per-attempt deadline.
A request's deadline (its team's SLO) goes as header `x-switchboard-deadline-ms`, which the bundled engine
queues by and other servers ignore; with `send_priority` (a vLLM started with `--scheduling-policy
priority`), also as vLLM's `priority` body field: when its first token is due, in ms since the epoch
(`DEFAULT_DEADLINE_MS` without one; batch work `BATCH_PRIORITY_LATER_MS` later), lower served first, so
vLLM serves the earliest deadline first too and, when it must preempt, batch work first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import orjson

from backends.base import (
    DEADLINE_HEADER,
    DEADLINE_RANGE_MS,
    DEFAULT_DEADLINE_MS,
    PRIORITY_HEADER,
    BackendHealth,
    BackendInfo,
    BackendKind,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    StreamChunk,
    Usage,
)
from backends.embedding_wire import embeddings_body, parse_embeddings
from backends.errors import (
    BackendBadResponse,
    BackendError,
    BackendMisconfigured,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    rejected_message,
)
from backends.http11 import FastTransport
from backends.sse_wire import (
    ERROR_TEXT_MAX_CHARS,
    StreamEvents,
    body_pieces,
    estimate_prompt_tokens,
    usage_of,
)
from backends.tokenize_wire import TokenizeEndpoint, parse_count

_STREAM_OPTIONS = {"include_usage": True}
# Batch work's vLLM priority: this much later than interactive work due at the same time, the longest
# deadline the gateway sends (a day), so behind any interactive one.
BATCH_PRIORITY_LATER_MS = DEADLINE_RANGE_MS[1]


class OpenAICompatBackend:
    """Talks `POST {base_url}/chat/completions`, `POST {base_url}/embeddings` and `GET {base_url}/models`;
    `base_url` ends in `/v1`. A request with a raw `prompt` (legacy completions) goes to
    `POST {base_url}/completions` as it is. Token counts ask `POST /tokenize` at the server's root."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        api_key: str | None,
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
        supports_tools: bool,
        supports_response_format: bool,
        send_priority: bool = False,
    ) -> None:
        self._info = BackendInfo(
            name=name,
            kind=BackendKind.OPENAI,
            supports_tools=supports_tools,
            supports_response_format=supports_response_format,
        )
        base = base_url.rstrip("/")
        self._chat_url = httpx.URL(base + "/chat/completions")  # parsed once, not per request
        self._completions_url = httpx.URL(base + "/completions")
        self._embeddings_url = httpx.URL(base + "/embeddings")
        self._models_url = base + "/models"
        self._timeout_s = timeout_s
        self._send_priority = send_priority
        self._connect_timeout_s = connect_timeout_s
        self._timeouts = httpx.Timeout(timeout_s, connect=connect_timeout_s).as_dict()
        headers = {"content-type": "application/json", "accept": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._headers = httpx.Headers(headers)
        self._batch_headers = httpx.Headers({**headers, PRIORITY_HEADER: "batch"})
        # (batch, deadline) -> headers: a request's deadline is its team's SLO, so there are few of them
        self._deadline_headers: dict[tuple[bool, float], httpx.Headers] = {}
        self._tokenize = TokenizeEndpoint(base, self._headers, timeout_s, connect_timeout_s)
        self._transport = FastTransport(max_connections=max_connections)
        self._client = httpx.AsyncClient(  # for the cold paths; chat goes to the transport directly
            transport=self._transport,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            trust_env=False,  # no proxies from the environment between us and a local server
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def complete(self, request: ChatRequest) -> ChatResult:
        upstream = self._chat_post(request, stream=False)
        return _parse_result(self._info.name, await self._exchange(upstream), request)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        upstream = self._post(self._embeddings_url, embeddings_body(request), request)
        return parse_embeddings(self._info.name, await self._exchange(upstream), request)

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """The server's own count (vLLM's `/tokenize`). None when it has no such endpoint (a 404 or 405,
        remembered per model so it is not asked again) or cannot count now (unreachable, slow, a 5xx)."""
        upstream = self._tokenize.request(request)
        if upstream is None:
            return None
        try:
            response = await self._read(upstream)
            if self._tokenize.missing(request.model, response.status_code):
                return None
            with _translate_errors(self._info.name, mid_stream=False):
                response.raise_for_status()
        except (BackendUnavailable, BackendTimeout):
            return None
        return parse_count(self._info.name, response.content)

    async def _exchange(self, upstream: httpx.Request) -> bytes:
        """A whole response's body; errors (statuses included) as BackendErrors."""
        response = await self._read(upstream)
        with _translate_errors(self._info.name, mid_stream=False):
            response.raise_for_status()
        return response.content

    async def _read(self, upstream: httpx.Request) -> httpx.Response:
        """A whole response, whatever its status; transport failures as BackendErrors."""
        with _translate_errors(self._info.name, mid_stream=False):
            response = await self._transport.handle_async_request(upstream)
            try:
                await response.aread()
            finally:
                await response.aclose()  # aread closes only on success; a failed read must free the socket
        return response

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        upstream = self._chat_post(request, stream=True)
        name = self._info.name
        with _translate_errors(name, mid_stream=False):
            response = await self._transport.handle_async_request(upstream)
        try:
            if response.status_code >= 400:
                with _translate_errors(name, mid_stream=False):
                    await response.aread()
                    response.raise_for_status()
            # One generator layer per chunk: every event of a network read is parsed at once, here.
            events = StreamEvents(name, request)
            with _translate_errors(name, mid_stream=True):
                async for piece in body_pieces(response):
                    for chunk in events.feed(piece):
                        yield chunk
                    if events.done:
                        break
                for chunk in events.end():
                    yield chunk
        finally:
            await response.aclose()

    async def health(self) -> BackendHealth:
        try:
            with _translate_errors(self._info.name, mid_stream=False):
                response = await self._client.get(self._models_url, timeout=min(self._timeout_s, 10.0))
                response.raise_for_status()
        except BackendError as exc:
            return BackendHealth(ok=False, detail=f"{type(exc).__name__}: {exc.message}")
        return BackendHealth(ok=True, detail=f"GET {self._models_url} -> {response.status_code}")

    async def aclose(self) -> None:
        await self._client.aclose()  # closes the transport and every pooled connection

    def _chat_post(self, request: ChatRequest, *, stream: bool) -> httpx.Request:
        """The upstream request for a chat call (or a raw prompt's completion), streamed or not."""
        url = self._chat_url if request.prompt is None else self._completions_url
        body = _request_body(request, stream=stream, priority=self._priority(request))
        return self._post(url, body, request)

    def _post(self, url: httpx.URL, body: bytes, request: ChatRequest | EmbeddingRequest) -> httpx.Request:
        """One `httpx.Request` straight for the transport. httpx's client layer (auth flow, cookies, event
        hooks) and `Request(content=...)` (which re-normalises every header) cost more than the exchange
        itself here; `FastTransport` writes Host and Content-Length for a `stream=` body on the wire."""
        headers = self._headers
        if isinstance(request, ChatRequest):
            headers = self._batch_headers if request.batch else headers
            if request.deadline_ms is not None:  # the engine's queue order (EDF); other servers ignore it
                headers = self._with_deadline(headers, request.batch, request.deadline_ms)
        return httpx.Request(
            "POST",
            url,
            headers=headers,
            stream=httpx.ByteStream(body),
            extensions={"timeout": self._timeouts_for(request)},
        )

    def _priority(self, request: ChatRequest) -> int | None:
        """vLLM's `priority` for `request` with `send_priority` (when its first token is due), else None."""
        if not self._send_priority:
            return None
        wanted = DEFAULT_DEADLINE_MS if request.deadline_ms is None else request.deadline_ms
        later = BATCH_PRIORITY_LATER_MS if request.batch else 0.0
        return int(time.time() * 1000 + wanted + later)

    def _with_deadline(self, headers: httpx.Headers, batch: bool, deadline_ms: float) -> httpx.Headers:
        key = (batch, deadline_ms)
        found = self._deadline_headers.get(key)
        if found is None:
            found = self._deadline_headers[key] = httpx.Headers(headers)
            found[DEADLINE_HEADER] = f"{deadline_ms:.0f}"
        return found

    def _timeouts_for(self, request: ChatRequest | EmbeddingRequest) -> dict[str, float | None]:
        """The backend's timeouts unless the request asks for less (no object churn in the common case)."""
        if request.timeout_s >= self._timeout_s:
            return self._timeouts
        return httpx.Timeout(
            request.timeout_s, connect=min(self._connect_timeout_s, request.timeout_s)
        ).as_dict()


# ---- errors: the one place httpx failures and upstream statuses become BackendErrors -----------------------


@contextlib.contextmanager
def _translate_errors(name: str, *, mid_stream: bool) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPStatusError as exc:
        raise _status_error(name, exc.response) from exc
    except httpx.TimeoutException as exc:
        raise BackendTimeout(f"backend `{name}` timed out ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if mid_stream or isinstance(exc, httpx.RemoteProtocolError | httpx.DecodingError):
            raise BackendBadResponse(f"backend `{name}` cut the response", detail=detail) from exc
        raise BackendUnavailable(f"backend `{name}` unreachable", detail=detail) from exc
    except httpx.HTTPError as exc:  # e.g. an invalid URL in config
        raise BackendMisconfigured(
            f"backend `{name}` request failed (config: backends.{name})",
            detail=f"{type(exc).__name__}: {exc}",
        ) from exc


def _status_error(name: str, response: httpx.Response) -> BackendError:
    status = response.status_code
    said, detail = f"backend `{name}` answered {status}", _upstream_message(response)
    if status == 429:
        retry_after_s = _retry_after_s(response.headers.get("retry-after"))
        return BackendRateLimited(said, retry_after_s=retry_after_s, detail=detail)
    if status in (401, 403):
        return BackendMisconfigured(f"{said} (check the key: backends.{name}.api_key_env)", detail=detail)
    if status >= 500:
        return BackendUnavailable(said, detail=detail)
    return BackendRejected(rejected_message(said, detail), detail=detail)


def _upstream_message(response: httpx.Response) -> str:
    """Upstream's own error text ({"error": {"message"}} or {"error": "..."} or plain text), truncated."""
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:ERROR_TEXT_MAX_CHARS] or response.reason_phrase
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message)[:ERROR_TEXT_MAX_CHARS]


def _retry_after_s(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare upstream, and the caller falls back to its own backoff


# ---- wire ---------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _request_body(request: ChatRequest, *, stream: bool, priority: int | None = None) -> bytes:
    body: dict[str, Any] = {"model": request.model}
    if request.prompt is None:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = request.stop
    if request.seed is not None:
        body["seed"] = request.seed
    if request.user is not None:
        body["user"] = request.user
    if request.tools is not None:
        body["tools"] = request.tools
    if request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    if request.response_format is not None:
        body["response_format"] = request.response_format
    if priority is not None:
        body["priority"] = priority
    if stream:
        body["stream"] = True
        body["stream_options"] = _STREAM_OPTIONS
    return orjson.dumps(body, default=_json_default)


def _parse_result(name: str, content: bytes, request: ChatRequest) -> ChatResult:
    try:
        payload = orjson.loads(content)
        choice = payload["choices"][0]
        message = choice["message"] if "message" in choice else _text_message(choice["text"])
        usage = usage_of(payload.get("usage"))
        if usage is None:
            text = message.get("content") or ""
            usage = Usage(estimate_prompt_tokens(request), (len(text) + 3) // 4)
        return ChatResult(
            message=message,
            finish_reason=choice.get("finish_reason") or "stop",
            usage=usage,
            served_model=str(payload.get("model") or request.model),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BackendBadResponse(f"backend `{name}` sent an unreadable completion", detail=repr(exc)) from exc


def _text_message(text: Any) -> dict[str, Any]:
    """A text completion's choice as the assistant message the pipeline carries."""
    if not isinstance(text, str):
        raise TypeError("choice text is not a string")
    return {"role": "assistant", "content": text}
