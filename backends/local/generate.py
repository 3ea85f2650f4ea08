"""Generation worker: one background thread runs `model.generate` for queued requests, one at a time.

Token ids go in; text deltas and one final `GenerationDone` (or `GenerationFailed`) come back on the
caller's asyncio loop via `call_soon_threadsafe`. A per-request `StoppingCriteria` sees every new token: it
detokenises incrementally, holds back text that could start a stop string, and aborts on a stop string or on
cancellation. Seeds are applied with `torch.manual_seed` on the worker thread, which is the only thread that
samples, so a seeded request is reproducible. A later continuous-batching engine replaces this module.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from backends.base import FinishReason

log = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer decodes from an incomplete UTF-8 sequence


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request knobs. `temperature == 0` means greedy; `seed=None` means fresh randomness."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class GenerationDone:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class GenerationFailed:
    message: str


GenerationEvent = TextDelta | GenerationDone | GenerationFailed
FinishCallback = Callable[[GenerationDone | GenerationFailed], None]


class StopStringDecoder:
    """Incremental detokeniser that never emits text that is (or may become) part of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._text = ""
        self._emitted_chars = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to show."""
        self._ids.append(token_id)
        self._text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if self._text.endswith(_REPLACEMENT_CHAR):
            return ""
        stop_at = self._find_stop()
        if stop_at is not None:
            self.stopped = True
            return self._emit_until(stop_at)
        return self._emit_until(len(self._text) - self._held_back_chars())

    def finish(self) -> str:
        """The rest of the text once generation has ended (nothing if a stop string ended it)."""
        return "" if self.stopped else self._emit_until(len(self._text))

    def _find_stop(self) -> int | None:
        search_from = max(0, self._emitted_chars - self._longest_stop)
        hits = [i for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def _held_back_chars(self) -> int:
        # The longest suffix of the text that is a proper prefix of some stop string.
        for size in range(min(self._longest_stop - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def _emit_until(self, end: int) -> str:
        if end <= self._emitted_chars:
            return ""
        delta = self._text[self._emitted_chars : end]
        self._emitted_chars = end
        return delta


@dataclass(slots=True)
class _Job:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[GenerationEvent]
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def deliver(self, event: GenerationEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            # The caller's loop is closed: nobody is listening any more.
            self.cancel_event.set()


class GenerationHandle:
    """The asyncio side of one queued request."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    def cancel(self) -> None:
        """Abort the request (idempotent; a finished request ignores it)."""
        self._job.cancel_event.set()

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Yield text deltas, then exactly one `GenerationDone` or `GenerationFailed`."""
        while True:
            event = await self._job.events.get()
            yield event
            if not isinstance(event, TextDelta):
                return


class _StreamingStop(StoppingCriteria):
    """Sees each new token: streams its text and stops on a stop string or cancellation."""

    def __init__(self, job: _Job, decoder: StopStringDecoder) -> None:
        self._job = job
        self._decoder = decoder
        self.generated_tokens = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.generated_tokens += 1
        text = self._decoder.add(int(input_ids[0, -1]))
        if text:
            self._job.deliver(TextDelta(text))
        stop = self._decoder.stopped or self._job.cancel_event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)  # type: ignore[return-value]


class GenerationWorker:
    """Owns the model and one thread; `submit` queues a request and returns its handle.

    `on_finish` runs on the worker thread once per request, even when nobody reads its events any more
    (a disconnected client), so counters kept there see every request.
    """

    def __init__(self, model: Any, tokenizer: Any, *, on_finish: FinishCallback | None = None) -> None:
        self._on_finish = on_finish
        self._model = model
        self._tokenizer = tokenizer
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: _Job | None = None

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    @property
    def running_requests(self) -> int:
        return 0 if self._current is None else 1

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("generation worker already started")
        self._thread = threading.Thread(target=self._loop, name="switchboard-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Abort the running request, fail queued ones, and join the thread."""
        if self._thread is None:
            return
        current = self._current
        if current is not None:
            current.cancel_event.set()
        pending: list[_Job] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job)
        for job in pending:
            job.deliver(GenerationFailed("engine is shutting down"))
        self._jobs.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationHandle:
        """Queue a request; must be called on the asyncio loop that will read its events."""
        if self._thread is None:
            raise RuntimeError("generation worker is not running; call start() first")
        job = _Job(tuple(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        return GenerationHandle(job)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            outcome: GenerationDone | GenerationFailed
            if job.cancel_event.is_set():
                outcome = GenerationDone(FinishReason.STOP, len(job.prompt_ids), 0, cancelled=True)
            else:
                self._current = job
                try:
                    outcome = self._run(job)
                except Exception as exc:  # engine loop: fail this request, keep serving the others
                    log.exception("generation failed")
                    outcome = GenerationFailed(f"generation failed: {type(exc).__name__}")
                finally:
                    self._current = None
            if self._on_finish is not None:
                self._on_finish(outcome)
            job.deliver(outcome)

    def _run(self, job: _Job) -> GenerationDone:
        params = job.params
        decoder = StopStringDecoder(self._tokenizer, params.stop)
        criteria = _StreamingStop(job, decoder)
        input_ids = torch.tensor([job.prompt_ids], dtype=torch.long)  # (1, T)
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": 0,
            }
        torch.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        with torch.inference_mode():
            output = self._model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_tokens,
                stopping_criteria=StoppingCriteriaList([criteria]),
                eos_token_id=list(self._eos_ids),
                pad_token_id=self._eos_ids[0],
                **sampling,
            )
        tail = decoder.finish()
        if tail:
            job.deliver(TextDelta(tail))
        completion_ids = output[0, input_ids.shape[1] :].tolist()
        hit_eos = bool(completion_ids) and completion_ids[-1] in self._eos_ids
        stopped = decoder.stopped or hit_eos or len(completion_ids) < params.max_tokens
        return GenerationDone(
            finish_reason=FinishReason.STOP if stopped else FinishReason.LENGTH,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(completion_ids),
            cancelled=job.cancel_event.is_set(),
        )


def _eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("model has no end-of-sequence token; set generation_config.eos_token_id")
    return tuple(ids)
