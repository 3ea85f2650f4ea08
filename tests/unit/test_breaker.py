"""CircuitBreaker state machine, driven by explicit times; BreakerBoard snapshots."""

from __future__ import annotations

import pytest

from gateway.live.breaker import BreakerBoard, BreakerPolicy, BreakerState, BreakerView, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def breaker(probes: int = 1, max_open_s: float | None = 40.0) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=3, window_s=10.0, open_s=5.0, half_open_probes=probes, max_open_s=max_open_s
    )


def trip(b: CircuitBreaker, at_s: float) -> None:
    for _ in range(3):
        b.record_failure(at_s)
    assert b.state(at_s) is OPEN


def test_opens_after_threshold_consecutive_failures() -> None:
    b = breaker()
    b.record_failure(0.0)
    b.record_failure(1.0)
    assert b.state(1.0) is CLOSED and b.allow(1.0)
    b.record_failure(2.0)
    assert b.state(2.0) is OPEN
    assert not b.allow(2.0)


def test_a_success_resets_the_count() -> None:
    b = breaker()
    for t in range(10):
        b.record_failure(float(t))
        b.record_failure(float(t))
        b.record_success(float(t))
    assert b.state(10.0) is CLOSED


def test_failures_spread_wider_than_the_window_do_not_open() -> None:
    b = breaker()
    for t in (0.0, 6.0, 12.0, 18.0):  # each three-failure run spans 12 s > window 10 s
        b.record_failure(t)
    assert b.state(18.0) is CLOSED
    b.record_failure(19.0)  # 12, 18, 19: within 10 s
    assert b.state(19.0) is OPEN


def test_rejects_while_open_then_half_opens() -> None:
    b = breaker()
    trip(b, 100.0)
    assert not any(b.allow(t) for t in (100.0, 102.0, 104.99))
    assert b.state(105.0) is HALF_OPEN


def test_half_open_admits_only_the_probe_limit() -> None:
    b = breaker(probes=2)
    trip(b, 0.0)
    assert [b.allow(5.0) for _ in range(4)] == [True, True, False, False]
    b.release(5.5)  # one probe ended without a verdict
    assert b.allow(5.5) and not b.allow(5.5)


def test_probe_success_closes_and_resets_backoff() -> None:
    b = breaker()
    trip(b, 0.0)
    assert b.allow(5.0)
    b.record_success(5.2)
    assert b.state(5.2) is CLOSED and b.allow(5.2)
    trip(b, 6.0)
    assert b.view(6.0).open_until_s == 11.0  # back to open_s, not doubled


def test_probe_failure_reopens_with_doubled_time_up_to_cap() -> None:
    b = breaker(max_open_s=40.0)
    trip(b, 0.0)
    now, periods = 0.0, []
    for _ in range(6):
        until = b.view(now).open_until_s
        assert until is not None
        periods.append(until - now)
        now = until
        assert b.allow(now)
        b.record_failure(now)
        assert b.state(now) is OPEN
    assert periods == [5.0, 10.0, 20.0, 40.0, 40.0, 40.0]


def test_default_cap_is_sixteen_times_open_s() -> None:
    b = breaker(max_open_s=None)
    trip(b, 0.0)
    now = 0.0
    for _ in range(8):
        until = b.view(now).open_until_s
        assert until is not None
        now = until
        b.allow(now)
        b.record_failure(now)
    assert b.view(now).open_until_s == now + 80.0


def test_outcomes_reported_while_open_are_ignored() -> None:
    b = breaker()
    trip(b, 0.0)
    b.record_success(1.0)  # a request from before the trip
    b.record_failure(2.0)
    assert b.state(4.9) is OPEN and b.view(4.9).open_until_s == 5.0


def test_lost_probes_are_presumed_gone_after_an_open_period() -> None:
    b = breaker()
    trip(b, 0.0)
    assert b.allow(5.0)  # this probe never reports back
    assert not b.allow(9.9)
    assert b.allow(10.0)


def test_view_reports_routing_facts() -> None:
    b = breaker(probes=2)
    b.record_failure(0.0)
    assert b.view(0.0) == BreakerView(CLOSED, 1, None, 0)
    b.record_failure(0.0)
    b.record_failure(0.0)
    assert b.view(1.0) == BreakerView(OPEN, 0, 5.0, 0)
    b.allow(5.0)
    assert b.view(5.0) == BreakerView(HALF_OPEN, 0, None, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"half_open_probes": 0},
        {"window_s": 0.0},
        {"open_s": 0.0},
        {"max_open_s": 1.0},
    ],
)
def test_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    args = {"failure_threshold": 3, "window_s": 10.0, "open_s": 5.0, "half_open_probes": 1} | kwargs
    with pytest.raises(ValueError):
        CircuitBreaker(**args)  # type: ignore[arg-type]


def test_board_keeps_one_breaker_per_deployment() -> None:
    board = BreakerBoard(["a", "b"], BreakerPolicy(failure_threshold=2, open_s=5.0))
    board.record_failure("a", 0.0)
    board.record_failure("a", 0.1)
    assert not board.allow("a", 1.0) and board.allow("b", 1.0)
    board.record_failure("late", 1.0)  # an id not known up front gets its own breaker
    snap = board.snapshot(1.0)
    assert {name: v.state for name, v in snap.items()} == {"a": OPEN, "b": CLOSED, "late": CLOSED}
    assert snap["late"].consecutive_failures == 1
    with pytest.raises(TypeError):
        snap["a"] = snap["b"]  # type: ignore[index]
    assert board.snapshot(5.1)["a"].state is HALF_OPEN
    assert board.allow("a", 5.1)
    board.record_success("a", 5.2)
    assert board.snapshot(5.2)["a"].state is CLOSED


def test_board_checks_its_policy_up_front() -> None:
    with pytest.raises(ValueError):
        BreakerBoard([], BreakerPolicy(failure_threshold=0))
