"""Stored `/v1/responses` answers: the conversation state behind `previous_response_id`, in SQL.

Invariants: every read and delete is scoped to the caller's team, so another team's id reads as absent; a row
older than `responses.retention_days` is never read (the prune job deletes it later); the text kept here is
the only prompt text Switchboard keeps, and it never reaches a log or an error message (failures are logged
by exception type). Sync SQL runs on worker threads; a database that does not answer is a 503.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.background import cancel_and_wait
from gateway.config import ResponsesConfig
from gateway.errors import ServiceUnavailable
from gateway.store.db import responses

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    team: str
    key_id: str | None
    created_at: dt.datetime
    previous_response_id: str | None
    response: Mapping[str, Any]  # the Response object as answered
    input_items: Sequence[Mapping[str, Any]]  # this request's input items, with ids
    history: Sequence[Mapping[str, Any]]  # chat messages: the conversation through this answer


def _unreachable(exc: Exception) -> ServiceUnavailable:
    log.warning("response store: %s", type(exc).__name__)
    return ServiceUnavailable(
        "the response store (the gateway's database) did not answer; retry later (see /readyz)"
    )


class ResponseStore:
    """The `responses` table, with the policy of who may keep what (config: responses.*, teams.*)."""

    def __init__(self, engine: Engine, config: ResponsesConfig, team_allows: Mapping[str, bool]) -> None:
        self._engine, self._config, self._team_allows = engine, config, dict(team_allows)

    @property
    def store_default(self) -> bool:
        return self._config.store_default

    def team_may_store(self, team: str) -> bool:
        """Teams not in the config file (created over the admin API) keep the default: allowed."""
        return self._team_allows.get(team, True)

    def _oldest(self, now: dt.datetime) -> dt.datetime:
        return now - dt.timedelta(days=self._config.retention_days)

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (SQLAlchemyError, OSError) as exc:
            raise _unreachable(exc) from None

    async def save(self, stored: StoredResponse) -> None:
        await self._run(self._insert, stored)

    async def load(self, response_id: str, team: str, *, now: dt.datetime) -> StoredResponse | None:
        found: StoredResponse | None = await self._run(self._select, response_id, team, now)
        return found

    async def delete(self, response_id: str, team: str, *, now: dt.datetime) -> bool:
        deleted: bool = await self._run(self._delete, response_id, team, now)
        return deleted

    def _insert(self, stored: StoredResponse) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                responses.insert().values(
                    id=stored.id,
                    team=stored.team,
                    key_id=stored.key_id,
                    created_at=stored.created_at,
                    previous_response_id=stored.previous_response_id,
                    response=dict(stored.response),
                    input_items=[dict(i) for i in stored.input_items],
                    history=[dict(m) for m in stored.history],
                )
            )

    def _select(self, response_id: str, team: str, now: dt.datetime) -> StoredResponse | None:
        query = sa.select(responses).where(
            responses.c.id == response_id,
            responses.c.team == team,
            responses.c.created_at >= self._oldest(now),
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return StoredResponse(
            id=row["id"],
            team=row["team"],
            key_id=row["key_id"],
            created_at=row["created_at"],
            previous_response_id=row["previous_response_id"],
            response=row["response"],
            input_items=list(row["input_items"]),
            history=list(row["history"]),
        )

    def _delete(self, response_id: str, team: str, now: dt.datetime) -> bool:
        query = responses.delete().where(
            responses.c.id == response_id,
            responses.c.team == team,
            responses.c.created_at >= self._oldest(now),
        )
        with self._engine.begin() as conn:
            return conn.execute(query).rowcount > 0

    def prune(self, now: dt.datetime) -> int:
        """Delete every response older than the retention; returns how many."""
        with self._engine.begin() as conn:
            result = conn.execute(responses.delete().where(responses.c.created_at < self._oldest(now)))
        return int(result.rowcount or 0)


class ResponsePruneJob:
    """Every `responses.prune_interval_s` (and once at start), delete responses past their retention.
    Several replicas may run it at once: a delete of rows already gone deletes nothing."""

    def __init__(self, store: ResponseStore, interval_s: float) -> None:
        self._store, self._interval_s = store, interval_s
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="responses-prune")

    async def _loop(self) -> None:
        while True:
            try:
                pruned = await asyncio.to_thread(self._store.prune, dt.datetime.now(dt.UTC))
            except (SQLAlchemyError, OSError) as exc:
                if not self._failing:
                    log.warning("responses prune failed (%s); retrying", type(exc).__name__)
                self._failing = True
            else:
                self._failing = False
                if pruned:
                    log.info("pruned %d stored responses past responses.retention_days", pruned)
            await asyncio.sleep(self._interval_s)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
