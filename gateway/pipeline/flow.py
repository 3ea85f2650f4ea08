"""The request pipeline every endpoint shares: plan -> admit -> cache -> dispatch -> settle -> record.

Translators (gateway/translate/) turn a wire body into a `GatewayRequest` and an `Answer` or `ChunkStream`
back into their API's wire format; the HTTP edge authenticates first. Nothing here knows a wire format.
Invariant: once a request has an identity, exactly one ledger row is written and every hold (rate-limit
tokens, concurrency lease, budget reservation) is settled, whatever raises and wherever (`_settled`).
Response headers are collected per request and returned as values (on the exception when it fails).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from backends.base import ChatRequest, ChatResult, EmbeddingResult, StreamChunk, Usage
from backends.errors import SwitchboardError
from gateway.cache.policy import CachePlan, CacheStep
from gateway.cache.store import CachedResponse, entry_from_chunks, entry_from_result
from gateway.eager import Ready
from gateway.errors import InvalidRequest
from gateway.limits.gate import Gate
from gateway.pipeline.attempt import DeploymentUse
from gateway.pipeline.decision_view import prediction_headers
from gateway.pipeline.dispatch import Dispatcher, OpenStream, await_chunk, close_stream, ready_chunk
from gateway.pipeline.plan import Planner, Routed, fail_closed_error, with_deadline
from gateway.pipeline.record import RecordSink, RequestRecord
from gateway.pipeline.request import CACHE_HEADER, SYSTEM_CLOCK, Clock, GatewayRequest, Timing
from gateway.records import RequestStatus

Headers = tuple[tuple[bytes, bytes], ...]
Deliver = Callable[["Answer"], Awaitable[None]]  # a translator's work on a whole answer (render, store)


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer (a chat result, or the vectors of an embeddings call) and the headers the pipeline
    adds."""

    result: ChatResult | EmbeddingResult
    headers: Headers

    @property
    def chat(self) -> ChatResult:
        """The result of a chat request (a translator of a chat API sends nothing else)."""
        if not isinstance(self.result, ChatResult):
            raise TypeError("this answer holds embeddings, not a chat result")
        return self.result

    @property
    def embedding(self) -> EmbeddingResult:
        if not isinstance(self.result, EmbeddingResult):
            raise TypeError("this answer holds a chat result, not embeddings")
        return self.result


@dataclass(frozen=True, slots=True)
class _Admitted:
    routed: Routed
    cache: CachePlan | None
    hit: CachedResponse | None


def header_text(text: str, limit: int = 200) -> bytes:
    return text[:limit].encode("ascii", "replace")


