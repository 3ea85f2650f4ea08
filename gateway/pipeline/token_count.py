"""Counting a request's prompt tokens without serving it (`POST /v1/messages/count_tokens`).

The request is planned as the pipeline plans it (model access, privacy floor, labels, routing) and the
top-ranked deployment's backend counts it with the model's own tokenizer when it can (`TokenCounter`), under
the deployment's upstream model name. Nothing else of the pipeline runs: no admission, cache or ledger row,
and no live stats or breaker outcome. The prompt goes only where the request itself may go; when no
deployment may serve it, or its backend cannot count, the caller falls back to its estimate (None here).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from backends.base import Backend, ChatRequest, TokenCounter
from backends.errors import BackendError, loggable_detail
from gateway.pipeline.plan import Planner
from gateway.pipeline.request import GatewayRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenCount:
    input_tokens: int
    backend: str  # whose tokenizer counted


async def count_prompt_tokens(
    planner: Planner, backends: Mapping[str, Backend], request: GatewayRequest, *, now_s: float
) -> TokenCount | None:
    """The routed backend's count, or None. Raises what planning raises (access, bad hints, sensitive data
    under `on_sensitive = block`); a backend's failure only means no count."""
    routed = await planner.route(request, now_s=now_s)
    call = request.call
    if not isinstance(call, ChatRequest) or not routed.decision.candidates:
        return None
    dep = routed.decision.candidates[0]
    backend = backends.get(dep.backend)
    if not isinstance(backend, TokenCounter):
        return None
    try:
        count = await backend.count_tokens(dataclasses.replace(call, model=dep.upstream_model))
    except BackendError as exc:
        log.warning(
            "request %s: backend %s could not count tokens (%s)%s",
            call.request_id,
            dep.backend,
            exc.code,
            f": {loggable_detail(exc.detail)}" if exc.detail else "",
        )
        return None
    return None if count is None else TokenCount(count, dep.backend)
