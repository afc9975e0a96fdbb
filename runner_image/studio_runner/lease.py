"""The running attempt's lease: a small object beside its results that it keeps fresh while it runs.

A broker's claim on a message can end while its runner still works on it: RabbitMQ closes the
channel after ``consumer_timeout`` and SQS makes a message visible again at its 12 h visibility
ceiling. The broker then hands the message to another runner. Nothing the broker knows tells
that runner the first attempt is alive, so the attempt says it in storage, where every runner
of the request can look: ``<_metadata artifact key>.lease.json`` holds who runs it and when it
last renewed, and says ``ended`` once its results are stored. A copy that finds a live lease is
given back and tried later; one that finds it ended looks for the stored success.

Why a lease object and not the periodically uploaded scrape document: scrape documents are named
by host and start time, not by experiment, so finding the current one means listing and reading
the whole ``metadata/`` folder, and their checkpoint period (``saveWorkspaceFrequency``, at least
2 minutes) is the user's choice. The lease is one known key, one small GET, on the runner's clock.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .layout import METADATA_LABEL
from .request import ArtifactLocation, Request
from .storage import ObjectMissing, ObjectStore, Storage

log = logging.getLogger(__name__)

LEASE_SUFFIX = ".lease.json"
DEFAULT_PERIOD_SECONDS = 30.0
"""How often a running attempt renews its lease."""
STALE_AFTER_PERIODS = 4
"""A lease not renewed for this many periods belongs to an attempt that died (node lost, SIGKILL):
long enough to ride out a slow store, short enough that a crashed run is retaken within minutes."""


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds. Times are Unix seconds on the holder's clock."""

    key: str
    holder: str
    """Host name of the runner, as in the scrape document."""
    accession: str
    pid: int
    pid_namespace: str
    process_started: int | None
    """``/proc/<pid>/stat`` start time, so a reused PID is never taken for the holder."""
    renewed: float
    period: float
    ended: str | None = None
    """The attempt's final status once it is over (results stored or not); None while it runs."""

    def alive(self, now: float | None = None) -> bool:
        """Whether the attempt still runs: not ended, renewed recently, and (when this runner shares
        its host and PID namespace) its process still exists."""
        if self.ended is not None:
            return False
        now = time.time() if now is None else now
        if now - self.renewed > self.period * STALE_AFTER_PERIODS:
            return False
        if self.holder == socket.gethostname() and self.pid_namespace == _pid_namespace():
            return process_start_time(self.pid) == self.process_started  # a dead holder is known at once
        return True

    def describe(self) -> str:
        age = time.time() - self.renewed
        return f"attempt {self.accession} on {self.holder} (pid {self.pid}), renewed {age:.0f} s ago"


def lease_target(request: Request) -> ArtifactLocation | None:
    """Where ``request``'s lease lives: beside its ``_metadata`` artifact, which only runners write.
    None when the request keeps no metadata (then no attempt can be told apart from another)."""
    artifact = request.experiment.artifacts.get(METADATA_LABEL)
    if artifact is None or not artifact.mutable or not artifact.qualified:
        return None
    location = artifact.location
    return ArtifactLocation(location.scheme, location.host, location.bucket, location.key + LEASE_SUFFIX)


def read_lease(request: Request, storage: Storage) -> LeaseRecord | None:
    """The request's lease as stored now; None when there is none (or it is not ours to read)."""
    target = lease_target(request)
    if target is None:
        return None
    data = io.BytesIO()
    try:
        _store(request, storage, target).download(target.bucket, target.key, data)
    except ObjectMissing:
        return None
    try:
        return LeaseRecord(**json.loads(data.getvalue()))
    except (ValueError, TypeError) as error:
        log.warning("the lease %s is unreadable (%s); treating it as absent", target.uri, error)
        return None


class LeaseKeeper:
    """Holds the lease for one attempt: written on entry, renewed every ``period`` on a thread,
    marked ended (with the attempt's status) by ``end``. Storage trouble is logged, never fatal:
    the lease protects against a second run, it must not cause a failed first one."""

    def __init__(
        self, request: Request, storage: Storage, *, accession: str, host: str, period: float
    ) -> None:
        self.request = request
        self.storage = storage
        self.target = lease_target(request)
        self.period = period
        self._record = LeaseRecord(
            key=request.key,
            holder=host,
            accession=accession,
            pid=os.getpid(),
            pid_namespace=_pid_namespace(),
            process_started=process_start_time(os.getpid()),
            renewed=time.time(),
            period=period,
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        if self.target is None:
            return self
        self._write()  # before any work: a copy handed out from now on must find it
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._renew,), name="lease", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.end("runner_error" if error is not None else "ended")

    def end(self, status: str) -> None:
        """Say the attempt is over; the first call wins (the final status, not the exit path)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.target is None or self._record.ended is not None:
                return
            self._record = _replace(self._record, ended=status, renewed=time.time())
        self._write()

    def _renew(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                self._record = _replace(self._record, renewed=time.time())
            self._write()

    def _write(self) -> None:
        assert self.target is not None
        with self._lock:
            body = json.dumps(asdict(self._record)).encode()
        try:
            _store(self.request, self.storage, self.target).upload(
                self.target.bucket, self.target.key, io.BytesIO(body), content_type="application/json"
            )
        except Exception as error:
            log.warning("could not write the lease %s (%s); the run goes on", self.target.uri, error)


def _store(request: Request, storage: Storage, target: ArtifactLocation) -> ObjectStore:
    return storage.store_for(target, request.aws_credentials(METADATA_LABEL), request.config.env)


def _replace(record: LeaseRecord, **changes: Any) -> LeaseRecord:
    return LeaseRecord(**{**asdict(record), **changes})


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start_time(pid: int) -> int | None:
    """Clock ticks after boot at which ``pid`` started (tells a live holder from a reused pid);
    None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])
