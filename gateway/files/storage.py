"""Where uploaded files' bytes live: the `FileStorage` seam, and its embedded default, a local directory.

Invariants: `put` streams (it holds one write buffer, never the whole file) and an object appears under its
key only whole: the bytes go to a hidden `.part` file that is renamed into place after an fsync, and a failed
or refused upload (the source iterator raising) leaves nothing behind. Keys are names the gateway made
(`file-<hex>`), never client input. Storage failures are 503s that name the setting to check.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Protocol, TypeVar

from gateway.errors import ServiceUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
WRITE_BYTES = 1 << 20  # chunks are gathered into writes of about this size
READ_BYTES = 1 << 20  # and read back in pieces of this size
_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")


class FileStorage(Protocol):
    """A flat namespace of immutable objects, written and read as streams."""

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Store what `chunks` yields under `key`; returns the byte count. If `chunks` raises, nothing is
        stored and its exception propagates unchanged."""
        ...

    async def get(self, key: str) -> AsyncIterator[bytes]:
        """Open `key` (a missing object raises here, before any byte) and return its bytes as a stream."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key`; a missing object is not an error."""
        ...

    async def aclose(self) -> None: ...


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"storage key {key!r} is not a plain name")
    return key


class LocalStorage:
    """Objects as files in one directory (config: files.local_dir), created at the first upload. Several
    replicas need a directory they all mount, or files.storage = "s3"."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._dir = Path(directory)

    def _path(self, key: str) -> Path:
        return self._dir / check_key(key)

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> ServiceUnavailable:
        reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        log.warning("local file storage: %s", reason)
        return ServiceUnavailable(
            f"the file storage directory could not be used ({reason}); check files.local_dir "
            "(it must be writable and have room)"
        )

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        path = self._path(key)
        part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        await self._io(path.parent.mkdir, 0o700, True, True)
        handle: IO[bytes] = await self._io(open, part, "xb")
        size = 0
        try:
            pending = bytearray()
            async for chunk in chunks:
                pending += chunk
                size += len(chunk)
                if len(pending) >= WRITE_BYTES:
                    await self._io(handle.write, pending)
                    pending.clear()
            await self._io(handle.write, pending)
            await self._io(_sync_and_close, handle)
            await self._io(os.replace, part, path)
        except BaseException:
            handle.close()
            part.unlink(missing_ok=True)
            raise
        return size

    async def get(self, key: str) -> AsyncIterator[bytes]:
        try:
            handle: IO[bytes] = await asyncio.to_thread(open, self._path(key), "rb")
        except FileNotFoundError:
            log.warning("local file storage: an object with metadata is missing")
            raise ServiceUnavailable(
                "this file's content is not in this replica's file storage (files.local_dir); replicas "
                'that share the database need a shared directory or files.storage = "s3"'
            ) from None
        except OSError as exc:
            raise self._failed(exc) from None
        return self._read(handle)

    async def _read(self, handle: IO[bytes]) -> AsyncIterator[bytes]:
        try:
            while piece := await self._io(handle.read, READ_BYTES):
                yield piece
        finally:
            handle.close()

    async def delete(self, key: str) -> None:
        await self._io(self._path(key).unlink, True)

    async def aclose(self) -> None:
        return None


def _sync_and_close(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
