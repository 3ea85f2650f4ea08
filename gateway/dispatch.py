"""The one fallback loop: try each candidate of a route decision in order, each attempt under its own timeout.

Only errors marked `retryable` move on to the next candidate; when all fail, every cause is collected into one
`AllBackendsFailed`. A stream may fall back only until its first chunk has arrived. Time spent awaiting a
backend is added to `Timing.upstream_s`, so the overhead header excludes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from backends.base import Backend, ChatRequest, ChatResult, StreamChunk
from backends.errors import BackendTimeout, SwitchboardError
from gateway.errors import AllBackendsFailed
from gateway.middleware import Timing
from routing.decision import Deployment, RouteDecision

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Served:
    deployment: Deployment
    result: ChatResult
    attempts: int


@dataclass(slots=True)
class OpenStream:
    """A stream whose first chunk has arrived; `rest` yields the others."""

    deployment: Deployment
    first: StreamChunk
    rest: AsyncIterator[StreamChunk]
    attempts: int


def _for(request: ChatRequest, dep: Deployment) -> ChatRequest:
    return dataclasses.replace(request, model=dep.upstream_model)


def _timeout_error(dep: Deployment, timeout_s: float) -> BackendTimeout:
    return BackendTimeout(
        f"no answer within {timeout_s:g} s (config: backends.{dep.backend}.timeout_s or "
        "server.request_timeout_s)"
    )


async def _first_success(
    decision: RouteDecision,
    request: ChatRequest,
    timing: Timing,
    timeouts_s: Mapping[str, float],
    attempt: Callable[[Deployment, ChatRequest], Awaitable[T]],
) -> tuple[Deployment, T, int]:
    """Run `attempt` on each candidate in order until one succeeds; only retryable errors move on."""
    causes: list[tuple[str, SwitchboardError]] = []
    for number, dep in enumerate(decision.candidates, start=1):
        timeout_s = min(timeouts_s.get(dep.backend, request.timeout_s), request.timeout_s)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                return dep, await attempt(dep, _for(request, dep)), number
        except TimeoutError:
            causes.append((dep.backend, _timeout_error(dep, timeout_s)))
        except SwitchboardError as exc:
            causes.append((dep.backend, exc))
            if not exc.retryable:
                break
        finally:
            timing.upstream_s += time.perf_counter() - started
    raise AllBackendsFailed(causes)


async def complete(
    decision: RouteDecision,
    request: ChatRequest,
    backends: Mapping[str, Backend],
    timing: Timing,
    timeouts_s: Mapping[str, float],
) -> Served:
    async def attempt(dep: Deployment, req: ChatRequest) -> ChatResult:
        return await backends[dep.backend].complete(req)

    dep, result, attempts = await _first_success(decision, request, timing, timeouts_s, attempt)
    return Served(dep, result, attempts)


async def open_stream(
    decision: RouteDecision,
    request: ChatRequest,
    backends: Mapping[str, Backend],
    timing: Timing,
    timeouts_s: Mapping[str, float],
) -> OpenStream:
    async def attempt(dep: Deployment, req: ChatRequest) -> tuple[StreamChunk, AsyncIterator[StreamChunk]]:
        iterator = backends[dep.backend].stream(req).__aiter__()
        try:
            return await iterator.__anext__(), iterator
        except StopAsyncIteration:
            return StreamChunk(), iterator
        except BaseException:
            await close_stream(iterator)  # a failed or timed-out attempt must not leak its connection
            raise

    dep, (first, rest), attempts = await _first_success(decision, request, timing, timeouts_s, attempt)
    return OpenStream(dep, first, rest, attempts)


async def next_chunk(stream: OpenStream, timeout_s: float) -> StreamChunk:
    """The next chunk, or StopAsyncIteration. Converts an idle timeout into BackendTimeout."""
    try:
        async with asyncio.timeout(timeout_s):
            return await stream.rest.__anext__()
    except TimeoutError:
        raise _timeout_error(stream.deployment, timeout_s) from None


async def close_stream(iterator: AsyncIterator[StreamChunk]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
