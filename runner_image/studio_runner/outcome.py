"""How an attempt ended, and what that means for the message that carried it.

Upstream requeued almost everything, so a deterministic failure looped between runners
forever and an expired request cycled until every runner refused it. Here each ending maps
to one disposition: success is acked; conditions another attempt can fix (runner shutting
down, resources busy, storage briefly gone) requeue without counting; workload failures
retry a bounded number of times; everything else is dead-lettered with its reason.
Storage and environment trouble that may pass is retried the same bounded way (a store or a
package index out of reach); what cannot work anywhere is INVALID at once: an artifact that
cannot exist, or a virtualenv whose requirement the index says it does not have
(``PythonEnvError.permanent``, decided from the installer's output in ``pythonenv``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(str, enum.Enum):
    """The attempt's ending, as written into the result summary and the scrape document."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the workload exited non-zero
    TIMED_OUT = "timed_out"  # max_duration reached; the process group was killed
    EXPIRED = "expired"  # experimentLifetime passed before or during the run
    INVALID = "invalid"  # runnable nowhere: undecodable, impossible artifacts, unresolvable requirements
    INFRASTRUCTURE = "infrastructure_error"  # storage, index or build trouble another attempt may not have
    INTERRUPTED = "interrupted"  # the runner was told to stop; someone else should take it
    NO_CAPACITY = "no_capacity"  # the request does not fit this runner's free resources now
    RUNNING_ELSEWHERE = "running_elsewhere"  # an earlier attempt still runs (its lease is fresh)
    CANCELLED = "cancelled"  # the client withdrew the work (deleted its queue); never a success


class Disposition(str, enum.Enum):
    ACK = "ack"
    REQUEUE = "requeue"  # back to the queue now, attempt not counted
    RETRY = "retry"  # back to the queue, attempt counted; dead-lettered once attempts run out
    REJECT = "reject"  # dead-letter with the reason, then ack
    RELEASE = "release"  # settle nothing: the queue is gone, and its message with it


EXIT_CODES = {
    Status.SUCCEEDED: 0,
    Status.FAILED: 1,
    Status.INVALID: 2,
    Status.TIMED_OUT: 3,
    Status.EXPIRED: 4,
    Status.INFRASTRUCTURE: 5,
    Status.INTERRUPTED: 6,
    Status.NO_CAPACITY: 7,
    Status.RUNNING_ELSEWHERE: 8,
    Status.CANCELLED: 9,
}
"""``studio-runner run`` exit codes, so an Airflow task or pod can tell the cases apart."""

_DISPOSITIONS = {
    Status.SUCCEEDED: Disposition.ACK,
    Status.FAILED: Disposition.RETRY,
    Status.TIMED_OUT: Disposition.REJECT,
    Status.EXPIRED: Disposition.REJECT,
    Status.INVALID: Disposition.REJECT,
    Status.INFRASTRUCTURE: Disposition.RETRY,
    Status.INTERRUPTED: Disposition.REQUEUE,
    Status.NO_CAPACITY: Disposition.REQUEUE,
    Status.RUNNING_ELSEWHERE: Disposition.REQUEUE,
    Status.CANCELLED: Disposition.RELEASE,
}


@dataclass
class Outcome:
    """The result of one attempt: what happened, why, and where its results went."""

    status: Status
    reason: str = ""
    key: str = ""
    exit_code: int | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    scrape_uri: str | None = None
    results_saved: bool = True
    duration_seconds: float = 0.0

    @property
    def disposition(self) -> Disposition:
        if not self.results_saved and self.status is Status.SUCCEEDED:
            # never ack work whose results are not safe in storage
            return Disposition.RETRY
        return _DISPOSITIONS[self.status]

    @property
    def process_exit_code(self) -> int:
        if not self.results_saved and self.status is Status.SUCCEEDED:
            return EXIT_CODES[Status.INFRASTRUCTURE]
        return EXIT_CODES[self.status]
