"""`/v1/batches` state in SQL: batches, and one item per input line with its lease and its result.

Invariants: an item is run only under a lease (`lease_owner`, `lease_until`) taken by a conditional UPDATE,
so two workers never hold one item at once; on PostgreSQL the candidates are picked with `FOR UPDATE SKIP
LOCKED`, so replicas claim disjoint chunks without waiting on each other. A result is kept only if its worker
still holds the lease (`finish_item`), and `(batch_id, line)` is the key: each line, hence each `custom_id`,
has at most one result. A batch's validation and finalization take a lease on the batch row the same way.
Reads are scoped to the caller's team. Sync SQL runs on worker threads; a database that does not answer is
a 503 at the HTTP edge and a retry later for the worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import SQLAlchemyError

from gateway.errors import ServiceUnavailable
from gateway.store.db import batch_items, batches

log = logging.getLogger(__name__)
T = TypeVar("T")

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
PENDING = ("queued", "running")  # an item without its result yet
_STAMPS = (
    "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoredBatch:
    id: str
    team: str
    key_id: str | None
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: dt.datetime
    expires_at: dt.datetime
    in_progress_at: dt.datetime | None = None
    finalizing_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    failed_at: dt.datetime | None = None
    expired_at: dt.datetime | None = None
    cancelling_at: dt.datetime | None = None
    cancelled_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    queued: int = 0
    running: int = 0

    def wire(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}


@dataclass(frozen=True, slots=True)
class Item:
    """A claimed item: one line to run."""

    batch_id: str
    line: int
    custom_id: str
    body: dict[str, Any]
    attempts: int


def batch_wire(b: StoredBatch, counts: Counts) -> dict[str, Any]:
    """OpenAI's `Batch` object."""

    def ts(value: dt.datetime | None) -> int | None:
        return None if value is None else int(value.timestamp())

    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": None if not b.errors else {"object": "list", "data": b.errors},
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": ts(b.created_at),
        "expires_at": ts(b.expires_at),
        **{name: ts(getattr(b, name)) for name in _STAMPS},
        "request_counts": counts.wire(),
        "metadata": b.metadata,
    }


def _batch(row: RowMapping) -> StoredBatch:
    return StoredBatch(**{name: row[name] for name in StoredBatch.__slots__})


def _free(now: dt.datetime) -> sa.ColumnElement[bool]:
    """An item nobody holds: queued (and not told to wait), or running under a lease that expired (its
    replica died)."""
    c = batch_items.c
    return sa.and_(c.state.in_(PENDING), sa.or_(c.lease_until.is_(None), c.lease_until < now))


def _insert(engine: Engine, table: sa.Table) -> Any:
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


