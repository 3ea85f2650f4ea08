"""What the gateway tells an engine of a request's deadline (`with_deadline`): the team's p95 TTFT SLO, else
its end-to-end one, within the range an engine takes; nothing without an SLO."""

from __future__ import annotations

import pytest

from backends.base import DEADLINE_RANGE_MS, ChatRequest
from gateway.pipeline.plan import with_deadline
from routing.snapshot import RoutePolicy

CALL = ChatRequest(model="m", messages=({"role": "user", "content": "hi"},), request_id="r")


@pytest.mark.parametrize(
    ("policy", "sent"),
    [
        (RoutePolicy(slo_p95_ttft_ms=2500, slo_p95_e2e_ms=60_000), 2500.0),
        (RoutePolicy(slo_p95_e2e_ms=60_000), 60_000.0),
        (RoutePolicy(slo_p95_ttft_ms=0.4), DEADLINE_RANGE_MS[0]),  # an engine takes whole milliseconds
        (RoutePolicy(slo_p95_e2e_ms=1e9), DEADLINE_RANGE_MS[1]),
        (RoutePolicy(), None),
    ],
)
def test_the_deadline_sent_is_the_slo_within_what_an_engine_takes(
    policy: RoutePolicy, sent: float | None
) -> None:
    call = with_deadline(CALL, policy)
    assert call.deadline_ms == sent
    assert (call is CALL) == (sent is None)  # no copy without a deadline to add
    assert with_deadline(call, policy) is call  # nor when it already carries it
