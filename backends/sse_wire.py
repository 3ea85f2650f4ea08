"""The OpenAI chat wire, read side: an SSE body's events as `StreamChunk`s, usage, and the prompt estimate.

`StreamEvents.feed` parses every event of one network read in a plain (not async) loop, so that a streamed
answer crosses one async-generator layer per chunk in the backend (`OpenAICompatBackend.stream`).
Invariant: whatever upstream sends, only `BackendBadResponse` leaves here, never the body's text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import orjson

from backends.base import ChatRequest, StreamChunk, Usage
from backends.errors import BackendBadResponse

ERROR_TEXT_MAX_CHARS = 500


def body_pieces(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as read from the socket: straight from the transport's stream (httpx's `aiter_bytes` adds
    two generator layers per read) unless a content-encoding must be decoded."""
    stream = response.stream
    if "content-encoding" not in response.headers and isinstance(stream, httpx.AsyncByteStream):
        return stream.__aiter__()
    return response.aiter_bytes()


class StreamEvents:
    """An SSE body's `data:` payloads (other fields, such as event:, id: and comments, are ignored) turned
    into StreamChunks. Passes deltas through; holds back the finishing chunk so that the last one yielded
    carries usage. An error stops the parse; the chunks before it still go out first."""

    __slots__ = (
        "_buffer", "_name", "_request", "done", "_finish_reason", "_last_delta", "_usage", "_served_model",
        "_n_deltas",
    )  # fmt: skip

    def __init__(self, name: str, request: ChatRequest) -> None:
        self._buffer = b""
        self._name, self._request = name, request
        self.done = False  # `[DONE]` seen, or an error
        self._finish_reason: str | None = None
        self._last_delta: Mapping[str, Any] = {}
        self._usage: Usage | None = None
        self._served_model = request.model
        self._n_deltas = 0

    def feed(self, piece: bytes) -> Iterator[StreamChunk]:
        lines = (self._buffer + piece).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                chunk = self._event(line[5:].strip())
                if chunk is not None:
                    yield chunk
                elif self.done:
                    return

    def end(self) -> Iterator[StreamChunk]:
        buffer, self._buffer = self._buffer, b""
        if not self.done and buffer.startswith(b"data:"):
            chunk = self._event(buffer[5:].strip())
            if chunk is not None:
                yield chunk
        if self._finish_reason is None:
            raise BackendBadResponse(f"backend `{self._name}` ended the stream before a finish_reason")
        usage = self._usage
        if usage is None:
            usage = Usage(estimate_prompt_tokens(self._request), self._n_deltas + bool(self._last_delta))
        yield StreamChunk(
            delta=self._last_delta,
            finish_reason=self._finish_reason,
            usage=usage,
            served_model=self._served_model,
        )

    def _event(self, data: bytes) -> StreamChunk | None:
        """The chunk to pass on now, if any; `[DONE]` sets `done`."""
        if data == b"[DONE]":
            self.done = True
            return None
        name = self._name
        try:
            payload = orjson.loads(data)
            if "error" in payload:
                self.done = True
                raise BackendBadResponse(
                    f"backend `{name}` failed mid-stream", detail=stream_error(payload["error"])
                )
            usage = payload.get("usage")
            if usage is not None:
                self._usage = usage_of(usage) or self._usage
            self._served_model = payload.get("model") or self._served_model
            choices = payload.get("choices") or ()
            choice = choices[0] if choices else None
            delta = (choice.get("delta") or text_delta(choice.get("text"))) if choice else {}
            reason = choice.get("finish_reason") if choice else None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            self.done = True
            raise BackendBadResponse(
                f"backend `{name}` sent an unreadable stream event", detail=repr(exc)
            ) from exc
        if reason is not None:
            self._finish_reason, self._last_delta = reason, delta
            return None
        if delta:
            self._n_deltas += "content" in delta or "tool_calls" in delta
            return StreamChunk(delta=delta)
        return None


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """About four characters a token; used only when the upstream reports no usage."""
    chars = 0
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, Mapping))
    return (chars + 3) // 4 + 4 * len(request.messages)


def usage_of(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
    )


def text_delta(text: Any) -> dict[str, Any]:
    return {"content": text} if isinstance(text, str) and text else {}


def stream_error(error: Any) -> str:
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message)[:ERROR_TEXT_MAX_CHARS]
