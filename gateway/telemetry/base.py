"""What the pipeline tells a tracer about a finished request, and the tracer's seam.

The pipeline keeps these only when a tracer is configured (`Timing.attempts` is None otherwise), so tracing
that is off costs a None check per request and per attempt. Times are `Clock` seconds (monotonic); the tracer
turns them into wall-clock time when the request ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from backends.base import ChatRequest, ChatResult, EmbeddingRequest, EmbeddingResult, StreamChunk
from backends.errors import SwitchboardError
from gateway.records import UsageRecord
from routing.decision import Deployment


@dataclass(frozen=True, slots=True)
class AttemptMark:
    """One attempt on one deployment (dispatch's fallback loop), refused by a breaker ones included."""

    deployment: Deployment
    started_s: float
    ended_s: float  # a served stream's attempt goes on until the request ends
    error: str | None  # the error's code; None: this attempt answered


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """A request whose ledger row was just written, with what its spans need beyond the row."""

    row: UsageRecord
    call: ChatRequest | EmbeddingRequest
    start_s: float
    end_s: float
    attempts: tuple[AttemptMark, ...]
    served: Deployment | None  # the deployment that answered (None: refused, failed, or a cache hit)
    cache: str | None  # hit | miss | skip; None: the request ended before the cache step
    error: SwitchboardError | None
    output: ChatResult | EmbeddingResult | tuple[StreamChunk, ...] | None  # what was answered, if kept
    traceparent: str | None  # the caller's W3C trace context: the request span becomes its child


class RequestTracer(Protocol):
    """Turns finished requests into spans and exports them."""

    @property
    def capture_content(self) -> bool:
        """Whether prompts and answers go into spans (config: telemetry.capture_content)."""
        ...

    def request_finished(self, request: FinishedRequest) -> None: ...

    async def aclose(self) -> None:
        """Export what is still buffered, then stop."""
        ...
