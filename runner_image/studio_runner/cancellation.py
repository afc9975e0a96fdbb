"""Why a running request was asked to stop: the runner is stopping, or the work is no longer wanted.

The two end differently. A runner that stops gives the message back for another runner; a
request whose queue was deleted is withdrawn by its client, so nobody should run it again and
nothing may be recorded as its success. One event carries both, so the job's kill sequence
(``job.run_job``) needs no second signal.
"""

from __future__ import annotations

import threading


class Cancellation(threading.Event):
    """A ``threading.Event`` that also says, when set by ``withdraw``, why the work is unwanted."""

    def __init__(self) -> None:
        super().__init__()
        self.withdrawn: str | None = None

    def withdraw(self, reason: str) -> None:
        """The client no longer wants this work (its queue is gone): stop it, never requeue it."""
        if not self.is_set():
            self.withdrawn = reason
        self.set()
