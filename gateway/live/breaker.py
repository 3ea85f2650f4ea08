"""Circuit breakers, one per deployment: stop sending to a backend that keeps failing, then probe it.

closed --(failure_threshold failures in a row, all within window_s)--> open --(open for open_s)--> half_open
half_open --(a probe succeeds)--> closed; half_open --(a probe fails)--> open, twice as long (<= max_open_s)
Callers record only failures that say the backend is unwell (retryable errors, timeouts), never a 400
caused by the request. Every method takes `now_s`; nothing reads a clock. Leaving `open` happens lazily when
the time is next looked at, so an idle breaker costs nothing. Not thread-safe: use it from the event loop.
Shared (several replicas): `force_open` follows another replica's trip; until `hold_until_s` that replica
probes and this one neither probes nor counts outcomes; `release_forced` follows its probe's success.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

MAX_OPEN_FACTOR = 16  # default cap on backoff: open_s doubled four times


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5
    window_s: float = 30.0
    open_s: float = 5.0
    half_open_probes: int = 1
    max_open_s: float | None = None  # None: open_s * MAX_OPEN_FACTOR


@dataclass(frozen=True, slots=True)
class BreakerView:
    """What routing needs: may this deployment get traffic now, and how much."""

    state: BreakerState
    consecutive_failures: int
    open_until_s: float | None  # when state is open
    probes_available: int  # half-open slots free now; 0 unless half_open
    shared: bool = False  # this open (or half-open) period follows another replica's trip


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        window_s: float,
        open_s: float,
        half_open_probes: int,
        max_open_s: float | None = None,
    ) -> None:
        cap = open_s * MAX_OPEN_FACTOR if max_open_s is None else max_open_s
        if failure_threshold < 1 or half_open_probes < 1:
            raise ValueError("failure_threshold and half_open_probes must be at least 1")
        if window_s <= 0 or open_s <= 0 or cap < open_s:
            raise ValueError(
                f"need window_s > 0 and 0 < open_s <= max_open_s, got {window_s}, {open_s}, {cap}"
            )
        self._threshold = failure_threshold
        self._window_s = window_s
        self._base_open_s = open_s
        self._max_open_s = cap
        self._probe_limit = half_open_probes
        self._failures: deque[float] = deque(maxlen=failure_threshold)  # since the last success
        self._state = BreakerState.CLOSED
        self._open_s = open_s  # length of the current (or next) open period
        self._open_until_s = 0.0
        self._probes = 0  # probes granted and not yet reported
        self._last_probe_s = 0.0
        self._forced = False  # the current trip is another replica's (`force_open`), not ours
        self._hold_until_s = 0.0  # while forced: that replica probes until then, we wait

    @classmethod
    def from_policy(cls, policy: BreakerPolicy) -> CircuitBreaker:
        return cls(
            failure_threshold=policy.failure_threshold,
            window_s=policy.window_s,
            open_s=policy.open_s,
            half_open_probes=policy.half_open_probes,
            max_open_s=policy.max_open_s,
        )

    def state(self, now_s: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now_s >= self._open_until_s:
            self._state = BreakerState.HALF_OPEN
            self._probes = 0
        return self._state

    def allow(self, now_s: float) -> bool:
        """May a request go now? In half_open a True reserves a probe slot: report its outcome."""
        state = self.state(now_s)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._holding(now_s):
            return False
        if self._probes >= self._probe_limit and now_s - self._last_probe_s >= self._open_s:
            self._probes = 0  # probes silent for a whole open period are presumed lost (cancelled requests)
        if self._probes >= self._probe_limit:
            return False
        self._probes += 1
        self._last_probe_s = now_s
        return True

    def release(self, now_s: float) -> None:
        """A request let through by `allow` ended with no verdict (client gone): free its probe slot."""
        if self.state(now_s) is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def record_success(self, now_s: float) -> None:
        state = self.state(now_s)
        if state is BreakerState.OPEN or self._holding(now_s):
            return  # a request from before the trip; the probe decides
        self._failures.clear()
        if state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._open_s = self._base_open_s
            self._probes = 0
            self._forced = False

    def record_failure(self, now_s: float) -> None:
        state = self.state(now_s)
        if state is BreakerState.OPEN or self._holding(now_s):
            return
        if state is BreakerState.HALF_OPEN:
            self._open_s = min(self._open_s * 2, self._max_open_s)
            self._trip(now_s)
            return
        self._failures.append(now_s)
        if len(self._failures) == self._threshold and now_s - self._failures[0] <= self._window_s:
            self._trip(now_s)

    def _trip(self, now_s: float) -> None:
        self._state = BreakerState.OPEN
        self._open_until_s = now_s + self._open_s
        self._failures.clear()
        self._probes = 0
        self._forced = False

    def _holding(self, now_s: float) -> bool:
        """Half-open on another replica's trip, whose own probe is still due: do not probe here too."""
        return self._forced and now_s < self._hold_until_s and self.state(now_s) is BreakerState.HALF_OPEN

    def force_open(self, until_s: float, *, hold_until_s: float, now_s: float) -> bool:
        """Another replica tripped: stay open until `until_s`, then leave probing to it until `hold_until_s`.

        Ignored (False) while our own trip (open or half-open) lasts at least as long: of two replicas that
        both tripped, the later trip leads and the other follows, so they never wait on each other.
        """
        state = self.state(now_s)
        if not self._forced and state is not BreakerState.CLOSED and self._open_until_s >= until_s:
            return False
        self._state = BreakerState.OPEN
        self._open_until_s = until_s
        self._hold_until_s = max(hold_until_s, until_s)
        self._forced = True
        self._failures.clear()
        self._probes = 0
        self.state(now_s)  # an `until_s` already past means half-open (holding) now
        return True

    def release_forced(self, now_s: float) -> bool:
        """The replica whose trip we follow closed its breaker (its probe succeeded): close ours too.
        A trip of our own since then is kept (False)."""
        if not self._forced or self.state(now_s) is BreakerState.CLOSED:
            return False
        self._state = BreakerState.CLOSED
        self._forced = False
        self._failures.clear()
        self._probes = 0
        return True

    def own_trip(self, now_s: float) -> float | None:
        """`open_until_s` of our own current trip (open, or half-open and not yet closed by a probe); None
        when closed or following another replica."""
        if self._forced or self.state(now_s) is BreakerState.CLOSED:
            return None
        return self._open_until_s

    def view(self, now_s: float) -> BreakerView:
        state = self.state(now_s)
        return BreakerView(
            state=state,
            consecutive_failures=len(self._failures),
            open_until_s=self._open_until_s if state is BreakerState.OPEN else None,
            probes_available=max(0, self._probe_limit - self._probes)
            if state is BreakerState.HALF_OPEN and not self._holding(now_s)
            else 0,
            shared=self._forced and state is not BreakerState.CLOSED,
        )


