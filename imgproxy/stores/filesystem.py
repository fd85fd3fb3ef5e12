"""Images as files in one folder: named by a random token, expired by age, capped in size."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .base import NAME, ImageStore, StoredImage, StoreUnavailable, UnsafeStore

log = logging.getLogger("imgproxy.images")

CHUNK = 256 * 1024
PROBE_BYTES = 4096
# Opening never follows a link, and never blocks on a FIFO planted under an image's name.
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LEFTOVER = re.compile(r"^\.(ready-[0-9a-f]+|.+\.tmp)$")
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def default_directory(env) -> str:
    """A folder of this user's own: never one name shared by every user of the machine."""
    return os.path.join(env.get("TMPDIR") or "/tmp", f"imgproxy-{os.geteuid()}")


class FilesystemImageStore(ImageStore):
    def __init__(
        self, directory: str, ttl: int, operations, *, private: bool = False, max_bytes: int = 0,
        sweep_interval: float = 60, put_timeout: float = 10,
    ) -> None:
        super().__init__(operations, put_timeout)
        self.directory = Path(directory)
        self.ttl = ttl
        # The default folder: must be ours alone (checked whenever it is created or used).
        self.private = private
        self.max_bytes = max_bytes  # 0: no cap
        self.sweep_interval = sweep_interval
        # Stored images oldest first, name -> size, and their total: the cap is kept at every
        # put, not only at sweeps. Rebuilt from the folder at start and at every sweep. Images
        # being written count in `_pending_bytes` but are never evicted (their URLs are not out yet).
        self._index: OrderedDict[str, int] = OrderedDict()
        self.total_bytes = 0
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._sweeper: asyncio.Task | None = None

    # -- the folder ---------------------------------------------------------------------
    def check(self) -> None:
        try:
            self._ensure_directory()
        except OSError as exc:
            raise UnsafeStore("images.directory", f"cannot create {self.directory}: {exc.strerror or exc}") from None

    def _ensure_directory(self) -> bool:
        """Create the folder if it is missing; returns whether it was. Raises UnsafeStore for
        a private folder that someone else owns or others may enter."""
        created = False
        try:
            if self.private:
                os.mkdir(self.directory, 0o700)
            else:
                self.directory.mkdir(parents=True, mode=0o700)
            created = True
        except FileExistsError:
            pass
        if self.private:
            st = os.lstat(self.directory)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeStore("images.directory", f"{self.directory} is not a folder (a link or a file stands there)")
            if st.st_uid != os.geteuid():
                raise UnsafeStore("images.directory", f"{self.directory} belongs to uid {st.st_uid}, not to this user")
            if st.st_mode & 0o077:
                raise UnsafeStore("images.directory", f"{self.directory} is open to others (mode {stat.S_IMODE(st.st_mode):o}); it must be 700")
        return created

    # -- storing ------------------------------------------------------------------------
    async def _put(self, name: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._store, name, data)

    def _store(self, name: str, data: bytes) -> None:
        size = len(data)
        if self.max_bytes and size > self.max_bytes:
            raise StoreUnavailable(f"an image of {size} bytes is larger than images.max_bytes", retryable=False)
        self._reserve(size)
        try:
            try:
                # The private folder is checked at every put: it may have been deleted and made
                # again by someone else.
                if self.private and self._ensure_directory():
                    self._recreated()
                self._write(name, data)
            except FileNotFoundError:  # the folder was deleted: make it again, once
                if self._ensure_directory():
                    self._recreated()
                self._write(name, data)
        except UnsafeStore as exc:
            self._settle(None, size)
            raise StoreUnavailable(exc.problem, retryable=False) from None
        except OSError as exc:
            self._settle(None, size)
            raise StoreUnavailable(f"{self.directory}: {exc.strerror or exc}", retryable=exc.errno in (errno.EINTR, errno.EAGAIN)) from None
        self._settle(name, size)

    def _recreated(self) -> None:
        self.count("recreate", True)
        log.warning("image folder %s was missing and has been recreated", self.directory)

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, _OPEN_NEW, 0o600)
        try:
            with open(fd, "wb", closefd=True) as file:
                file.write(data)
            os.replace(tmp, self.directory / name)  # readers never see half a file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _reserve(self, size: int) -> None:
        """Before writing: count the new image in, deleting the oldest stored ones until the
        total fits the cap."""
        with self._lock:
            self._pending_bytes += size
            evicted = self._evict_locked(keep=0)
        self._delete(evicted)

    def _settle(self, name: str | None, size: int) -> None:
        """After writing (`name`) or failing (None). Evicts again: writes that overlapped may
        have found nothing stored yet to evict."""
        with self._lock:
            self._pending_bytes -= size
            if name is not None and name not in self._index:  # a sweep may have counted it already
                self._index[name] = size
                self.total_bytes += size
            evicted = self._evict_locked(keep=1 if name is not None else 0)
        self._delete(evicted)

    def _evict_locked(self, keep: int) -> list[str]:
        """Oldest names to delete so that stored plus pending bytes fit the cap, keeping at
        least the `keep` newest."""
        evicted = []
        while self.max_bytes and self.total_bytes + self._pending_bytes > self.max_bytes and len(self._index) > keep:
            old, old_size = self._index.popitem(last=False)
            self.total_bytes -= old_size
            evicted.append(old)
        return evicted

    def _delete(self, evicted: list[str]) -> None:
        for old in evicted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / old)
            self.count("evict", True)
        if evicted:
            log.info("deleted %d oldest images to stay within images.max_bytes", len(evicted))

    # -- serving ------------------------------------------------------------------------
    async def open(self, name: str) -> StoredImage | None:
        opened = await asyncio.to_thread(self._open, name) if NAME.match(name) else None
        self.count("get", opened is not None)
        if opened is None:
            return None
        file, size = opened

        async def chunks():
            while chunk := await asyncio.to_thread(file.read, CHUNK):
                yield chunk

        async def close():
            file.close()

        return StoredImage(size, chunks(), close)

    def _open(self, name: str):
        """The file, if it is a plain file with one name: never a link (O_NOFOLLOW), a FIFO
        or device, nor a hard link to a file elsewhere (its link count would be 2)."""
        try:
            fd = os.open(self.directory / name, _OPEN_READ)
        except OSError:  # missing, a symlink (ELOOP), unreadable
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True), st.st_size

    # -- expiry -------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.sweep)
        self._sweeper = asyncio.create_task(self.sweep_forever(self.sweep_interval))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def sweep(self, now: float | None = None) -> int:
        """Delete images older than the URL lifetime (and leftovers of interrupted writes),
        and recount what remains; returns how many images were deleted."""
        now = now or time.time()
        cutoff = now - self.ttl
        deleted = 0
        kept = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        # Only names this store makes are touched: a shared volume may hold other things.
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if _LEFTOVER.match(entry.name):
                    if st.st_mtime < now - 3600:  # a write or probe that never finished
                        os.unlink(entry.path)
                elif not NAME.match(entry.name):
                    continue
                elif st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    deleted += 1
                else:
                    kept.append((st.st_mtime, entry.name, st.st_size))
            except (FileNotFoundError, PermissionError):
                pass
        kept.sort()
        with self._lock:
            self._index = OrderedDict((name, size) for _, name, size in kept)
            self.total_bytes = sum(size for _, _, size in kept)
        return deleted

    async def sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                deleted = await asyncio.to_thread(self.sweep)
            except OSError as exc:
                self.count("sweep", False)
                log.error("image sweep failed: %s", exc)
                continue
            self.count("sweep", True)
            if deleted:
                log.info("deleted %d expired images", deleted)

    # -- readiness ----------------------------------------------------------------------
    async def ready(self) -> bool:
        return await asyncio.to_thread(self._probe)

    def _probe(self) -> bool:
        """Ready if a small file can be created, written and deleted in the folder: a full
        disk, a read-only or foreign folder, or one that cannot be recreated is not ready."""
        probe = self.directory / f".ready-{secrets.token_hex(8)}"
        try:
            if self._ensure_directory():
                self._recreated()
            fd = os.open(probe, _OPEN_NEW, 0o600)
            try:
                with open(fd, "wb", closefd=True) as file:
                    file.write(b"\0" * PROBE_BYTES)
                    file.flush()
                    os.fsync(file.fileno())
            finally:
                os.unlink(probe)
            return True
        except (OSError, UnsafeStore) as exc:
            log.warning("image store not ready: %s", getattr(exc, "strerror", None) or exc)
            return False
