"""A download cache shared by the experiments (and runner processes) on one machine.

Workspaces and data sets are immutable blobs fetched again by every experiment that names
them; keying copies by the storage ETag lets a retry or the next generation of an ENN run
unpack from local disk instead. Fills are serialised per ETag with ``flock`` so two threads
or two runner processes never download the same object twice or read a half-written copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
LOCK_DIR = ".locks"
_STALE_PARTIAL_SECONDS = 24 * 3600
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class DownloadCache:
    """Objects by ETag under ``root``, evicted least recently used beyond ``max_bytes``.

    Entries are plain files named for the ETag; their mtime is the last-use time, so every
    process sharing the folder sees the same LRU order without a shared index.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("cache size must be positive; leave the cache out to disable it")
        self.root = root
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._counter_lock = threading.Lock()
        (root / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
        (root / LOCK_DIR).mkdir(exist_ok=True)
        self._remove_stale_partials()

    @contextmanager
    def open(
        self, etag: str, fill: Callable[[BinaryIO], None], *, size: int | None = None
    ) -> Iterator[BinaryIO]:
        """A readable copy of the object ``etag``, calling ``fill`` to download it on a miss.

        ``etag`` is any text naming one immutable object: a bare ETag, or one scoped by the
        caller to the server it came from.

        ``size``, when known, keeps objects larger than the whole cache out of it from the
        start; such objects are still filled into a private temporary file and handed over.
        """
        if not etag:
            raise ValueError("an object without an ETag cannot be cached")
        name = _entry_name(etag)
        entry = self.root / name
        if size is not None and size > self.max_bytes:
            with self._uncached(fill) as stream:
                yield stream
            return
        stream = self._open_hit(entry)
        if stream is None:
            stream = self._fill_locked(name, entry, fill)
        try:
            yield stream
        finally:
            stream.close()

    def _open_hit(self, entry: Path) -> BinaryIO | None:
        try:
            stream = open(entry, "rb")  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(stream.fileno())  # last use; open first so an eviction cannot race us
        with self._counter_lock:
            self.hits += 1
        return stream

    def _fill_locked(self, name: str, entry: Path, fill: Callable[[BinaryIO], None]) -> BinaryIO:
        """Download under the ETag's lock; whoever waited on it finds the entry and reads that."""
        with open(self.root / LOCK_DIR / name, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                os.utime(lock.fileno())  # a lock in use is never pruned as stale
                stream = self._open_hit(entry)
                if stream is not None:
                    return stream
                with self._counter_lock:
                    self.misses += 1
                descriptor, temporary = tempfile.mkstemp(prefix=f"{name}.", dir=self.root / PARTIAL_DIR)
                try:
                    with os.fdopen(descriptor, "wb") as out:
                        fill(out)
                    size = os.path.getsize(temporary)
                    if size > self.max_bytes:
                        # Too big to keep: hand over the private copy, gone once closed.
                        stream = open(temporary, "rb")  # noqa: SIM115 - handed to the caller
                        os.unlink(temporary)
                        return stream
                    os.replace(temporary, entry)
                except BaseException:
                    Path(temporary).unlink(missing_ok=True)
                    raise
                stream = open(entry, "rb")  # noqa: SIM115 - handed to the caller
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        log.debug("cached %s (%d bytes)", name, size)
        self._evict(keep=entry)
        return stream

    @contextmanager
    def _uncached(self, fill: Callable[[BinaryIO], None]) -> Iterator[BinaryIO]:
        with self._counter_lock:
            self.misses += 1
        with tempfile.TemporaryFile(dir=self.root / PARTIAL_DIR) as stream:
            fill(stream)  # type: ignore[arg-type]
            stream.seek(0)
            yield stream  # type: ignore[misc]

    def _evict(self, keep: Path) -> None:
        """Remove least recently used entries until the cache fits ``max_bytes`` again."""
        entries = []
        for item in os.scandir(self.root):
            if item.name.startswith(".") or not item.is_file(follow_symlinks=False):
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries.append((info.st_mtime_ns, item.name, info.st_size))
        total = sum(size for _, _, size in entries)
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if name == keep.name:
                continue
            try:
                os.unlink(self.root / name)
            except FileNotFoundError:
                continue  # another process evicted it first
            total -= size
            log.debug("evicted %s (%d bytes) from the download cache", name, size)

    def _remove_stale_partials(self) -> None:
        """Downloads cut short by a crash, and locks of long-gone entries; live ones are fresh.

        Lock files are not removed on eviction: a process may hold one, and a new file under
        the same name would let a second filler in beside it.
        """
        cutoff = time.time() - _STALE_PARTIAL_SECONDS
        stale = [*os.scandir(self.root / PARTIAL_DIR), *os.scandir(self.root / LOCK_DIR)]
        for item in stale:
            try:
                if item.stat().st_mtime < cutoff and not (self.root / item.name).exists():
                    os.unlink(item.path)
            except OSError as error:
                if error.errno != errno.ENOENT:
                    log.warning("cannot remove stale partial download %s: %s", item.path, error)

    @property
    def size(self) -> int:
        """Bytes held by cached entries."""
        return sum(
            item.stat().st_size
            for item in os.scandir(self.root)
            if not item.name.startswith(".") and item.is_file(follow_symlinks=False)
        )


def _entry_name(etag: str) -> str:
    """ETags are usually hex (``-N`` for multipart); anything else is hashed to a safe name."""
    if _SAFE_NAME.match(etag):
        return etag
    return "h" + hashlib.sha256(etag.encode()).hexdigest()
