"""`EdgeBackend` (kind `edge`): one edge node, reached over the WebSocket the node opened to the gateway.

The gateway's per-connection link implements `Tunnel`; this module turns its `chunk`/`done`/`error` frames
into `ChatResult`/`StreamChunk`s and every failure into a `BackendError`: retryable until the first chunk
has been handed on (link dropped, node busy), `BackendBadResponse` after it (the same error
`OpenAICompatBackend` raises for a cut stream). A consumer that stops early sends the node a `cancel`, so it
frees the request's KV blocks. Messages name the node and the frame's code, never prompt text.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Protocol

from backends.base import BackendHealth, BackendInfo, BackendKind, ChatRequest, ChatResult, StreamChunk
from backends.edge import wire
from backends.errors import (
    BackendBadResponse,
    BackendError,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)

ReplyFrame = wire.Chunk | wire.Done | wire.Error
DISCONNECTED = "edge_node_disconnected"  # the `error` code a Tunnel uses when its link drops
_MESSAGE_MAX_CHARS = 500


class TunnelClosed(ConnectionError):
    """The link to the node is gone (raised by a `Tunnel`, mapped to a retryable error here)."""


class Tunnel(Protocol):
    """One node's live connection as the gateway holds it (the hub's per-connection link implements it).

    - `exchange(request)`: register `request.id` as pending, send the `request` frame, then yield the
      `chunk`/`done`/`error` frames the node sends for that id, in order, ending after `done` or `error`.
      When the link is already gone, raise `TunnelClosed` (or yield one `error` frame). When it drops while
      the request is pending, yield an `error` frame with status 503 and code `DISCONNECTED` (ending the
      iterator without `done`/`error`, or raising `TunnelClosed`, is read the same way). Closing the
      iterator early (`aclose`) must forget the pending id.
    - `cancel(request_id)`: the consumer went away; queue a `cancel` frame for the node without blocking
      (e.g. `put_nowait` on the link's send queue) and forget the pending id. A no-op once the request
      ended or the link is gone; never raises. `EdgeBackend` calls it only for requests not yet ended.
    - `connected`: False once the link has dropped (for `health`).
    """

    @property
    def node_id(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    def exchange(self, request: wire.Request) -> AsyncIterator[ReplyFrame]: ...

    def cancel(self, request_id: str) -> None: ...


def request_frame(request: ChatRequest, frame_id: str) -> wire.Request:
    """The `request` frame for a backend request (tools/response_format are refused before dispatch)."""
    return wire.Request(
        id=frame_id,
        model=request.model,
        messages=request.messages,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop,
        seed=request.seed,
        deadline_ms=request.deadline_ms,
    )


class EdgeBackend:
    """`Backend` over one node's `Tunnel`. Each attempt gets its own frame id (`{request_id}.{n}`)."""

    def __init__(self, name: str, tunnel: Tunnel) -> None:
        self._info = BackendInfo(
            name=name, kind=BackendKind.EDGE, supports_tools=False, supports_response_format=False
        )
        self._tunnel = tunnel
        self._attempts = itertools.count(1)

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def tunnel(self) -> Tunnel:
        return self._tunnel

    async def complete(self, request: ChatRequest) -> ChatResult:
        # Nothing reaches the client before the whole answer, so every failure stays retryable.
        parts: list[str] = []
        async with aclosing(self._frames(request)) as frames:
            async for frame in frames:
                if isinstance(frame, wire.Chunk):
                    parts.append(frame.content)
                else:
                    return ChatResult(
                        message={"role": "assistant", "content": "".join(parts)},
                        finish_reason=frame.finish_reason,
                        usage=frame.usage,
                        served_model=request.model,
                    )
        raise self._dropped()  # _frames never ends without `done`

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        first = True
        try:
            async with aclosing(self._frames(request)) as frames:
                async for frame in frames:
                    if isinstance(frame, wire.Done):
                        yield StreamChunk(
                            finish_reason=frame.finish_reason, usage=frame.usage, served_model=request.model
                        )
                        return
                    # OpenAI's first delta names the role; it comes with the first token, not before it.
                    delta = (
                        {"role": "assistant", "content": frame.content}
                        if first
                        else {"content": frame.content}
                    )
                    first = False
                    yield StreamChunk(delta=delta)
        except BackendError as exc:
            if first:
                raise
            raise BackendBadResponse(f"edge node `{self._info.name}` cut the stream: {exc.message}") from exc

    async def health(self) -> BackendHealth:
        if self._tunnel.connected:
            return BackendHealth(ok=True, detail=f"edge node `{self._tunnel.node_id}` connected")
        return BackendHealth(ok=False, detail=f"edge node `{self._tunnel.node_id}` disconnected")

    async def aclose(self) -> None:
        return None  # the link belongs to the hub, which closes it

    async def _frames(self, request: ChatRequest) -> AsyncGenerator[wire.Chunk | wire.Done, None]:
        """The request's chunks then its `done`; an `error`, a drop or a silent wait raise `BackendError`s.

        However it ends before `done`/`error` (consumer closed, cancelled, timed out) the node gets `cancel`.
        """
        frame_id = f"{request.request_id}.{next(self._attempts)}"
        replies = self._tunnel.exchange(request_frame(request, frame_id)).__aiter__()
        ended = False
        try:
            while True:
                try:
                    async with asyncio.timeout(request.timeout_s):
                        frame = await replies.__anext__()
                except StopAsyncIteration:
                    ended = True
                    raise self._dropped() from None
                except TunnelClosed as exc:
                    ended = True
                    raise self._dropped() from exc
                except TimeoutError:
                    raise BackendTimeout(
                        f"edge node `{self._info.name}` sent nothing for {request.timeout_s:g} s "
                        f"(config: backends.<name>.timeout_s or server.request_timeout_s)"
                    ) from None
                if isinstance(frame, wire.Error):
                    ended = True
                    raise self._error(frame)
                ended = isinstance(frame, wire.Done)
                yield frame
                if ended:
                    return
        finally:
            if not ended:
                self._tunnel.cancel(frame_id)
            aclose = getattr(replies, "aclose", None)
            if aclose is not None:
                await aclose()

    def _dropped(self) -> BackendUnavailable:
        return BackendUnavailable(f"edge node `{self._info.name}` disconnected before answering")

    def _error(self, frame: wire.Error) -> BackendError:
        detail = f"edge node `{self._info.name}` answered {frame.status} {frame.code}: "
        detail += frame.message[:_MESSAGE_MAX_CHARS]
        if frame.code == DISCONNECTED:
            return self._dropped()
        if frame.status == 429:
            return BackendRateLimited(detail)
        if frame.status == 504:
            return BackendTimeout(detail)
        if 400 <= frame.status < 500:
            return BackendRejected(detail)
        return BackendUnavailable(detail)
