"""Engine requests as text, shared by the HTTP server and the edge node: build state, start a chat, read it.

`build_engine_state` wraps a loaded model in an `Engine` (not started: the caller owns the thread);
`start_chat` checks an OpenAI chat body, applies the chat template and submits it; a `Generation` turns the
engine's token ids into text deltas through a `StopStringDecoder`, aborts once a stop string appears, and
counts its outcome exactly once. Problems with the input raise `ApiError` (4xx), a failed engine request
raises `ApiError` 500 `engine_error`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

from backends.base import DEADLINE_HEADER, DEADLINE_RANGE_MS, PRIORITY_HEADER, FinishReason, deadline_in_range
from backends.local.build import EngineOptions, available_cores, build_engine_parts
from backends.local.engine.engine import Engine, Failed, Finished, RequestHandle, Tokens
from backends.local.engine.kernels import kernel_isa
from backends.local.engine.scheduler import FinishCause, Priority, RequestTooLarge, SamplingParams
from backends.local.generate import StopStringDecoder
from backends.local.loader import LoadedModel
from backends.local.metrics import EngineMetrics
from backends.local.wire import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    ChatCompletionBody,
    SamplingDefaults,
    encode_chat,
    reject_unsupported,
    sampling_defaults,
    sampling_params,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineState:
    loaded: LoadedModel
    engine: Engine
    metrics: EngineMetrics
    served_names: tuple[str, ...]
    context_tokens: int
    vocab_size: int
    default_max_tokens: int
    sampling: SamplingDefaults = SamplingDefaults()
    config: dict[str, str] = field(default_factory=dict)  # what `auto` chose, the kernels' ISA


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def failure(failed: Failed) -> ApiError:
    return ApiError(500, f"generation failed: {failed.message}", openai_type="api_error", code="engine_error")


@dataclass(slots=True)
class Generation:
    """One request in flight: turns engine tokens into text and counts its outcome exactly once."""

    state: EngineState
    handle: RequestHandle
    params: SamplingParams
    prompt_tokens: int
    outcome: str | None = field(default=None)

    def close(self) -> None:
        """However the response ended: abort the engine request (a no-op once finished)."""
        self.handle.abort()
        self._count("cancelled")

    def _count(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.state.metrics.requests.labels(outcome=outcome).inc()

    async def texts(self) -> AsyncIterator[TextDelta | Done]:
        """Text deltas (one per engine event), then one `Done`; a failed engine request raises ApiError."""
        decoder = StopStringDecoder(self.state.loaded.tokenizer, self.params.stop)
        completion = 0
        async for event in self.handle.events():
            if isinstance(event, Tokens):
                parts = []
                for token in event.token_ids:
                    completion += 1
                    parts.append(decoder.add(token))
                    if decoder.stopped:
                        break
                if text := "".join(parts):
                    yield TextDelta(text)
                if decoder.stopped:
                    self.handle.abort()  # the engine may have run a step further; those tokens are dropped
                    self._count("ok")
                    yield Done(FinishReason.STOP, self.prompt_tokens, completion)
                    return
            elif isinstance(event, Finished):
                if tail := decoder.finish():
                    yield TextDelta(tail)
                self._count("ok")
                reason = FinishReason.LENGTH if event.cause is FinishCause.LENGTH else FinishReason.STOP
                yield Done(reason, self.prompt_tokens, completion)
                return
            else:
                self._count("error")
                raise failure(event)
        raise failure(Failed("generation ended without a result"))


def build_engine_state(
    loaded: LoadedModel,
    options: EngineOptions,
    *,
    served_names: Iterable[str],
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> EngineState:
    """Convert, quantize and size the engine for `loaded`; the caller starts and stops `state.engine`."""
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be at least 1, got {default_max_tokens}")
    engine_metrics = EngineMetrics()
    parts = build_engine_parts(loaded, options)
    engine = Engine(
        parts.runner,
        parts.scheduler,
        stop_token_ids=parts.stop_token_ids,
        proposer=parts.proposer,
        observer=engine_metrics,
        threads=options.threads or available_cores(),
    )
    engine_metrics.watch(engine.stats)
    sampling = sampling_defaults(getattr(loaded.model, "generation_config", None), loaded.name)
    log.info(
        "requests without temperature/top_p sample with temperature %.2g, top_p %.2g (%s)",
        sampling.temperature,
        sampling.top_p,
        sampling.source,
    )
    config = {"dtype": parts.dtype, "quant": parts.quant, "kernels": kernel_isa()}
    engine_metrics.describe(config, parts.autotune)
    return EngineState(
        loaded=loaded,
        engine=engine,
        metrics=engine_metrics,
        served_names=tuple(served_names),
        context_tokens=parts.context_tokens,
        vocab_size=parts.vocab_size,
        default_max_tokens=default_max_tokens,
        sampling=sampling,
        config=config,
    )


def check_model(state: EngineState, model: str) -> None:
    if model not in state.served_names:
        raise ApiError(
            404,
            f"model `{model}` is not served here; served: {', '.join(state.served_names)}",
            param="model",
            code="model_not_found",
        )


@dataclass(frozen=True, slots=True)
class Queueing:
    """Where a request joins the engine's queue: its class, and when its first token is due (ms after it
    arrives; None: the scheduler's default)."""

    priority: Priority = Priority.INTERACTIVE
    deadline_ms: float | None = None


