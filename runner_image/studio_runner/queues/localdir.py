"""Directory queues (spec §2.4): ``<root>/<queue>/`` is a queue and each file in it a message.

Upstream deleted a message file as it picked it up, so a runner that crashed lost the work.
Here a runner claims a file by locking it (``flock``) and renaming it into
``<queue>/.inflight/``, and keeps the lock until the message is settled. The kernel drops the
lock when the holder dies, and any runner then moves the file back (``recover``). Every
move is a ``rename`` inside one directory tree, so a message is always in exactly one place.

File names carry the attempt count (``<id>.attempt-<n>``) so a retry is a rename too.
A rejected message keeps its body in ``<queue>_rejected/<name>`` with the reason in
``.<name>.rejection.json`` beside it; moving the body back into the queue re-runs it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import Delivery, QueueError, Transport, dead_letter_queue, utc_now_text

log = logging.getLogger(__name__)

INFLIGHT = ".inflight"
STAGING = ".staging"
_NAME = re.compile(r"^(?P<id>.+?)(?:\.attempt-(?P<attempts>\d+))?$")


def message_name(attempts: int = 1) -> str:
    """Names sort by publication time, which is also the order we take them in."""
    stem = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
    return stem if attempts <= 1 else f"{stem}.attempt-{attempts}"


def publish(root: Path | str, queue: str, body: bytes | str) -> Path:
    """Write a message durably and atomically: to a staging file first, then renamed into the queue."""
    directory = Path(root) / queue
    staging = directory / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    name = message_name()
    temporary = staging / name
    with temporary.open("wb") as out:
        out.write(body.encode() if isinstance(body, str) else body)
        out.flush()
        os.fsync(out.fileno())
    target = directory / name
    os.rename(temporary, target)
    return target


def _attempts_of(name: str) -> int:
    match = _NAME.match(name)
    return int(match["attempts"]) if match and match["attempts"] else 1


def _stem_of(name: str) -> str:
    match = _NAME.match(name)
    return match["id"] if match else name


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with temporary.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(temporary, path)


class LocalDirTransport(Transport):
    """The queues under one ``--queue-root``; safe for several runners (processes or threads) at once."""

    kind = "local"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"local {self.root}"

    def discover(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as error:
            raise QueueError(f"cannot list --queue-root {self.root}: {error}") from error

    def exists(self, queue: str) -> bool:
        return (self.root / queue).is_dir()

    def get(
        self, queue: str, wait: float | None = None, stop: Callable[[], bool] | None = None
    ) -> LocalDelivery | None:
        """Claim the oldest waiting file; never waits (the service polls directories with back-off)."""
        directory = self.root / queue
        self.recover(queue)
        for path in self._waiting(directory):
            delivery = self._claim(queue, path)
            if delivery is not None:
                return delivery
        return None

    def recover(self, queue: str) -> int:
        """Move back in-flight messages whose holder died (their lock is free); returns how many."""
        inflight = self.root / queue / INFLIGHT
        try:
            names = os.listdir(inflight)
        except FileNotFoundError:
            return 0
        recovered = 0
        for name in names:
            path = inflight / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # settled meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live runner holds it
            try:
                if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
                    os.rename(path, self.root / queue / name)
                    recovered += 1
                    log.warning("recovered %s into %s: the runner that held it is gone", name, queue)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        return recovered

    def _waiting(self, directory: Path) -> list[Path]:
        """Message files, oldest first (spec: oldest by mtime; names break ties)."""
        try:
            entries = [e for e in os.scandir(directory) if not e.name.startswith(".") and e.is_file()]
        except FileNotFoundError:
            return []
        waiting = []
        for entry in entries:
            try:
                waiting.append((entry.stat().st_mtime_ns, entry.name))
            except FileNotFoundError:
                continue
        return [directory / name for _, name in sorted(waiting)]

    def _claim(self, queue: str, path: Path) -> LocalDelivery | None:
        """Lock first, then rename: the lock travels with the file, so recovery never sees it unlocked."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)  # another runner moved it between listing and opening
            inflight = path.parent / INFLIGHT
            inflight.mkdir(exist_ok=True)
            held = inflight / path.name
            os.rename(path, held)
            with os.fdopen(os.dup(fd), "rb") as source:
                body = source.read()
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except OSError as error:
            os.close(fd)
            raise QueueError(f"cannot claim {path}: {error}") from error
        return LocalDelivery(self, queue, held, fd, body)


class LocalDelivery(Delivery):
    """A claimed file in ``.inflight``; the open, locked descriptor is the claim."""

    def __init__(self, transport: LocalDirTransport, queue: str, held: Path, fd: int, body: bytes) -> None:
        super().__init__(
            queue, body, attempts=_attempts_of(held.name), redelivered=False, headers=_rejection_record(held)
        )
        self.name = held.name
        self._transport = transport
        self._held = held
        self._fd: int | None = fd

    @property
    def _queue_dir(self) -> Path:
        return self._transport.root / self.queue

    def _ack(self) -> None:
        self._os("ack", os.unlink, self._held)
        if self.headers:  # a rejected message taken for good: its record goes with it
            _record_path(self._queue_dir, self.name).unlink(missing_ok=True)

    def _requeue(self) -> None:
        self._os("requeue", os.rename, self._held, self._queue_dir / self.name)

    def _retry(self, reason: str) -> None:
        # a fresh mtime: it queues behind what is waiting, as a republished message would
        target = self._queue_dir / f"{_stem_of(self.name)}.attempt-{self.attempts + 1}"
        self._os("retry", os.utime, self._held)
        self._os("retry", os.rename, self._held, target)

    def _reject(self, reason: str) -> None:
        rejected = self._transport.root / dead_letter_queue(self.queue)
        record = {
            "reason": reason,
            "queue": self.queue,
            "rejected_at": utc_now_text(),
            "attempts": self.attempts,
        }
        try:
            rejected.mkdir(parents=True, exist_ok=True)
            _write_atomically(_record_path(rejected, self.name), json.dumps(record, indent=1).encode())
        except OSError as error:
            raise QueueError(f"cannot write the rejection record into {rejected}: {error}") from error
        self._os("reject", os.rename, self._held, rejected / self.name)

    def _abandon(self) -> None:
        try:
            self._requeue()
        except QueueError as error:
            log.warning("%s; another runner recovers it once this one exits", error)

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _os(self, operation: str, call: Any, *paths: Path) -> None:
        try:
            call(*paths)
        except OSError as error:
            raise QueueError(f"could not {operation} {self._held}: {error}") from error


def _record_path(queue_dir: Path, name: str) -> Path:
    return queue_dir / f".{name}.rejection.json"


def _rejection_record(held: Path) -> dict[str, Any]:
    """The rejection record of a message taken from a ``_rejected`` directory, if any."""
    try:
        return json.loads(_record_path(held.parent.parent, held.name).read_text())
    except (OSError, ValueError):
        return {}
