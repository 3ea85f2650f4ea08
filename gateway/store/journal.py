"""The ledger's local journal: each usage row is on disk before its response is sent.

`append` is one `os.write` of a JSON line to an O_APPEND segment file: in the page cache it survives a killed
process; `sync`, run every `fsync_interval_s`, fdatasyncs what is new (a group commit), after which it also
survives a machine crash. A row stays pending in its segment until the ledger writer has it elsewhere for good
(inserted, or in the fsynced spill file); a segment is retired at `segment_bytes` or once nothing in it is
pending, and deleted when its last row is released. A journal lives in a slot `<dir>/<tag>-<k>/`, held by a
flock on `<slot>/lock` while its process lives: a process takes the first free slot and replays what a dead
one left there, and adopts (locks, replays, empties) any other free slot. Replays are idempotent (inserts skip
request ids already present). `tag` names the database, so journals of two databases never mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

log = logging.getLogger(__name__)

_MAX_SLOTS = 1024
_TIDY_S = 0.5  # how often segments are retired and deleted when fdatasync is off
_SUFFIX = ".jsonl"


def journal_tag(url: str, schema: str | None) -> str:
    """A short name for the database (password left out), so slots of different databases never mix."""
    safe = sa.make_url(url).set(password=None).render_as_string(hide_password=False)
    return hashlib.sha256(f"{safe}\0{schema or ''}".encode()).hexdigest()[:12]


@dataclass(slots=True, eq=False)
class Segment:
    """One journal file; `pending` rows in it are not yet committed anywhere else."""

    path: Path
    fd: int
    size: int = 0
    synced: int = 0
    pending: int = 0


class Journal:
    """Append-only row journal of one process; event-loop use only, except `replay` (one thread at a time)."""

    def __init__(self, directory: str, *, tag: str, segment_bytes: int, fsync_interval_s: float) -> None:
        self._root = Path(directory)
        self._tag = tag
        self._segment_bytes = segment_bytes
        self._fsync_interval_s = fsync_interval_s
        self._slot: Path | None = None
        self._lock_fd: int | None = None
        self._current: Segment | None = None
        self._retired: list[Segment] = []
        self._next = 0
        self._dir_dirty = False  # a segment was created since the last sync
        self._leftovers: list[Path] = []  # segments a dead process left in our slot
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failed = 0  # rows that could not be appended (they were kept in memory only)

    @property
    def slot(self) -> Path | None:
        return self._slot

    def start(self) -> None:
        """Take a free slot, open a fresh segment and start the sync task. Raises OSError if it cannot."""
        try:
            self._open_slot()
        except OSError as exc:
            raise OSError(
                f"cannot open the usage journal in {self._root}: {exc} (config: database.journal_dir)"
            ) from exc
        if self._leftovers:
            log.warning(
                "usage ledger: replaying %d journal segments left in %s", len(self._leftovers), self._slot
            )
        self._task = asyncio.create_task(self._sync_loop(), name="ledger-journal")

    def _open_slot(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        for k in range(_MAX_SLOTS):
            slot = self._root / f"{self._tag}-{k}"
            lock_fd = _try_lock(slot)
            if lock_fd is not None:
                break
        else:
            raise OSError(
                f"no free journal slot among {_MAX_SLOTS} in {self._root} (config: database.journal_dir)"
            )
        self._slot, self._lock_fd = slot, lock_fd
        self._leftovers = _segments(slot)
        self._next = int(self._leftovers[-1].stem) + 1 if self._leftovers else 0
        self._current = self._new_segment()
        _fsync_dir(self._root)

    def append(self, line: bytes) -> Segment | None:
        """Write one row's line; returns its segment (to `release` later), or None if it is not on disk."""
        seg = self._current
        if seg is None:
            self.failed += 1
            return None
        data = line + b"\n"
        try:
            done = os.write(seg.fd, data)
            while done < len(data):  # a regular file writes short only on ENOSPC or a signal
                done += os.write(seg.fd, data[done:])
        except OSError as exc:
            self.failed += 1
            log.error(
                "usage ledger: cannot append to the journal %s (%s); rows kept in memory", seg.path, exc
            )
            self._retire()  # a torn line must not prefix the next one; sync opens a new segment
            return None
        seg.size += len(data)
        seg.pending += 1
        if seg.size >= self._segment_bytes:
            self._retire()
            self._open_current()
        return seg

    def release(self, seg: Segment) -> None:
        """One row of `seg` is committed elsewhere (database, spill or rejected file)."""
        seg.pending -= 1

    async def sync(self, *, reopen: bool = True) -> None:
        """Retire a fully committed current segment, delete released ones, fdatasync what is new."""
        cur = self._current
        if cur is not None and cur.pending == 0 and cur.size > 0:
            self._retire()
        if self._current is None and reopen:
            self._open_current()
        for seg in [s for s in self._retired if s.pending == 0]:
            self._retired.remove(seg)
            os.close(seg.fd)
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()
        if self._fsync_interval_s <= 0:
            return
        todo = [(s, s.size) for s in (*self._retired, self._current) if s is not None and s.synced < s.size]
        sync_dir, self._dir_dirty = self._dir_dirty, False
        if not todo and not sync_dir:
            return
        try:
            await asyncio.to_thread(_fdatasync, [s.fd for s, _ in todo], self._slot if sync_dir else None)
        except OSError as exc:
            log.error("usage ledger: journal fdatasync failed (%s); rows survive a process crash only", exc)
            self._dir_dirty = self._dir_dirty or sync_dir
            return
        for seg, size in todo:
            seg.synced = max(seg.synced, size)

    async def aclose(self, timeout_s: float) -> None:
        """Stop syncing, delete committed segments, keep (fdatasynced) the rest for the next start, unlock."""
        if self._task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            log.error(
                "usage ledger: journal sync is stuck; leaving %s as it is for the next start", self._slot
            )
            return  # its thread may still use the fds: leave them open
        self._retire()
        await self.sync(reopen=False)
        kept = self._retired
        for seg in kept:
            os.close(seg.fd)
        self._retired = []
        if kept:
            log.warning(
                "usage ledger: %d journal segments in %s kept for the next start", len(kept), self._slot
            )
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the slot
            self._lock_fd = None

    def replay(self, replay_file: Callable[[Path], int]) -> int:
        """Replay our slot's leftovers, then every other free slot's segments; each file is deleted once
        `replay_file` returned. Runs in a worker thread; an exception leaves the remaining files."""
        count = 0
        while self._leftovers:
            count += replay_file(self._leftovers[0])
            self._leftovers.pop(0).unlink()
        for slot in sorted(self._root.glob(f"{self._tag}-*")):
            if slot == self._slot or not _segments(slot):
                continue
            lock_fd = _try_lock(slot)
            if lock_fd is None:
                continue  # a live process owns it
            try:
                for path in _segments(slot):
                    log.warning("usage ledger: adopting journal segment %s of a dead process", path)
                    count += replay_file(path)
                    path.unlink()
            finally:
                os.close(lock_fd)
        return count

    async def _sync_loop(self) -> None:
        interval_s = self._fsync_interval_s if self._fsync_interval_s > 0 else _TIDY_S
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):  # not wait_for: no task of its own on 3.11
                    await self._stop.wait()
            try:
                await self.sync()
            except OSError as exc:  # e.g. a segment that cannot be deleted: try again next time
                log.error("usage ledger: journal upkeep failed in %s (%s)", self._slot, exc)

    def _retire(self) -> None:
        if self._current is not None:
            self._retired.append(self._current)
            self._current = None

    def _open_current(self) -> None:
        try:
            self._current = self._new_segment()
        except OSError as exc:
            log.error("usage ledger: cannot open a journal segment in %s (%s)", self._slot, exc)

    def _new_segment(self) -> Segment:
        assert self._slot is not None
        path = self._slot / f"{self._next:016d}{_SUFFIX}"
        self._next += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._dir_dirty = True
        return Segment(path, fd)


def _segments(slot: Path) -> list[Path]:
    return sorted(p for p in slot.glob(f"*{_SUFFIX}") if p.stem.isdigit())


def _try_lock(slot: Path) -> int | None:
    """An fd holding the slot's exclusive lock, or None when another process holds it."""
    slot.mkdir(exist_ok=True)
    fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _fdatasync(fds: list[int], directory: Path | None) -> None:
    for fd in fds:
        os.fdatasync(fd)
    if directory is not None:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