class BatchStore:
    """The `batches` and `batch_items` tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("batch store: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "the batch store (the gateway's database) did not answer; retry later (see /readyz)"
            ) from None

    # ---- batches ------------------------------------------------------------------------------------

    def add(self, b: StoredBatch) -> None:
        with self.engine.begin() as conn:
            conn.execute(batches.insert().values(**{n: getattr(b, n) for n in StoredBatch.__slots__}))

    def get(self, batch_id: str, team: str | None) -> StoredBatch | None:
        query = sa.select(batches).where(batches.c.id == batch_id)
        if team is not None:
            query = query.where(batches.c.team == team)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _batch(row)

    def page(self, team: str | None, limit: int, after: StoredBatch | None) -> tuple[list[StoredBatch], bool]:
        """Newest first, paged by (created_at, id)."""
        query = sa.select(batches)
        if team is not None:
            query = query.where(batches.c.team == team)
        if after is not None:
            position = sa.tuple_(batches.c.created_at, batches.c.id)
            cursor = sa.tuple_(sa.literal(after.created_at, batches.c.created_at.type), sa.literal(after.id))
            query = query.where(position < cursor)
        query = query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_batch(r) for r in rows[:limit]], len(rows) > limit

    def with_status(self, statuses: Sequence[str]) -> list[StoredBatch]:
        query = sa.select(batches).where(batches.c.status.in_(statuses)).order_by(batches.c.created_at)
        with self.engine.connect() as conn:
            return [_batch(r) for r in conn.execute(query).mappings()]

    def counts(self, batch_ids: Sequence[str]) -> dict[str, Counts]:
        if not batch_ids:
            return {}
        query = (
            sa.select(batch_items.c.batch_id, batch_items.c.state, sa.func.count())
            .where(batch_items.c.batch_id.in_(batch_ids))
            .group_by(batch_items.c.batch_id, batch_items.c.state)
        )
        found: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for batch_id, state, n in conn.execute(query):
                found.setdefault(batch_id, {})[state] = int(n)
        out = {}
        for batch_id in batch_ids:
            by = found.get(batch_id, {})
            out[batch_id] = Counts(
                sum(by.values()),
                by.get("done", 0),
                by.get("failed", 0),
                by.get("queued", 0),
                by.get("running", 0),
            )
        return out

    def update(self, batch_id: str, when: Sequence[str] | None, values: dict[str, Any]) -> bool:
        """Set `values` on the batch if its status is one of `when` (None: whatever it is)."""
        query = batches.update().where(batches.c.id == batch_id)
        if when is not None:
            query = query.where(batches.c.status.in_(when))
        with self.engine.begin() as conn:
            return bool(conn.execute(query.values(**values)).rowcount)

    def lease_batch(self, batch_id: str, owner: str, now: dt.datetime, until: dt.datetime) -> bool:
        """Take the batch's own lease (to validate or finalize it) unless a live worker holds it."""
        query = (
            batches.update()
            .where(batches.c.id == batch_id)
            .where(
                sa.or_(
                    batches.c.lease_until.is_(None),
                    batches.c.lease_until < now,
                    batches.c.lease_owner == owner,
                )
            )
            .values(lease_owner=owner, lease_until=until)
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(query).rowcount)

    # ---- items --------------------------------------------------------------------------------------

    def add_items(self, rows: list[dict[str, Any]]) -> None:
        """Idempotent: a line already stored (a validator that died midway) is kept as it is."""
        if rows:
            with self.engine.begin() as conn:
                conn.execute(_insert(self.engine, batch_items), rows)

    def claim(
        self, owner: str, batch_ids: Sequence[str], n: int, now: dt.datetime, until: dt.datetime
    ) -> list[Item]:
        """Lease up to `n` free items of these batches (oldest lines first)."""
        if not batch_ids or n <= 0:
            return []
        c = batch_items.c
        pick = (
            sa.select(c.batch_id, c.line)
            .where(c.batch_id.in_(batch_ids), _free(now))
            .order_by(c.batch_id, c.line)
            .limit(n)
        )
        if self.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        claimed: list[Item] = []
        with self.engine.begin() as conn:
            for batch_id, line in conn.execute(pick).all():
                # Conditional: on SQLite (no row locks) another worker may have taken it since the select.
                took = conn.execute(
                    batch_items.update()
                    .where(c.batch_id == batch_id, c.line == line, _free(now))
                    .values(state="running", lease_owner=owner, lease_until=until, attempts=c.attempts + 1)
                    .returning(c.custom_id, c.body, c.attempts)
                ).first()
                if took is not None:
                    claimed.append(Item(batch_id, line, took.custom_id, took.body, took.attempts))
        return claimed

    def renew(self, owner: str, keys: Iterable[tuple[str, int]], until: dt.datetime) -> None:
        c = batch_items.c
        with self.engine.begin() as conn:
            for batch_id, line in keys:
                conn.execute(
                    batch_items.update()
                    .where(
                        c.batch_id == batch_id, c.line == line, c.lease_owner == owner, c.state == "running"
                    )
                    .values(lease_until=until)
                )

    def finish_item(
        self,
        item: Item,
        owner: str,
        state: str,
        result: dict[str, Any] | None,
        backend: str | None,
        give_back: bool = False,
        not_before: dt.datetime | None = None,
    ) -> bool:
        """Keep the item's result (state done | failed), or put it back (state queued: to be run again, not
        before `not_before`; `give_back`: it was not run, so the attempt does not count). False: the lease
        was lost, so another worker owns the item now."""
        c = batch_items.c
        values: dict[str, Any] = {"state": state, "lease_owner": None, "lease_until": None}
        if state == "queued":
            values["lease_until"] = not_before
            if give_back:
                values["attempts"] = c.attempts - 1
        else:
            values.update(result=result, body=None, backend=backend)
        query = batch_items.update().where(
            c.batch_id == item.batch_id, c.line == item.line, c.lease_owner == owner, c.state == "running"
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(query.values(**values)).rowcount)

    def stop_items(
        self, batch_id: str, state: str, result_of: Callable[[str | None], dict[str, Any]] | None
    ) -> None:
        """End every free item of a batch: `cancelled` (no result) or `failed` with `result_of(custom_id)`."""
        c = batch_items.c
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            if result_of is None:
                conn.execute(
                    batch_items.update()
                    .where(c.batch_id == batch_id, _free(now))
                    .values(state=state, body=None, lease_owner=None, lease_until=None)
                )
                return
            rows = conn.execute(
                sa.select(c.line, c.custom_id).where(c.batch_id == batch_id, _free(now))
            ).all()
            for line, custom_id in rows:
                conn.execute(
                    batch_items.update()
                    .where(c.batch_id == batch_id, c.line == line, _free(now))
                    .values(
                        state=state,
                        result=result_of(custom_id),
                        body=None,
                        lease_owner=None,
                        lease_until=None,
                    )
                )

    def results(self, batch_id: str, state: str, after_line: int, limit: int) -> list[tuple[int, Any]]:
        c = batch_items.c
        query = (
            sa.select(c.line, c.result)
            .where(c.batch_id == batch_id, c.state == state, c.line > after_line)
            .order_by(c.line)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(line, result) for line, result in conn.execute(query)]

    def item_gauges(self) -> dict[str, int]:
        """Queued and running items of every active batch (for /metrics)."""
        c = batch_items.c
        query = (
            sa.select(c.state, sa.func.count())
            .where(c.state.in_(PENDING))
            .where(c.batch_id.in_(sa.select(batches.c.id).where(batches.c.status.in_(ACTIVE))))
            .group_by(c.state)
        )
        with self.engine.connect() as conn:
            return {state: int(n) for state, n in conn.execute(query)}
