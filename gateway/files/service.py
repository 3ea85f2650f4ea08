"""`FileService`: files per team, their bytes in `FileStorage` and their metadata in SQL (store/files.py).

Invariants: an upload streams through the size limit (files.max_bytes) and the JSONL check into storage,
so no upload is ever held whole in memory; its metadata row is written only after its bytes are stored
whole, and a refused or failed upload leaves neither. Every read and delete is scoped to the caller's team:
another team's file is a 404, exactly like one that never existed.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from gateway.config import FilesConfig
from gateway.errors import InvalidRequest, NotFound, PayloadTooLarge
from gateway.files.jsonl import JsonlCheck
from gateway.files.storage import FileStorage, LocalStorage
from gateway.store.files import FilePage, FileStore, StoredFile

log = logging.getLogger(__name__)
PURPOSES = ("batch",)  # what may be uploaded; `batch_output` files are written by the gateway
MAX_FILENAME_CHARS = 255
MAX_ID_CHARS = 64


@dataclass(frozen=True, slots=True)
class Received:
    """An upload's bytes, stored whole, whose metadata is not yet written."""

    file_id: str
    storage_key: str
    bytes: int
    lines: int
    invalid_lines: int


def build_storage(config: FilesConfig) -> FileStorage:
    if config.storage == "s3":
        assert config.s3 is not None  # FilesConfig checks it
        from gateway.files.s3 import S3Storage

        return S3Storage(config.s3)
    return LocalStorage(config.local_dir)


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"unsupported purpose `{purpose[:32]}`; Switchboard stores files for: {', '.join(PURPOSES)}",
            param="purpose",
        )
    return purpose


def check_filename(filename: str) -> str:
    if not filename or len(filename) > MAX_FILENAME_CHARS:
        raise InvalidRequest(
            f"the file's name must have 1 to {MAX_FILENAME_CHARS} characters (the multipart `filename`)",
            param="file",
        )
    return filename


def _not_found(file_id: str) -> NotFound:
    shown = f"`{file_id}`" if len(file_id) <= MAX_ID_CHARS else "with that id"
    return NotFound(
        f"no file {shown} for this key's team (it was never uploaded, or was deleted)", param="file_id"
    )


class FileService:
    def __init__(self, store: FileStore, storage: FileStorage, config: FilesConfig) -> None:
        self._store, self._storage, self._config = store, storage, config

    @property
    def max_bytes(self) -> int:
        return self._config.max_bytes

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the file is larger than files.max_bytes ({self._config.max_bytes} bytes); split it into "
            "several files, or ask the operator to raise files.max_bytes",
            param="file",
        )

    async def receive(self, content: AsyncIterator[bytes]) -> Received:
        """Stream an upload into storage through the size limit and the JSONL check."""
        file_id = "file-" + uuid.uuid4().hex
        check = JsonlCheck(self._config.max_line_bytes)
        limit = self._config.max_bytes
        size = 0

        async def checked() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in content:
                size += len(chunk)
                if size > limit:
                    raise self.too_large()
                check.feed(chunk)
                yield chunk
            check.finish()

        await self._storage.put(file_id, checked())
        return Received(file_id, file_id, size, check.lines, check.invalid_lines)

    async def register(
        self,
        received: Received,
        *,
        team: str,
        key_id: str | None,
        filename: str,
        purpose: str,
        now: dt.datetime,
    ) -> StoredFile:
        """Write the metadata of a received upload; on failure its bytes are removed."""
        stored = StoredFile(
            id=received.file_id,
            team=team,
            key_id=key_id,
            created_at=now,
            bytes=received.bytes,
            filename=filename,
            purpose=purpose,
            status="processed",
            storage_key=received.storage_key,
            lines=received.lines,
            invalid_lines=received.invalid_lines,
        )
        try:
            await self._store.add(stored)
        except BaseException:
            await self.discard(received)
            raise
        return stored

    async def discard(self, received: Received) -> None:
        await self._storage.delete(received.storage_key)

    async def get(self, file_id: str, team: str) -> StoredFile:
        found = await self._store.get(file_id, team) if len(file_id) <= MAX_ID_CHARS else None
        if found is None:
            raise _not_found(file_id)
        return found

    async def content(self, file_id: str, team: str) -> tuple[StoredFile, AsyncIterator[bytes]]:
        found = await self.get(file_id, team)
        return found, await self._storage.get(found.storage_key)

    async def delete(self, file_id: str, team: str) -> None:
        found = await self.get(file_id, team)
        await self._storage.delete(found.storage_key)  # first: a failure here leaves the file listed
        await self._store.remove(found.id, team)

    async def page(
        self,
        team: str,
        *,
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None,
        purpose: str | None,
    ) -> FilePage:
        cursor = None
        if after is not None:
            cursor = await self._store.get(after, team) if len(after) <= MAX_ID_CHARS else None
            if cursor is None:
                raise InvalidRequest(
                    "`after` names no file of this key's team (pass the last id of the previous page)",
                    param="after",
                )
        return await self._store.page(team, limit=limit, order=order, after=cursor, purpose=purpose)

    async def write(
        self,
        file_id: str,
        chunks: AsyncIterator[bytes],
        *,
        team: str,
        filename: str,
        purpose: str,
        now: dt.datetime,
    ) -> StoredFile:
        """Store a file the gateway wrote (a batch's output or error file) under an id it chose. Idempotent:
        a file already registered under `file_id` is returned as it is."""
        found = await self._store.get(file_id, team)
        if found is not None:
            return found
        size = await self._storage.put(file_id, chunks)
        stored = StoredFile(
            id=file_id,
            team=team,
            key_id=None,
            created_at=now,
            bytes=size,
            filename=filename,
            purpose=purpose,
            status="processed",
            storage_key=file_id,
        )
        await self._store.add(stored)
        return stored

    async def aclose(self) -> None:
        await self._storage.aclose()
