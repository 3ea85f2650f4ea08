"""Whatever raises at whichever pipeline step, the request leaves one ledger row and gives back its holds.

The pipeline runs for real (planner, gate over the in-process limiter, cache, dispatcher, record sink) over a
scripted backend; each case makes one step raise and then checks: exactly one row, the concurrency lease
released, the budget reservation settled, and the deployment's in-flight count back to zero.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest

from backends.base import BackendKind, ChatRequest, StreamChunk, Usage
from gateway.cache.policy import CacheStep
from gateway.cache.store import MemoryCache
from gateway.config import parse_config
from gateway.errors import ServiceUnavailable
from gateway.limits.gate import Gate
from gateway.limits.memory import MemoryLimiter
from gateway.live.state import RoutingState, build_specs
from gateway.metrics import GatewayMetrics
from gateway.pipeline.access import ModelAccess
from gateway.pipeline.dispatch import Dispatcher, RetrySettings
from gateway.pipeline.flow import Pipeline
from gateway.pipeline.plan import Planner
from gateway.pipeline.record import RecordSink
from gateway.pipeline.request import GatewayRequest, Timing
from gateway.records import KeyIdentity, RequestStatus, UsageRecord
from routing.decision import Deployment, Price
from tests.support.scripted import ScriptedBackend


class Boom(RuntimeError):
    pass


class Keys:
    async def team_models(self, team: str) -> frozenset[str] | None:
        return None  # every model


class Ledger:
    def __init__(self) -> None:
        self.rows: list[UsageRecord] = []

    def record(self, rec: UsageRecord) -> None:
        self.rows.append(rec)


class Rig:
    def __init__(self) -> None:
        config = parse_config(
            {
                "backends": {"b0": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                "models": {"m": {"backend": "b0", "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"}},
                "teams": {
                    "t": {
                        "limits": {"max_concurrent": 1, "requests": 100},
                        "budgets": [{"period": "day", "usd": "5"}],
                    }
                },
            }
        )
        self.backend = ScriptedBackend("b0", "ok")
        dep = Deployment("m", "b0", BackendKind.OPENAI, "m", Price(Decimal(1), Decimal(1)))
        self.routing = RoutingState(config, build_specs(config, {"b0": self.backend}, {"m": (dep,)}))
        self.store = MemoryLimiter()
        self.gate = Gate(self.store, config)
        self.ledger = Ledger()
        access = ModelAccess(Keys(), ["m"], admin_key=None, admin_key_env="X")  # type: ignore[arg-type]
        dispatcher = Dispatcher({"b0": self.backend}, {}, self.routing, RetrySettings(5.0, 0.0, 1.0))
        sink = RecordSink(self.ledger, GatewayMetrics())  # type: ignore[arg-type]
        self.pipeline = Pipeline(
            Planner(self.routing, access), self.gate, CacheStep(config, MemoryCache()), dispatcher, sink
        )

    def request(self, *, stream: bool) -> GatewayRequest:
        identity = KeyIdentity("k1", "t", "sk-sb-x", None, None, False)
        call = ChatRequest(
            model="m", messages=({"role": "user", "content": "hi"},), request_id="r1", temperature=0
        )
        return GatewayRequest("test", call, identity, dt.datetime.now(dt.UTC), stream=stream)

    async def run(self, *, stream: bool) -> None:
        timing = Timing(0.0, "r1")
        if not stream:
            await self.pipeline.complete(self.request(stream=False), timing)
            return
        chunks = await self.pipeline.open_stream(self.request(stream=True), timing)
        try:
            async for _ in chunks:
                pass
        finally:
            await chunks.aclose()

    async def check_settled(self) -> UsageRecord:
        await self.gate.aclose()  # waits for the settlement tasks
        assert len(self.ledger.rows) == 1, self.ledger.rows
        assert all(not leases for leases in self.store._leases.values()), "concurrency lease still held"
        assert all(cell.reserved == 0 for cell in self.store._budgets.values()), "budget still reserved"
        assert self.routing.stats.in_flight_of("m@b0") == 0
        return self.ledger.rows[0]


def _raise(exc: BaseException) -> Callable[..., Any]:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return boom


def _raise_async(exc: BaseException) -> Callable[..., Any]:
    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return boom


def _stream_failing_after_first(exc: BaseException) -> Callable[[ChatRequest], AsyncIterator[StreamChunk]]:
    async def stream(request: ChatRequest) -> AsyncIterator[StreamChunk]:
        yield StreamChunk(delta={"content": "partial"})
        raise exc

    return stream


FAULTS: dict[str, Callable[[Rig], None]] = {
    "plan": lambda r: setattr(r.pipeline.planner, "route", _raise_async(Boom())),
    "admit": lambda r: setattr(r.gate.store, "admit", _raise_async(Boom())),
    "cache_key": lambda r: setattr(
        r.pipeline.cache, "plan", _raise(TypeError("Integer exceeds 64-bit range"))
    ),
    "cache_get": lambda r: setattr(r.pipeline.cache, "get", _raise_async(Boom())),
    "reserve": lambda r: setattr(r.gate.store, "reserve_budget", _raise_async(Boom())),
    "backend": lambda r: setattr(r.backend, "complete", _raise_async(Boom())),
    "backend_cancelled": lambda r: setattr(r.backend, "complete", _raise_async(asyncio.CancelledError())),
    "cache_put": lambda r: setattr(r.pipeline.cache, "put", _raise_async(Boom())),
    "stream_open": lambda r: setattr(r.backend, "stream", _raise(Boom())),
    "stream_mid": lambda r: setattr(r.backend, "stream", _stream_failing_after_first(Boom())),
}
STREAMED = {"stream_open", "stream_mid"}


@pytest.mark.parametrize("step", sorted(FAULTS))
async def test_a_failure_at_any_step_still_settles_and_records_once(step: str) -> None:
    rig = Rig()
    FAULTS[step](rig)
    with pytest.raises((Boom, TypeError, asyncio.CancelledError)):
        await rig.run(stream=step in STREAMED)
    row = await rig.check_settled()
    if step == "backend_cancelled":
        assert row.status is RequestStatus.CLIENT_CLOSED and row.http_status == 499
    elif step == "cache_put":
        assert row.status is RequestStatus.OK  # the answer was complete when the cache failed
    else:
        assert row.status is RequestStatus.ERROR and row.http_status == 500


@pytest.mark.parametrize("stream", [False, True])
async def test_without_faults_the_same_checks_hold(stream: bool) -> None:
    rig = Rig()
    await rig.run(stream=stream)
    row = await rig.check_settled()
    assert row.status is RequestStatus.OK and row.completion_tokens == 1 and row.cost_micro_usd > 0
    assert row.stream is stream
    assert rig.backend.calls == ["m"]
    assert Usage(1, 1).total_tokens == row.prompt_tokens + row.completion_tokens


@pytest.mark.parametrize("cached", [False, True])
async def test_a_delivery_failure_is_the_rows_status_and_not_the_backends_fault(cached: bool) -> None:
    """The translator's own work on a whole answer (render, keep a Responses object) runs before the row is
    written: when it fails, the row carries the status the client gets, the tokens and cost the backend
    produced are still charged, and the deployment's breaker counts a success, not a failure."""
    rig = Rig()
    if cached:
        await rig.run(stream=False)  # the first answer fills the cache
        await rig.gate.aclose()
        rig.ledger.rows.clear()

    async def deliver(answer: Any) -> None:
        assert answer.chat.usage.completion_tokens == 1
        raise ServiceUnavailable("the Responses store is unreachable")

    with pytest.raises(ServiceUnavailable):
        await rig.pipeline.complete(rig.request(stream=False), Timing(0.0, "r1"), deliver)
    row = await rig.check_settled()
    assert (row.status, row.http_status) == (RequestStatus.ERROR, 503)
    assert row.completion_tokens == 1 and row.cache_hit is cached
    assert (row.cost_micro_usd == 0) if cached else (row.cost_micro_usd > 0)
    assert rig.routing.breakers.view("m@b0", 0.0).consecutive_failures == 0
    assert rig.backend.calls == ["m"]  # the cached case: one call, from the first request
