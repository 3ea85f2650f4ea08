"""The one ledger row of a request, and the settlement of what it held.

`RequestRecord.finish` is the only way a request ends: it writes exactly one `UsageRecord` (ledger and
metrics), settles the limits ticket (rate-limit tokens, the concurrency lease, the budget reservation) and
ends the served attempt's `DeploymentUse`. It is idempotent, so whichever path ends a request first wins and
no path writes two rows. The pipeline calls it on every exit after authentication, exceptions included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from backends.base import ChatResult, EmbeddingResult, StreamChunk, Usage
from backends.errors import SwitchboardError
from gateway.cache.store import CachedResponse
from gateway.errors import AllBackendsFailed
from gateway.limits.gate import Ticket
from gateway.metrics import GatewayMetrics
from gateway.pipeline.attempt import DeploymentUse
from gateway.pipeline.decision_view import candidates_json, privacy_class
from gateway.pipeline.plan import Routed
from gateway.pipeline.request import GatewayRequest, Timing
from gateway.records import RequestStatus, UsageRecord
from gateway.store.ledger import LedgerWriter
from gateway.telemetry.base import FinishedRequest, RequestTracer
from routing.decision import Deployment, Price
from routing.fleet import owned_share_micro_usd

REFUSAL_CHARS = 1000  # of a refused request's route reason


class Settler(Protocol):
    """What gives back a request's holds (`limits.gate.Gate`)."""

    def settle_soon(self, ticket: Ticket, *, tokens: int, cost_micro_usd: int) -> None: ...


@dataclass(frozen=True, slots=True)
class RecordSink:
    """Where finished requests go: the ledger writer and the Prometheus metrics."""

    ledger: LedgerWriter
    metrics: GatewayMetrics
    # (public model, backend) -> its batch price (config: models.X.batch_*_usd_per_mtok), for batch rows
    batch_prices: Mapping[tuple[str, str], Price] = field(default_factory=dict)
    tracer: RequestTracer | None = None  # [telemetry]: spans of each finished request

    def price(self, dep: Deployment, batch: bool) -> Price:
        if batch:
            return self.batch_prices.get((dep.public_model, dep.backend), dep.price)
        return dep.price

    def write(self, rec: UsageRecord) -> None:
        self.ledger.record(rec)
        self.metrics.observe(rec)

    def cache_outcome(self, team: str, outcome: str) -> None:
        self.metrics.cache_lookup(team, outcome)


def refusal_reason(http_status: int, error: SwitchboardError) -> str:
    """A refused request's route reason: status, code and the message (which names what to change and
    never holds a key or prompt text), at most REFUSAL_CHARS long."""
    return f"refused {http_status} {error.code}: {error.message}"[:REFUSAL_CHARS]


