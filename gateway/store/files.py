"""`/v1/files` metadata in SQL: which team owns which file, its name, size, purpose and storage key.

Invariants: every read, listing and delete is scoped to the caller's team, so another team's id reads as
absent; a listing pages by (created_at, id), newest first unless asked otherwise, so a page boundary never
skips or repeats a file. Sync SQL runs on worker threads; a database that does not answer is a 503.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import SQLAlchemyError

from gateway.errors import ServiceUnavailable
from gateway.store.db import files

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    team: str
    key_id: str | None
    created_at: dt.datetime
    bytes: int
    filename: str
    purpose: str
    status: str
    storage_key: str
    lines: int | None = None  # JSONL: non-blank lines
    invalid_lines: int | None = None  # lines that are no valid batch request (they become error entries)

    def wire(self) -> dict[str, Any]:
        """OpenAI's `File` object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "expires_at": None,
            "status_details": None,
        }


@dataclass(frozen=True, slots=True)
class FilePage:
    files: Sequence[StoredFile]
    has_more: bool


def _row(row: RowMapping) -> StoredFile:
    return StoredFile(**{name: row[name] for name in StoredFile.__slots__})


class FileStore:
    """The `files` table."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("file metadata store: %s", type(exc).__name__)
            raise ServiceUnavailable(
                "the file metadata store (the gateway's database) did not answer; retry later (see /readyz)"
            ) from None

    async def add(self, stored: StoredFile) -> None:
        await self._run(self._insert, stored)

    async def get(self, file_id: str, team: str) -> StoredFile | None:
        return await self._run(self._select, file_id, team)

    async def remove(self, file_id: str, team: str) -> bool:
        return await self._run(self._delete, file_id, team)

    async def page(
        self,
        team: str,
        *,
        limit: int,
        order: Literal["asc", "desc"] = "desc",
        after: StoredFile | None = None,
        purpose: str | None = None,
    ) -> FilePage:
        return await self._run(self._page, team, limit, order, after, purpose)

    def _insert(self, stored: StoredFile) -> None:
        values = {name: getattr(stored, name) for name in StoredFile.__slots__}
        with self._engine.begin() as conn:
            conn.execute(files.insert().values(**values))

    def _select(self, file_id: str, team: str) -> StoredFile | None:
        query = sa.select(files).where(files.c.id == file_id, files.c.team == team)
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _row(row)

    def _delete(self, file_id: str, team: str) -> bool:
        query = files.delete().where(files.c.id == file_id, files.c.team == team)
        with self._engine.begin() as conn:
            return bool(conn.execute(query).rowcount)

    def _page(
        self, team: str, limit: int, order: str, after: StoredFile | None, purpose: str | None
    ) -> FilePage:
        query = sa.select(files).where(files.c.team == team)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        position = sa.tuple_(files.c.created_at, files.c.id)
        if after is not None:
            cursor = sa.tuple_(sa.literal(after.created_at, files.c.created_at.type), sa.literal(after.id))
            query = query.where(position < cursor if order == "desc" else position > cursor)
        if order == "desc":
            query = query.order_by(files.c.created_at.desc(), files.c.id.desc())
        else:
            query = query.order_by(files.c.created_at.asc(), files.c.id.asc())
        with self._engine.connect() as conn:
            rows = conn.execute(query.limit(limit + 1)).mappings().all()
        return FilePage([_row(r) for r in rows[:limit]], has_more=len(rows) > limit)