class Pipeline:
    """Owned by the app; event-loop use only. Each call runs one request from plan to its ledger row."""

    def __init__(
        self,
        planner: Planner,
        gate: Gate,
        cache: CacheStep,
        dispatcher: Dispatcher,
        sink: RecordSink,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.planner, self.gate, self.cache = planner, gate, cache
        self.dispatcher, self.sink, self.clock = dispatcher, sink, clock

    def _record(self, request: GatewayRequest, timing: Timing) -> RequestRecord:
        rec = RequestRecord(request, timing, self.sink, self.gate, self.clock.now_s)
        tracer = self.sink.tracer
        if tracer is not None:  # keep what its spans need
            timing.attempts = []
            if tracer.capture_content and request.stream:
                rec.chunks = []
        return rec

    async def complete(
        self, request: GatewayRequest, timing: Timing, deliver: Deliver | None = None
    ) -> Answer:
        """A whole (non-streamed) answer. `deliver`, if given, runs on it before the row is written (the
        translator's own work: render, store): when it raises, the row says what the client then gets,
        with the tokens and cost the backend did produce, and the deployment is not blamed."""
        rec = self._record(request, timing)
        headers: list[tuple[bytes, bytes]] = []
        with _settled(rec, headers):
            admitted = await self._admit(rec, headers)
            if admitted.hit is not None:
                rec.output = result = admitted.hit.to_result()
                rec.usage, rec.served_model = result.usage, result.served_model
                answer = Answer(result, tuple(headers))
                await _delivered(rec, answer, deliver, headers)
                return answer
            routed = admitted.routed
            rec.dispatched = True
            call = request.call
            call = with_deadline(call, routed.policy) if isinstance(call, ChatRequest) else call
            served = await self.dispatcher.complete(
                routed.decision, call, timing, routed.policy.max_attempts, routed.prompt_tokens,
                routed.prefix_cached,
            )  # fmt: skip
            rec.use, rec.attempts = served.use, served.attempts
            _remember_holder(routed, served.use)
            headers.append((b"x-switchboard-backend", header_text(served.deployment.backend)))
            rec.output = result = served.result
            rec.usage, rec.served_model = result.usage, result.served_model
            answer = Answer(result, tuple(headers))
            await _delivered(rec, answer, deliver, headers)
            plan = admitted.cache
            if plan is not None and plan.write:
                entry = entry_from_result(
                    result,
                    backend=served.deployment.backend,
                    cost_micro_usd=rec.cost_micro_usd,
                    route_reason=admitted.routed.decision.reason,
                )
                await self.cache.put(plan, entry)
            return answer

    async def open_stream(self, request: GatewayRequest, timing: Timing) -> ChunkStream:
        """Dispatch until the first chunk arrives (errors so far are raised), then hand over the chunks."""
        rec = self._record(request, timing)
        headers: list[tuple[bytes, bytes]] = []
        with _settled(rec, headers):
            call = request.call
            if not isinstance(call, ChatRequest):
                raise InvalidRequest("`stream` is available for chat requests only", param="stream")
            admitted = await self._admit(rec, headers)
            if admitted.hit is not None:
                return ChunkStream(rec, tuple(headers), admitted.hit.replay(), self.cache)
            routed = admitted.routed
            rec.dispatched = True
            opened = await self.dispatcher.open_stream(
                routed.decision, with_deadline(call, routed.policy), timing, routed.policy.max_attempts,
                routed.prompt_tokens,
                routed.prefix_cached,
            )  # fmt: skip
        rec.use, rec.attempts = opened.use, opened.attempts
        _remember_holder(admitted.routed, opened.use)
        headers.append((b"x-switchboard-backend", header_text(opened.deployment.backend)))
        plan = admitted.cache
        keep = _Keep(plan, admitted.routed.decision.reason) if plan is not None and plan.write else None
        idle_timeout_s = self.dispatcher.idle_timeout_s(opened.deployment.backend)
        return ChunkStream(
            rec, tuple(headers), (opened.first, *opened.held), self.cache, opened, idle_timeout_s, keep
        )

    async def _admit(self, rec: RequestRecord, out: list[tuple[bytes, bytes]]) -> _Admitted:
        """Model access and route, rate limits, then the cache; on a miss, the budget reservation."""
        request = rec.request
        team = request.identity.team
        routed = await self.planner.route(request, now_s=self.clock.now_s())
        rec.routed = routed  # recorded even when it fails closed below
        refused = fail_closed_error(routed, team)
        if refused is not None:
            out.append((b"x-switchboard-route", header_text(routed.decision.reason)))
            raise refused
        rec.ticket = ticket = await self.gate.admit(
            request.identity, request.model, routed.prompt_tokens + routed.output_tokens
        )
        out += ticket.headers()
        hints = request.hints
        plan = None
        if request.cacheable:
            plan = self.cache.plan(
                team, request.call, hints.cache_control, hints.cache_opt, request.preferences
            )
        hit = await self.cache.get(plan) if plan is not None and plan.read else None
        if hit is not None and _servable(hit, routed):
            rec.hit, rec.cache = hit, "hit"
            out.append((b"x-switchboard-route", header_text(hit.route_reason)))
            out.append((b"x-switchboard-backend", header_text(hit.backend)))
            out.append((CACHE_HEADER.encode(), b"hit"))
            self.sink.cache_outcome(team, "hit")
            return _Admitted(routed, plan, hit)
        rec.cache = outcome = "skip" if plan is None else "miss"
        out.append((b"x-switchboard-route", header_text(routed.decision.reason)))
        out += prediction_headers(routed)
        out.append((CACHE_HEADER.encode(), outcome.encode()))
        self.sink.cache_outcome(team, outcome)
        estimate = max(
            d.price.cost_micro_usd(routed.prompt_tokens, routed.output_tokens)
            for d in routed.decision.candidates
        )
        await self.gate.reserve(ticket, estimate)
        return _Admitted(routed, plan, None)


def _servable(entry: CachedResponse, routed: Routed) -> bool:
    """A hit is served only when the backend that produced it may serve this request now."""
    decision = routed.decision
    if decision.ranked:
        return any(c.deployment.backend == entry.backend for c in decision.ranked)
    return any(d.backend == entry.backend for d in decision.candidates)


@contextlib.contextmanager
def _settled(rec: RequestRecord, headers: list[tuple[bytes, bytes]]) -> Iterator[None]:
    """Whatever leaves the block by raising still writes the one row and settles the holds."""
    try:
        yield
    except SwitchboardError as exc:
        exc.headers = (*headers, *exc.headers)
        rec.fail(exc)
        raise
    except asyncio.CancelledError:
        rec.finish(RequestStatus.CLIENT_CLOSED, 499)
        raise
    except BaseException as exc:
        rec.finish(RequestStatus.ERROR, 500, error=_internal(exc))
        raise


async def _delivered(
    rec: RequestRecord, answer: Answer, deliver: Deliver | None, headers: list[tuple[bytes, bytes]]
) -> None:
    """Run `deliver` on the answer, then write the row: ok, or the status of what `deliver` raised."""
    if deliver is not None:
        try:
            await deliver(answer)
        except SwitchboardError as exc:
            exc.headers = (*headers, *exc.headers)
            rec.finish(RequestStatus.ERROR, exc.status_code, error=exc, answered=True)
            raise
    rec.finish(RequestStatus.OK, 200)


def _internal(exc: BaseException) -> SwitchboardError:
    return SwitchboardError(f"internal error ({type(exc).__name__})")


@dataclass(slots=True)
class _Keep:
    """A streamed answer being collected for the cache."""

    plan: CachePlan
    route_reason: str
    chunks: list[StreamChunk] = field(default_factory=list)


class ChunkStream:
    """A streamed answer's chunks. Iterate it, then `aclose()` however the response ended (even unread).

    Iteration records the first token's time, the usage and the served model; the end of the chunks writes
    the row (and keeps the answer for the cache), an error mid-stream writes it and is raised to the
    translator, and `aclose` before the end records what was delivered as `client_closed`.
    """

    def __init__(
        self,
        rec: RequestRecord,
        headers: Headers,
        chunks: Iterable[StreamChunk],
        cache: CacheStep,
        opened: OpenStream | None = None,
        idle_timeout_s: float = 0.0,
        keep: _Keep | None = None,
    ) -> None:
        """`chunks` come first (a cache hit's replay, or the chunks read while dispatching), then what
        `opened` yields, each within `idle_timeout_s`."""
        self.headers = headers
        self._rec, self._chunks, self._cache = rec, iter(chunks), cache
        self._opened, self._idle_timeout_s, self._keep = opened, idle_timeout_s, keep
        self._produced = 0  # content / tool-call deltas seen: the completion tokens if the client leaves
        self.ended = False  # every chunk was read: nothing is left open behind it

    @property
    def rec(self) -> RequestRecord:
        return self._rec

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> StreamChunk:
        rec = self._rec
        try:
            chunk = next(self._chunks, None)
            if chunk is None:  # then the backend's next: at once when buffered, else within the idle timeout
                opened = self._opened
                if opened is None:
                    raise StopAsyncIteration
                step = ready_chunk(opened)
                if isinstance(step, Ready):
                    chunk = step.value
                else:
                    chunk = await await_chunk(opened, step, self._idle_timeout_s)
        except StopAsyncIteration:
            self.ended = True
            rec.finish(RequestStatus.OK, 200)
            await self._keep_answer()
            raise
        except SwitchboardError as exc:
            rec.finish(RequestStatus.ERROR, exc.status_code, error=exc)
            raise
        except Exception as exc:
            rec.finish(RequestStatus.ERROR, 500, error=_internal(exc))
            raise
        rec.served_model = chunk.served_model or rec.served_model
        if chunk.usage is not None:
            rec.usage = chunk.usage
        delta = chunk.delta
        if delta.get("content") or delta.get("tool_calls"):
            self._produced += 1
            if rec.ttft_ms is None:
                rec.ttft_ms = rec.elapsed_ms()  # first token, not the role-only opening chunk
        if self._keep is not None:
            self._keep.chunks.append(chunk)
        if rec.chunks is not None:  # a tracer captures the answer
            rec.chunks.append(chunk)
        return chunk

    async def _keep_answer(self) -> None:
        keep, rec = self._keep, self._rec
        if keep is None or rec.use is None:
            return
        entry = entry_from_chunks(
            keep.chunks,
            backend=rec.use.deployment.backend,
            cost_micro_usd=rec.cost_micro_usd,
            served_model=rec.served_model or "",
            route_reason=keep.route_reason,
        )
        if entry is not None:  # a stream that never finished is not kept
            await self._cache.put(keep.plan, entry)

    async def aclose(self) -> None:
        rec = self._rec
        if not rec.done:
            # The client went away mid-stream. What the backend produced is charged: the prompt (routing's
            # estimate; the backend read it) and one token per content delta seen, unless the backend
            # already reported its own count. Without this, cut streams would be free output.
            if self._opened is not None and rec.usage.completion_tokens == 0:
                prompt = rec.usage.prompt_tokens or (rec.routed.prompt_tokens if rec.routed else 0)
                rec.usage = Usage(prompt, self._produced)
            rec.finish(RequestStatus.CLIENT_CLOSED, 499)
        if self._opened is not None:
            await close_stream(self._opened.rest)


def _remember_holder(routed: Routed, use: DeploymentUse) -> None:
    """The conversation's next turn expects its messages and this reply in this deployment's prefix cache, if
    it is owned (a cloud turn leaves the holder of the turns before it); so does the next conversation with
    the same system prompt that no replica holds yet."""
    if routed.prefix_key is not None:
        owned = use.deployment.usd_per_hour is not None
        written = use.routing.boxes.written(use.routing.stats, use.dep_id)
        use.routing.prefix_holders.record(
            routed.prefix_key, use.dep_id if owned else None, written, messages=routed.messages + 1
        )
        if routed.system_key is not None and owned:  # served elsewhere, other replicas may still hold it
            use.routing.prefix_holders.record(routed.system_key, use.dep_id, written)
