"""`DeploymentUse`: one attempt's life on one deployment, owned in one place.

It takes the deployment's in-flight count and counts the request's prompt tokens as pending prefill there
(routing predicts TTFT from them: `routing.fleet.predict`); `prefilled` gives the tokens back when the first
token arrives, and `finish` gives back whatever is still held, tells the live stats and the circuit breaker
how the attempt ended, exactly once. Used by `gateway.pipeline.dispatch` (failed attempts) and
`gateway.pipeline.record` (the served one).
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.errors import SwitchboardError
from gateway.live.state import RoutingState, deployment_id
from routing.decision import Deployment


@dataclass(slots=True)
class DeploymentUse:
    """One attempt on one deployment, from `request_started` to exactly one `end`."""

    deployment: Deployment
    dep_id: str
    routing: RoutingState
    started_s: float
    ended: bool = False
    sharers: int = 1  # requests in flight on the deployment once this one started, itself included
    pending: int = 0  # its prompt tokens, counted as pending prefill on the deployment until the first token
    cached: int = 0  # the prompt tokens before them it expects cached there (their attention is counted too)
    prompt: int = 0  # the whole prompt, cached tokens included: in flight there until the end
    predicted_ttft_ms: float = 0.0  # routing's prediction for it here (0: none); measured / this -> lateness

    @classmethod
    def begin(
        cls,
        dep: Deployment,
        public_model: str,
        routing: RoutingState,
        now_s: float,
        prompt_tokens: int = 0,
        predicted_ttft_ms: float = 0.0,
        cached_tokens: int = 0,
    ) -> DeploymentUse:
        dep_id = deployment_id(public_model, dep.backend)
        routing.stats.request_started(dep_id, prompt_tokens, cached_tokens)
        sharers = max(1, routing.stats.in_flight_of(dep_id))
        return cls(dep, dep_id, routing, now_s, sharers=sharers, pending=prompt_tokens, cached=cached_tokens,
                   prompt=prompt_tokens + cached_tokens, predicted_ttft_ms=predicted_ttft_ms)  # fmt: skip

    def prefilled(self) -> None:
        """The first token came: the prompt no longer waits ahead of new requests on the deployment."""
        if self.pending and not self.ended:
            self.routing.stats.prefill_done(self.dep_id, self.pending, self.cached)
        self.pending = 0

    def finish(
        self,
        *,
        ok: bool,
        counted: bool,
        now_s: float,
        ttft_ms: float | None = None,
        completion_tokens: int = 0,
    ) -> None:
        """`counted=False` (the client left, or the request itself was at fault) frees the slot and leaves
        the stats and the breaker untouched."""
        if self.ended:
            return
        self.ended = True
        routing = self.routing
        routing.stats.request_finished(self.dep_id, self.pending, self.cached, self.prompt)
        if not counted:
            routing.breakers.release(self.dep_id, now_s)
            return
        routing.stats.observe_request(
            self.dep_id,
            now_s=now_s,
            ok=ok,
            latency_ms=(now_s - self.started_s) * 1000,
            ttft_ms=ttft_ms,
            completion_tokens=completion_tokens,
            predicted_ttft_ms=self.predicted_ttft_ms,
        )
        if ok:
            routing.breakers.record_success(self.dep_id, now_s)
        else:
            routing.breakers.record_failure(self.dep_id, now_s)

    def fail(self, err: SwitchboardError, now_s: float) -> None:
        self.finish(ok=False, counted=err.retryable, now_s=now_s)