@dataclass(slots=True)
class RequestRecord:
    """Everything the ledger row needs, filled in as the request goes through the pipeline."""

    request: GatewayRequest
    timing: Timing
    sink: RecordSink
    settler: Settler
    now_s: Callable[[], float]
    routed: Routed | None = None
    ticket: Ticket | None = None  # limits and budget held by this request
    hit: CachedResponse | None = None  # served from the cache
    use: DeploymentUse | None = None  # the attempt that serves the answer
    attempts: int = 0
    ttft_ms: float | None = None
    usage: Usage = field(default_factory=Usage)
    served_model: str | None = None
    cost_micro_usd: int = 0  # cloud money: 0 on owned capacity
    owned_micro_usd: int = 0  # share of owned capacity, for chargeback
    cache: str | None = None  # the cache step's outcome: hit, miss or skip
    output: ChatResult | EmbeddingResult | None = None  # the whole answer (not kept in the row)
    chunks: list[StreamChunk] | None = None  # a stream's chunks, kept when a tracer captures content
    done: bool = False
    dispatched: bool = False  # handed to dispatch: an error after it is no refusal

    def elapsed_ms(self) -> float:
        return self.timing.elapsed_ms(self.now_s())

    def finish(
        self,
        status: RequestStatus,
        http_status: int,
        *,
        error: SwitchboardError | None = None,
        backend: str | None = None,
        answered: bool = False,  # the backend answered; `error` came after (delivery): not its fault
    ) -> None:
        if self.done:
            return
        self.done = True
        usage, hit = self.usage, self.hit
        dep = self.use.deployment if self.use is not None else None
        self.cost_micro_usd = cost = (
            self.sink.price(dep, self.request.batch_id is not None).cost_micro_usd(
                usage.prompt_tokens, usage.completion_tokens
            )
            if dep
            else 0
        )
        if hit is not None:
            backend = hit.backend
        self.owned_micro_usd = self._owned_share()
        row = self._row(status, http_status, error, backend or (dep.backend if dep else None))
        self.sink.write(row)
        if self.sink.tracer is not None:
            self._trace(self.sink.tracer, row, error, dep)
        if self.ticket is not None:
            # A hit used no model tokens: what admission reserved for it is handed back.
            tokens = 0 if hit is not None else usage.prompt_tokens + usage.completion_tokens
            self.settler.settle_soon(self.ticket, tokens=tokens, cost_micro_usd=cost)
        if self.use is not None:
            self._end_use(self.use, status, None if answered else error)

    def _owned_share(self) -> int:
        """The served attempt's time on owned capacity, shared among the requests in flight on it when it
        started, at the box's usd_per_hour (the savings report charges busy time the same way)."""
        use = self.use
        if use is None or use.deployment.usd_per_hour is None or self.hit is not None:
            return 0
        busy_ms = max(0.0, self.now_s() - use.started_s) * 1000 / use.sharers
        return owned_share_micro_usd(busy_ms, use.deployment.usd_per_hour)

    def fail(self, exc: SwitchboardError) -> None:
        backend = exc.causes[-1][0] if isinstance(exc, AllBackendsFailed) and exc.causes else None
        self.finish(RequestStatus.ERROR, exc.status_code, error=exc, backend=backend)

    def _row(
        self, status: RequestStatus, http_status: int, error: SwitchboardError | None, backend: str | None
    ) -> UsageRecord:
        request, routed, hit, usage = self.request, self.routed, self.hit, self.usage
        refused = error is not None and not self.dispatched and hit is None and http_status != 500
        reason = routed.decision.reason if routed else None
        if refused and error is not None:  # refused before any backend: the reason is the refusal's
            reason = refusal_reason(http_status, error)
        return UsageRecord(
            request_id=request.request_id,
            created_at=request.received_at,
            team=request.identity.team,
            key_id=request.identity.key_id,
            requested_model=request.model,
            backend=backend,
            served_model=self.served_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_micro_usd=self.cost_micro_usd,
            latency_ms=round(self.elapsed_ms(), 3),
            ttft_ms=None if self.ttft_ms is None else round(self.ttft_ms, 3),
            status=status,
            http_status=http_status,
            error_type=error.code if error else None,
            stream=request.stream,
            endpoint=request.endpoint,
            cache_hit=hit is not None,
            cost_saved_micro_usd=hit.cost_micro_usd if hit is not None else 0,
            privacy_class=privacy_class(routed.verdict) if routed else None,
            route_reason=reason,
            attempts=self.attempts or (len(error.causes) if isinstance(error, AllBackendsFailed) else 0),
            route_candidates=candidates_json(routed.decision, rejected=refused) if routed else None,
            batch_id=request.batch_id,
            owned_micro_usd=self.owned_micro_usd,
        )

    def _trace(
        self, tracer: RequestTracer, row: UsageRecord, error: SwitchboardError | None, dep: Deployment | None
    ) -> None:
        tracer.request_finished(
            FinishedRequest(
                row=row,
                call=self.request.call,
                start_s=self.timing.start_s,
                end_s=self.now_s(),
                attempts=tuple(self.timing.attempts or ()),
                served=dep,
                cache=self.cache,
                error=error,
                output=self.output if self.chunks is None else tuple(self.chunks),
                traceparent=self.request.hints.traceparent,
            )
        )

    def _end_use(self, use: DeploymentUse, status: RequestStatus, error: SwitchboardError | None) -> None:
        """The served attempt's outcome for live stats and the breaker (failed ones ended in dispatch)."""
        now_s = self.now_s()
        if status is RequestStatus.CLIENT_CLOSED or (error is not None and not error.retryable):
            use.finish(ok=False, counted=False, now_s=now_s)
            return
        ttft_ms = None
        if self.ttft_ms is not None:  # from the start of the serving attempt, not of the request
            ttft_ms = max(0.0, self.ttft_ms - (use.started_s - self.timing.start_s) * 1000)
        use.finish(
            ok=error is None,
            counted=True,
            now_s=now_s,
            ttft_ms=ttft_ms,
            completion_tokens=self.usage.completion_tokens,
        )
