"""The batch worker: one per replica, it validates new batches, runs their items and finalizes them.

Every step is a lease in SQL (gateway/store/batches.py), so any number of replicas share the work and a
replica killed mid-batch loses nothing: its item leases expire (batch.lease_s; renewed while an item runs)
and another worker runs those items again; a result is kept only under a live lease, so each custom_id
gets one line. A restart resumes whatever is active: state lives in SQL only. Lifecycle:
validating -> in_progress -> finalizing -> completed; cancelling -> cancelled (running items finish, the
rest never run); past the window, items not yet run fail with `batch_expired` and the batch is expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from backends.errors import SwitchboardError
from gateway.background import cancel_and_wait
from gateway.batch.execute import ItemRunner, Outcome, Verdict, result_line
from gateway.batch.files import read_input, write_results
from gateway.config import BatchConfig
from gateway.errors import AuthenticationFailed, NotFound
from gateway.files.service import FileService
from gateway.records import KeyIdentity
from gateway.store.batches import ACTIVE, BatchStore, Counts, Item, StoredBatch
from gateway.store.keys import check_usable, identity_of

log = logging.getLogger(__name__)
IDENTITY_TTL_S = 5.0  # a revoked key stops its batch's items within this
GAUGES_EVERY_S = 2.0
MAX_BACKOFF_S = 30.0
_STATE = {Verdict.DONE: "done", Verdict.FAILED: "failed", Verdict.RETRY: "queued", Verdict.WAIT: "queued"}


def _expired_entry(custom_id: str | None) -> dict[str, Any]:
    message = "the batch's completion window ended before this request ran"
    return {"id": "batch_req_expired", "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired", "message": message}}  # fmt: skip


class BatchWorker:
    def __init__(
        self,
        store: BatchStore,
        files: FileService,
        runner: ItemRunner,
        config: BatchConfig,
        *,
        owner: str,
        utcnow: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._store, self._files, self._runner, self._config = store, files, runner, config
        self.owner, self._utcnow = owner, utcnow
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._identities: dict[str, tuple[KeyIdentity | None, float]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._gauges_at = -1e18
        self.queued = self.running = 0  # items of active batches, all replicas (for /metrics)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def aclose(self) -> None:
        """Stop claiming; items still running are cancelled and their leases left to expire elsewhere."""
        await cancel_and_wait(self._loop_task)
        await cancel_and_wait(self._renew_task)
        for task in list(self._tasks.values()):
            await cancel_and_wait(task)

    def _lease(self, now: dt.datetime) -> dt.datetime:
        return now + dt.timedelta(seconds=self._config.lease_s)

    async def _loop(self) -> None:
        failures = 0  # in a row: the wait doubles, so an outage costs a few log lines, not one a poll
        while True:
            try:
                busy = await self.tick()
                failures = 0
            except SwitchboardError as exc:  # the database is away: try again later
                log.warning("batch worker: %s", exc)
                busy, failures = False, failures + 1
            except Exception:  # noqa: BLE001 - the worker's top level: log, keep serving batches
                log.exception("batch worker: unexpected error; retrying")
                busy, failures = False, failures + 1
            self._wake.clear()
            if not busy or len(self._tasks) >= self._config.concurrency:
                wait_s = min(MAX_BACKOFF_S, self._config.poll_s * 2 ** min(failures, 10))
                try:
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.lease_s / 3)
            if self._tasks:
                try:
                    await self._store.run(
                        self._store.renew, self.owner, list(self._tasks), self._lease(self._utcnow())
                    )
                except SwitchboardError as exc:
                    log.warning("batch worker: lease renewal failed: %s", exc)

    async def tick(self) -> bool:
        """One pass over the active batches; True when it claimed items (there may be more at once)."""
        store, now = self._store, self._utcnow()
        await self._refresh_gauges()
        active = await store.run(store.with_status, ACTIVE)
        if not active:
            return False
        for batch in active:
            if batch.status == "validating":
                await self._validate(batch, now)
        counts = await store.run(store.counts, [b.id for b in active])
        runnable = []
        for batch in active:
            c = counts[batch.id]
            if batch.status == "cancelling":
                await self._cancel(batch, now)
            elif batch.status == "finalizing":
                await self._finalize(batch, "completed", now)
            elif batch.status == "in_progress":
                if now >= batch.expires_at:
                    await self._expire(batch, now)
                elif c.queued + c.running == 0:
                    await self._finalize(batch, "expired" if batch.expired_at else "completed", now)
                else:
                    runnable.append(batch)
        return await self._claim(runnable, now)

    async def _refresh_gauges(self) -> None:
        if time.monotonic() - self._gauges_at < GAUGES_EVERY_S:
            return
        self._gauges_at = time.monotonic()
        found = await self._store.run(self._store.item_gauges)
        self.queued, self.running = found.get("queued", 0), found.get("running", 0)

    async def _validate(self, batch: StoredBatch, now: dt.datetime) -> None:
        store = self._store
        if not await store.run(store.lease_batch, batch.id, self.owner, now, self._lease(now)):
            return
        try:
            await read_input(store, self._files, batch)
        except NotFound:  # the input file was deleted before the batch read it
            error = {"code": "invalid_file", "message": f"input file `{batch.input_file_id}` was deleted "
                     "before the batch read it", "param": "input_file_id", "line": None}  # fmt: skip
            failed = {"status": "failed", "failed_at": self._utcnow(), "errors": [error], "lease_until": None}
            await store.run(store.update, batch.id, ["validating"], failed)
            return
        await store.run(
            store.update,
            batch.id,
            ["validating"],
            {
                "status": "in_progress",
                "in_progress_at": self._utcnow(),
                "lease_owner": None,
                "lease_until": None,
            },
        )

    async def _cancel(self, batch: StoredBatch, now: dt.datetime) -> None:
        store = self._store
        await store.run(store.stop_items, batch.id, "cancelled", None)
        c = (await store.run(store.counts, [batch.id]))[batch.id]
        if c.queued + c.running == 0:
            await self._finalize(batch, "cancelled", now)

    async def _expire(self, batch: StoredBatch, now: dt.datetime) -> None:
        store = self._store
        if batch.expired_at is None:
            await store.run(store.update, batch.id, ["in_progress"], {"expired_at": now})
        await store.run(store.stop_items, batch.id, "failed", _expired_entry)
        c = (await store.run(store.counts, [batch.id]))[batch.id]
        if c.queued + c.running == 0:
            await self._finalize(batch, "expired", now)

    async def _finalize(self, batch: StoredBatch, final: str, now: dt.datetime) -> None:
        store = self._store
        if not await store.run(store.lease_batch, batch.id, self.owner, now, self._lease(now)):
            return
        if final == "completed":
            started = {"status": "finalizing", "finalizing_at": batch.finalizing_at or now}
            await store.run(store.update, batch.id, ["in_progress", "finalizing"], started)
        c: Counts = (await store.run(store.counts, [batch.id]))[batch.id]
        out, err = await write_results(
            store, self._files, batch, has_output=c.completed > 0, has_errors=c.failed > 0
        )
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        values: dict[str, Any] = {
            stamp: getattr(batch, stamp) or self._utcnow(),
            "status": final,
            "output_file_id": out,
            "error_file_id": err,
            "lease_owner": None,
            "lease_until": None,
        }
        await store.run(store.update, batch.id, ["in_progress", "finalizing", "cancelling"], values)
        log.info("batch %s %s: %d answered, %d failed of %d", batch.id, final, c.completed, c.failed, c.total)

    async def _claim(self, runnable: list[StoredBatch], now: dt.datetime) -> bool:
        free = min(self._config.concurrency - len(self._tasks), self._config.claim_size)
        if not runnable or free <= 0:
            return False
        store = self._store
        by_id = {b.id: b for b in runnable}
        items = await store.run(store.claim, self.owner, list(by_id), free, now, self._lease(now))
        for item in items:
            key = (item.batch_id, item.line)
            self._tasks[key] = asyncio.get_running_loop().create_task(self._run(by_id[item.batch_id], item))
        return bool(items)

    async def _identity(self, batch: StoredBatch) -> KeyIdentity | None:
        if batch.key_id is None:
            return None
        cached = self._identities.get(batch.key_id)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        found = await self._store.run(identity_of, self._store.engine, batch.key_id)
        self._identities[batch.key_id] = (found, time.monotonic() + IDENTITY_TTL_S)
        return found

    async def _run(self, batch: StoredBatch, item: Item) -> None:
        key = (item.batch_id, item.line)
        try:
            outcome = await self._outcome(batch, item)
            state = _STATE[outcome.verdict]
            give_back = outcome.verdict is Verdict.WAIT
            pause_s = self._config.poll_s * (2**item.attempts if outcome.verdict is Verdict.RETRY else 1)
            not_before = self._utcnow() + dt.timedelta(seconds=pause_s) if state == "queued" else None
            kept = await self._store.run(
                self._store.finish_item, item, self.owner, state, outcome.result, outcome.backend, give_back,
                not_before,
            )  # fmt: skip
            if not kept:
                log.warning("batch %s line %d: lease lost; another worker runs it", item.batch_id, item.line)
        except SwitchboardError as exc:
            log.warning(
                "batch %s line %d: not recorded (%s); its lease will expire", batch.id, item.line, exc
            )
        finally:
            self._tasks.pop(key, None)
            self._wake.set()

    async def _outcome(self, batch: StoredBatch, item: Item) -> Outcome:
        identity = await self._identity(batch)
        try:
            if identity is None:
                raise AuthenticationFailed("the key that created this batch no longer exists")
            check_usable(identity, now=self._utcnow())
        except AuthenticationFailed as exc:
            body = {"error": {"message": str(exc), "type": exc.openai_type, "param": None, "code": exc.code}}
            return Outcome(Verdict.FAILED, result_line(item.custom_id, "", exc.status_code, body))
        spill = self._utcnow() >= batch.expires_at - dt.timedelta(seconds=self._config.spill_slack_s)
        return await self._runner.run(
            item, endpoint=batch.endpoint, batch_id=batch.id, identity=identity, spill=spill
        )
