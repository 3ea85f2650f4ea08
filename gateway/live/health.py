"""Health probes of backends (e.g. a llama.cpp server or Ollama at a site): `Backend.health` on a timer.

A backend failing `FAILURES_TO_DOWN` probes in a row leaves routing (`RoutingState.mark_down`: its
deployments are rejected as `unhealthy`, a transient reason, so requests get 503 rather than a lower tier)
until one probe succeeds. One failure is not enough: a busy server may miss one probe. Transitions are
logged once each; a probe that raises never ends the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from backends.base import Backend, BackendHealth
from gateway.background import cancel_and_wait
from gateway.live.state import RoutingState

log = logging.getLogger(__name__)

FAILURES_TO_DOWN = 2


class HealthProber:
    def __init__(
        self, backends: Mapping[str, Backend], intervals_s: Mapping[str, float], routing: RoutingState
    ):
        self._backends = backends
        self._intervals_s = dict(intervals_s)
        self._routing = routing
        self._failures = dict.fromkeys(self._intervals_s, 0)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for name, every_s in self._intervals_s.items():
            self._tasks.append(asyncio.create_task(self._run(name, every_s), name=f"health probe {name}"))

    async def probe_once(self, name: str, timeout_s: float) -> BackendHealth:
        try:
            async with asyncio.timeout(timeout_s):
                health = await self._backends[name].health()
        except TimeoutError:
            health = BackendHealth(ok=False, detail=f"no answer within {timeout_s:g} s")
        self.observe(name, health)
        return health

    def observe(self, name: str, health: BackendHealth) -> None:
        if health.ok:
            self._failures[name] = 0
            if self._routing.mark_up(name):
                log.info("backend %s passes its health probe again; back in routing", name)
            return
        self._failures[name] = self._failures.get(name, 0) + 1
        if self._failures[name] >= FAILURES_TO_DOWN and self._routing.mark_down(name):
            log.warning(
                "backend %s failed %d health probes in a row (%s); out of routing until one passes "
                "(config: backends.%s.health_interval_s)",
                name,
                self._failures[name],
                health.detail,
                name,
            )

    async def _run(self, name: str, every_s: float) -> None:
        while True:
            try:
                await self.probe_once(name, timeout_s=min(max(every_s, 1.0), 10.0))
            except Exception:  # noqa: BLE001 - a background loop, like the metrics poller: log, keep probing
                log.exception("health probe of backend %s failed", name)
            await asyncio.sleep(every_s)

    async def aclose(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks.clear()
