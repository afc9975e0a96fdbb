"""Drain control from a mounted ConfigMap (spec §7.3): ``STATE`` is Running, DrainAndSuspend or DrainAndTerminate.

Upstream watched ConfigMaps through the Kubernetes API, which needed RBAC (its docs used a
cluster-admin binding). Here the ConfigMap is mounted into the pod and ``--state-file`` names
either a file holding just the value or the mounted folder, whose ``STATE`` file is read. The
kubelet updates a mounted ConfigMap by swapping the ``..data`` symlink to a new folder; the
path is opened afresh on every poll, so the swap is seen as one atomic change.

Differences from upstream: a missing file (or a ConfigMap without a ``STATE`` key) means
Running. Upstream's watcher re-broadcast ``Unknown`` in that case, which paused SQS polling and
new queue servers (deployments had to ship ``STATE: Running`` to avoid it). An empty file reads
as a write in progress and an unknown value as a typo: both keep the current state, with a
warning for the typo. Upstream's per-pod ConfigMap maps onto a per-pod mount at the same path.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .service import RunnerState, Service

log = logging.getLogger(__name__)

STATE_KEY = "STATE"
POLL_SECONDS = 2.0
"""The kubelet itself takes up to a minute to project a ConfigMap change; polling is not the delay."""


def read_state(path: Path) -> RunnerState | None:
    """The state the file asks for; None when the file says nothing usable (keep the current state)."""
    target = path / STATE_KEY if path.is_dir() else path
    try:
        text = target.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return RunnerState.RUNNING
    except NotADirectoryError:  # a path component is a file: nothing mounted as we expect
        return RunnerState.RUNNING
    except OSError as error:
        log.warning("cannot read the runner state from %s (%s); keeping the current state", target, error)
        return None
    if not text:
        return None
    try:
        return RunnerState(text)
    except ValueError:
        allowed = ", ".join(state.value for state in RunnerState)
        log.warning("ignoring runner state %r in %s: expected one of %s", text[:80], target, allowed)
        return None


class StateWatcher:
    """Polls ``path`` on a daemon thread and hands each change to ``Service.set_state``."""

    def __init__(self, path: Path, service: Service, *, interval: float = POLL_SECONDS) -> None:
        self.path = path
        self.service = service
        self.interval = interval
        self._stop = threading.Event()
        self._last: RunnerState | None = None
        self._thread = threading.Thread(target=self._loop, name="state watcher", daemon=True)

    def start(self) -> StateWatcher:
        """Applies the file's state once before returning, so a pod created drained never takes work."""
        self.poll()
        self._thread.start()
        log.info("following the runner state in %s", self.path)
        return self

    def close(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        state = read_state(self.path)
        if state is None or state is self._last:
            return
        self._last = state
        self.service.set_state(state)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:
                log.exception("reading the runner state from %s failed; trying again", self.path)
