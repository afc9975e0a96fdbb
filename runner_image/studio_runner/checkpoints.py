"""Periodic checkpoint uploads while a workload runs, so a lost node loses minutes, not hours."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Checkpointer:
    """Runs ``action`` every ``period`` seconds on a background thread until the block ends.

    A failed checkpoint is logged and the next one tried as planned: the final upload after the
    workload ends is the one that decides whether results are safe.
    """

    def __init__(self, period: float, action: Callable[[], object], *, name: str = "checkpoint") -> None:
        self._period = period
        self._action = action
        self._stop = threading.Event()
        self._name = name
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Checkpointer:
        # the loop runs in a copy of the entering thread's context, so its log lines keep the
        # experiment and queue (threads start with an empty context)
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._loop,), name=self._name, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._action()
            except Exception:
                log.exception("checkpoint upload failed; the final upload will try again")
