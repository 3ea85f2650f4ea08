"""`BatchService`: create, read, list and cancel a team's batches (the HTTP edge and the CLI call it).

Invariants: a batch belongs to the team of the key that created it, and its items run as that key; another
team's batch, like another team's input file, is a 404 exactly like one that never existed. Creating a
batch only records it (`validating`): the worker reads its file. Cancelling is a state change the workers
act on (`cancelling` -> `cancelled`), so it works whichever replica holds the items.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from gateway.config import BatchConfig
from gateway.errors import InvalidRequest, NotFound
from gateway.files.batch_lines import BATCH_URLS
from gateway.files.service import FileService
from gateway.records import KeyIdentity
from gateway.store.batches import BatchStore, Counts, StoredBatch, batch_wire

WINDOWS = ("24h",)
MAX_METADATA = 16
MAX_ID_CHARS = 64
CANCELLABLE = ("validating", "in_progress")


def check_metadata(metadata: object) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA:
        raise InvalidRequest(
            f"`metadata` must be an object of at most {MAX_METADATA} string pairs", param="metadata"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise InvalidRequest(
                "`metadata` keys must be strings of at most 64 characters and values strings of at most 512",
                param="metadata",
            )
    return dict(metadata)


def _not_found(batch_id: str) -> NotFound:
    shown = f"`{batch_id}`" if len(batch_id) <= MAX_ID_CHARS else "with that id"
    return NotFound(f"no batch {shown} for this key's team", param="batch_id")


class BatchService:
    def __init__(self, store: BatchStore, files: FileService, config: BatchConfig) -> None:
        self._store, self._files, self._config = store, files, config

    async def create(
        self, body: Mapping[str, Any], identity: KeyIdentity, now: dt.datetime
    ) -> dict[str, Any]:
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"})
        if unknown:
            raise InvalidRequest(f"unknown parameter `{unknown[0][:64]}`", param=unknown[0][:64])
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_URLS:
            raise InvalidRequest(f"`endpoint` must be one of: {', '.join(BATCH_URLS)}", param="endpoint")
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise InvalidRequest(
                f"`completion_window` must be one of: {', '.join(WINDOWS)}", param="completion_window"
            )
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidRequest("missing required parameter `input_file_id`", param="input_file_id")
        stored = await self._files.get(file_id, identity.team)
        if stored.purpose != "batch":
            raise InvalidRequest(
                f"file `{file_id}` has purpose `{stored.purpose}`; a batch reads a file uploaded with "
                'purpose="batch"',
                param="input_file_id",
            )
        batch = StoredBatch(
            id="batch_" + uuid.uuid4().hex,
            team=identity.team,
            key_id=identity.key_id or None,
            endpoint=endpoint,
            input_file_id=file_id,
            completion_window=window,
            status="validating",
            metadata=check_metadata(body.get("metadata")),
            errors=None,
            output_file_id=None,
            error_file_id=None,
            created_at=now,
            expires_at=now + dt.timedelta(seconds=self._config.window_s),
        )
        await self._store.run(self._store.add, batch)
        return batch_wire(batch, Counts())

    async def _get(self, batch_id: str, team: str | None) -> StoredBatch:
        found = None
        if len(batch_id) <= MAX_ID_CHARS:
            found = await self._store.run(self._store.get, batch_id, team)
        if found is None:
            raise _not_found(batch_id)
        return found

    async def get(self, batch_id: str, team: str | None) -> dict[str, Any]:
        """The batch as OpenAI's `Batch` (team None: any team's, for the operator)."""
        batch = await self._get(batch_id, team)
        counts = await self._store.run(self._store.counts, [batch.id])
        return batch_wire(batch, counts[batch.id])

    async def page(self, team: str | None, *, limit: int, after: str | None) -> dict[str, Any]:
        cursor = None if after is None else await self._get(after, team)
        found, more = await self._store.run(self._store.page, team, limit, cursor)
        counts = await self._store.run(self._store.counts, [b.id for b in found])
        data = [batch_wire(b, counts[b.id]) for b in found]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    async def cancel(self, batch_id: str, team: str | None, now: dt.datetime) -> dict[str, Any]:
        batch = await self._get(batch_id, team)
        if batch.status not in (*CANCELLABLE, "cancelling", "cancelled"):
            raise InvalidRequest(
                f"batch `{batch.id}` is {batch.status}; only a validating or in-progress batch can be "
                "cancelled",
                param="batch_id",
            )
        await self._store.run(
            self._store.update, batch.id, CANCELLABLE, {"status": "cancelling", "cancelling_at": now}
        )
        return await self.get(batch.id, team)
