"""One batch item through the shared pipeline, exactly as an interactive request of its endpoint would go.

The endpoint's translator parses the line's body and renders the answer (or the error, in its API's
envelope); the pipeline applies model access, privacy floors, routing, limits, budgets and the cache, and
writes the item's one ledger row, tagged with the batch id and priced at batch prices. The outcome is the
line of the output file (`status_code` 200) or of the error file (any other status), in OpenAI's batch
format: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. A retryable
refusal (a rate limit, an unavailable upstream) is tried again later, up to batch.max_attempts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson

from backends.base import ChatRequest
from backends.errors import SwitchboardError
from gateway.batch.placement import Placer
from gateway.errors import BudgetExceeded, RateLimited, ServiceUnavailable
from gateway.pipeline.flow import Answer, Pipeline
from gateway.pipeline.request import GatewayRequest, RequestContext, Timing
from gateway.records import KeyIdentity
from gateway.store.batches import Item
from gateway.store.responses import ResponseStore


class BatchTranslator(Protocol):
    """The part of an endpoint's translator (gateway/translate/) a batch item uses."""

    endpoint: str
    path: str

    def parse(self, raw: bytes) -> Any: ...

    def to_request(self, body: Any, ctx: RequestContext) -> GatewayRequest: ...

    def render(self, answer: Answer, body: Any, request: GatewayRequest) -> bytes: ...

    def error_body(self, exc: SwitchboardError) -> bytes: ...


class Verdict(StrEnum):
    DONE = "done"  # the output file gets its line
    FAILED = "failed"  # the error file gets its line
    RETRY = "retry"  # a retryable refusal: run it again later
    WAIT = "wait"  # self-hosted capacity is busy: not run, its attempt given back


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    result: dict[str, Any] | None = None
    backend: str | None = None


def result_line(custom_id: str, request_id: str, status: int, body: Any) -> dict[str, Any]:
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


def _retryable(exc: SwitchboardError) -> bool:
    if isinstance(exc, BudgetExceeded):
        return False  # spent: the remaining items fail with insufficient_quota
    return exc.retryable or isinstance(exc, RateLimited | ServiceUnavailable)


class ItemRunner:
    def __init__(
        self,
        pipeline: Pipeline,
        translators: Mapping[str, BatchTranslator],
        placer: Placer,
        responses: ResponseStore,
        *,
        timeout_s: float,
        max_attempts: int,
    ) -> None:
        self._pipeline, self._translators, self._placer = pipeline, translators, placer
        self._responses, self._timeout_s, self._max_attempts = responses, timeout_s, max_attempts

    async def run(
        self, item: Item, *, endpoint: str, batch_id: str, identity: KeyIdentity, spill: bool
    ) -> Outcome:
        translator = self._translators[endpoint]
        request_id = uuid.uuid4().hex
        timing = Timing(time.perf_counter(), request_id)
        try:
            body = translator.parse(orjson.dumps(item.body))
            ctx = RequestContext(identity, request_id, dt.datetime.now(dt.UTC), timeout_s=self._timeout_s)
            prepare = getattr(translator, "prepare", None)
            if prepare is not None:
                body = await prepare(body, ctx, self._responses)
            request = dataclasses.replace(translator.to_request(body, ctx), batch_id=batch_id)
            if isinstance(request.call, ChatRequest):  # a self-hosted engine runs it behind interactive work
                request = dataclasses.replace(request, call=dataclasses.replace(request.call, batch=True))
            placement = self._placer.place(request, spill=spill, now_s=self._pipeline.clock.now_s())
            if placement is None:
                return Outcome(Verdict.WAIT)
            request = dataclasses.replace(request, placement=placement)
            after = getattr(translator, "after", None)
            out: list[Any] = []

            async def deliver(answer: Answer) -> None:  # in the pipeline: the row says what the line says
                if after is not None:
                    await after(answer, body, request)
                out.append(orjson.loads(translator.render(answer, body, request)))

            answer = await self._pipeline.complete(request, timing, deliver)
            rendered = out[0]
            served = dict(answer.headers).get(b"x-switchboard-backend", b"").decode() or None
            return Outcome(Verdict.DONE, result_line(item.custom_id, request_id, 200, rendered), served)
        except SwitchboardError as exc:
            if _retryable(exc) and item.attempts < self._max_attempts:
                return Outcome(Verdict.RETRY)
            error = orjson.loads(translator.error_body(exc))
            return Outcome(Verdict.FAILED, result_line(item.custom_id, request_id, exc.status_code, error))
