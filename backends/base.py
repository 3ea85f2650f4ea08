"""The `Backend` protocol and the frozen values that cross it.

A backend turns one `ChatRequest` into one `ChatResult` (or a stream of `StreamChunk`s ending with one that
carries `usage`). It never sees teams, keys or HTTP; it raises only `backends.errors.BackendError`s.
Messages, tools and response_format stay in OpenAI wire shape (plain dicts) because every backend speaks it.
A backend that can also embed implements `EmbeddingBackend` (an `EmbeddingRequest` in, float vectors out);
one that can count prompt tokens with the model's tokenizer implements `TokenCounter`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

PRIORITY_HEADER = "x-switchboard-priority"  # "batch": the engine schedules it behind interactive requests
# Milliseconds from its arrival within which the request's first token is wanted (its team's p95 TTFT SLO):
# the engine queues earliest deadline first. Any other server ignores it.
DEADLINE_HEADER = "x-switchboard-deadline-ms"
DEADLINE_RANGE_MS = (1.0, 86_400_000.0)  # what an engine takes: from a millisecond to a day
# When a request that names no deadline is due, after its arrival: the bundled engine's default
# (`--default-deadline-ms`), and what a vLLM with priority scheduling is told for it (`openai_compat`).
DEFAULT_DEADLINE_MS = 10_000.0


def deadline_in_range(deadline_ms: float) -> float:
    """`deadline_ms` moved into DEADLINE_RANGE_MS."""
    low, high = DEADLINE_RANGE_MS
    return min(max(deadline_ms, low), high)


class BackendKind(StrEnum):
    CLOUD = "cloud"  # a cloud LLM API through litellm
    OPENAI = "openai"  # any OpenAI-compatible server, reached with httpx
    LOCAL = "local"  # our own engine
    EDGE = "edge"  # a device that registered with the gateway


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    kind: BackendKind
    supports_tools: bool = True
    supports_response_format: bool = True
    supports_seed: bool = True


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat completion as the backend must run it. `model` is the upstream model name."""

    model: str
    messages: tuple[Mapping[str, Any], ...]
    request_id: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str | None = None
    tools: tuple[Mapping[str, Any], ...] | None = None
    tool_choice: Any = None
    response_format: Mapping[str, Any] | None = None
    timeout_s: float = 600.0
    # Legacy `/v1/completions`: the raw prompt. `messages` then holds its chat translation (one user message)
    # for backends that speak only chat; backends with a completions endpoint send the prompt as it is.
    prompt: str | None = None
    # Headers a backend of the same API forwards unchanged (anthropic-version/-beta to an Anthropic cloud).
    passthrough_headers: tuple[tuple[str, str], ...] = ()
    # A `/v1/batches` item: a self-hosted engine runs it behind interactive work (PRIORITY_HEADER).
    batch: bool = False
    # Within how many ms its first token is wanted (its team's SLO): a self-hosted engine serves the earliest
    # deadline first (DEADLINE_HEADER). None: no deadline sent.
    deadline_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A whole answer. `message` is the OpenAI assistant message (role, content, maybe tool_calls)."""

    message: Mapping[str, Any]
    finish_reason: str
    usage: Usage
    served_model: str


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One step of a stream. `delta` is the OpenAI delta dict; the last chunk carries `usage`."""

    delta: Mapping[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage | None = None
    served_model: str | None = None


@dataclass(frozen=True, slots=True)
class BackendHealth:
    ok: bool
    detail: str = ""


@runtime_checkable
class Backend(Protocol):
    """Five members, no more (see shared/STYLE.md). Extra abilities get protocols of their own."""

    @property
    def info(self) -> BackendInfo: ...

    async def complete(self, request: ChatRequest) -> ChatResult: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]: ...

    async def health(self) -> BackendHealth: ...

    async def aclose(self) -> None: ...


# ---- embeddings: an ability of its own (shared/STYLE.md), not a sixth member of `Backend` ------------------

TokenIds = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """One embeddings call as the backend must run it. `inputs` are texts or token-id arrays, never mixed.

    The wire encoding (float or base64) is the HTTP edge's business: backends always return floats."""

    model: str
    inputs: tuple[str, ...] | tuple[TokenIds, ...]
    request_id: str
    dimensions: int | None = None
    user: str | None = None
    timeout_s: float = 600.0

    @property
    def texts(self) -> tuple[str, ...]:
        """The text inputs (empty when the inputs are token ids)."""
        return tuple(i for i in self.inputs if isinstance(i, str))


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """One vector per input, in input order. `usage.completion_tokens` is always 0."""

    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
    served_model: str


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A backend that can embed (cloud, OpenAI-compatible servers). Edge nodes do not."""

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...


# ---- token counting: an ability of its own, like embeddings ------------------------------------------------


@runtime_checkable
class TokenCounter(Protocol):
    """A backend that can count a chat request's prompt tokens with the served model's own tokenizer and chat
    template (OpenAI-compatible servers with vLLM's `/tokenize`, our engine among them)."""

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """The prompt tokens a completion of `request` would report; None when the server has no tokenizer
        endpoint or cannot be reached. Raises only `BackendError`s."""
        ...


def content_text(content: object) -> str:
    """A chat message's text: its string content, or the `text` of each part of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""