INTERACTIVE = Queueing()


def queueing_of(headers: Mapping[str, str]) -> Queueing:
    """The request's place in the queue from its headers. PRIORITY_HEADER "batch" runs it behind interactive
    work; anything else is interactive (the header can only lower a request's priority, never raise it).
    DEADLINE_HEADER: milliseconds within which its first token is wanted; the engine serves the earliest
    deadline first."""
    header = headers.get(PRIORITY_HEADER)
    batch = header is not None and header.strip().lower() == "batch"
    priority = Priority.BATCH if batch else Priority.INTERACTIVE
    raw = headers.get(DEADLINE_HEADER)
    if raw is None:
        return Queueing(priority) if batch else INTERACTIVE
    try:
        deadline_ms = float(raw)
    except ValueError:
        deadline_ms = math.nan
    low, high = DEADLINE_RANGE_MS
    if not low <= deadline_ms <= high:  # NaN fails too
        raise ApiError(
            400,
            f"header {DEADLINE_HEADER} must be a number of milliseconds from {low:.0f} to {high:.0f} "
            "(within how long the first token is wanted)",
            param=DEADLINE_HEADER,
            code="invalid_deadline",
        )
    return Queueing(priority, deadline_ms)


def due_within(deadline_ms: float | None) -> Queueing:
    """Interactive, its first token due `deadline_ms` after arrival (within what the engine takes; an edge
    frame's); None: the scheduler's default."""
    return INTERACTIVE if deadline_ms is None else Queueing(deadline_ms=deadline_in_range(deadline_ms))


def start(state: EngineState, prompt_ids: list[int], params: SamplingParams) -> Generation:
    try:
        handle = state.engine.submit(prompt_ids, params)
    except RequestTooLarge as exc:
        raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from exc
    return Generation(state, handle, params, len(prompt_ids))


def start_chat(state: EngineState, body: ChatCompletionBody, queueing: Queueing = INTERACTIVE) -> Generation:
    """Check a chat body against the served names and the engine's limits, template it, and submit it."""
    check_model(state, body.model)
    reject_unsupported(body)
    prompt_ids = encode_chat(state.loaded.tokenizer, body.messages)
    params = sampling_params(
        body,
        len(prompt_ids),
        state.context_tokens,
        default_max_tokens=state.default_max_tokens,
        kv_tokens=state.engine.max_kv_tokens(),
        defaults=state.sampling,
    )
    return start(state, prompt_ids, queued(params, queueing))


def queued(params: SamplingParams, queueing: Queueing) -> SamplingParams:
    if queueing is INTERACTIVE:
        return params
    return dataclasses.replace(params, priority=queueing.priority, deadline_ms=queueing.deadline_ms)
