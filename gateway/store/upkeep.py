"""The gateway's background rollup: every `reports.rollup_interval_s`, bring the hourly rollups up to date;
when `reports.retention_days` is set, prune raw ledger rows older than that (rollups are kept).

Runs in a worker thread so the event loop never waits on SQL. Several replicas may run it at once: `Rollup`
takes a lock (PostgreSQL) or a write transaction (SQLite), and a run is idempotent. Failures are logged once
per streak and retried next interval; the ledger itself is never touched except by `prune`.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.background import cancel_and_wait
from gateway.config import ReportsConfig
from gateway.store.rollups import Rollup

log = logging.getLogger(__name__)

_PRUNE_EVERY_S = 3600.0


class RollupJob:
    def __init__(self, engine: Engine, config: ReportsConfig) -> None:
        self._rollup = Rollup(engine)
        self._config = config
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.runs = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="rollup")

    async def _loop(self) -> None:
        since_prune_s = _PRUNE_EVERY_S  # prune on the first round too
        interval_s = self._config.rollup_interval_s
        while True:
            await asyncio.sleep(interval_s)
            since_prune_s += interval_s
            prune = self._config.retention_days is not None and since_prune_s >= _PRUNE_EVERY_S
            try:
                await asyncio.to_thread(self.run_once, prune)
            except (SQLAlchemyError, OSError) as exc:
                if not self._failing:
                    name = type(exc).__name__
                    log.warning("usage rollup failed (%s); retrying every %gs", name, interval_s)
                self._failing = True
                continue
            if prune:
                since_prune_s = 0.0
            if self._failing:
                log.info("usage rollup works again")
            self._failing = False

    def run_once(self, prune: bool = False) -> None:
        result = self._rollup.run_once()
        self.runs += 1
        if result.hours_recomputed:
            log.debug("rollup: %d hours recomputed in %.2f s", result.hours_recomputed, result.elapsed_s)
        if prune and self._config.retention_days is not None:
            pruned = self._rollup.prune(self._config.retention_days)
            if pruned:
                log.info("pruned %d ledger rows older than %d days", pruned, self._config.retention_days)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
