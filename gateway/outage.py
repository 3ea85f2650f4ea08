"""Back-off for a shared store (Redis) that may go away, used by the response cache and the limiter.

After a failed call the store is not called for `retry_after_s`, so an outage costs one timeout, not one per
request. A lone timeout is not an outage (a busy event loop can delay one reply): only `timeouts_to_trip`
timeouts in a row are; a refused or broken connection is one at once. One warning per outage, one info line on
recovery; what skipping means (a miss, fail open or closed) is the caller's. Time comes from the clock
given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable


class OutageGuard:
    def __init__(
        self,
        log: logging.Logger,
        name: str,
        *,
        retry_after_s: float,
        clock: Callable[[], float],
        while_down: str,
        when_back: str,
        timeouts_to_trip: int = 3,
    ) -> None:
        self._log, self._name, self.retry_after_s, self._clock = log, name, retry_after_s, clock
        self._while_down, self._when_back = while_down, when_back
        self.timeouts_to_trip = timeouts_to_trip
        self._timeouts = 0  # consecutive timeouts so far
        self._down_until: float | None = None  # set while an outage is known: no calls until then

    @property
    def skipping(self) -> bool:
        return self._down_until is not None and self._clock() < self._down_until

    def failed(self, what: str, exc: BaseException) -> None:
        if _is_timeout(exc) and self._down_until is None:
            self._timeouts += 1
            if self._timeouts < self.timeouts_to_trip:
                self._log.info("%s: Redis %s timed out (%d in a row)", self._name, what, self._timeouts)
                return
        if self._down_until is None:
            self._log.warning(
                "%s: Redis %s failed (%s); %s, retrying every %gs",
                self._name,
                what,
                type(exc).__name__,
                self._while_down,
                self.retry_after_s,
            )
        self._down_until = self._clock() + self.retry_after_s

    def succeeded(self) -> None:
        self._timeouts = 0
        if self._down_until is not None:
            self._log.info("%s: Redis is back; %s", self._name, self._when_back)
            self._down_until = None


def _is_timeout(exc: BaseException) -> bool:
    """asyncio's TimeoutError, or a client library's own (redis-py's is not a builtin subclass)."""
    return any(cls.__name__ == "TimeoutError" for cls in type(exc).__mro__)