class BreakerBoard:
    """One breaker per deployment id, all with the same policy. An id not given up front gets a breaker the
    first time it is used, so a deployment added later is never refused for lack of one."""

    def __init__(self, deployment_ids: Iterable[str], policy: BreakerPolicy = BreakerPolicy()) -> None:
        self._policy = policy
        CircuitBreaker.from_policy(policy)  # check the policy now, not on first use
        self._breakers = {name: CircuitBreaker.from_policy(policy) for name in deployment_ids}

    def __getitem__(self, deployment_id: str) -> CircuitBreaker:
        breaker = self._breakers.get(deployment_id)
        if breaker is None:
            breaker = self._breakers[deployment_id] = CircuitBreaker.from_policy(self._policy)
        return breaker

    def allow(self, deployment_id: str, now_s: float) -> bool:
        return self[deployment_id].allow(now_s)

    def view(self, deployment_id: str, now_s: float) -> BreakerView:
        return self[deployment_id].view(now_s)

    def forget(self, deployment_id: str) -> None:
        """Drop a gone deployment's breaker (an edge node that left); a later use starts a fresh one."""
        self._breakers.pop(deployment_id, None)

    def record_success(self, deployment_id: str, now_s: float) -> None:
        self[deployment_id].record_success(now_s)

    def record_failure(self, deployment_id: str, now_s: float) -> None:
        self[deployment_id].record_failure(now_s)

    def release(self, deployment_id: str, now_s: float) -> None:
        self[deployment_id].release(now_s)

    def force_open(self, deployment_id: str, until_s: float, *, hold_until_s: float, now_s: float) -> bool:
        return self[deployment_id].force_open(until_s, hold_until_s=hold_until_s, now_s=now_s)

    def release_forced(self, deployment_id: str, now_s: float) -> bool:
        return self[deployment_id].release_forced(now_s)

    def own_trips(self, now_s: float) -> Mapping[str, float]:
        """Deployment id -> `open_until_s` of each trip this replica made itself and has not closed yet."""
        trips = {name: b.own_trip(now_s) for name, b in self._breakers.items()}
        return MappingProxyType({name: until for name, until in trips.items() if until is not None})

    def snapshot(self, now_s: float) -> Mapping[str, BreakerView]:
        return MappingProxyType({name: b.view(now_s) for name, b in self._breakers.items()})
