"""The one small interface every queue transport (RabbitMQ, SQS, local directories) offers the service.

A ``Delivery`` is a message this runner holds but has not settled. It is settled exactly once,
on the thread that received it, and only after the work it carried is safe: until then the
broker keeps a claim it gives back on its own if the runner dies (RabbitMQ: unacked on a
connection; SQS: visibility timeout; local: a file lock).
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

log = logging.getLogger(__name__)

TransportKind = Literal["rmq", "sqs", "local"]

RESPONSE_SUFFIX = "_response"
"""Experimenters create ``<queue>_response`` for report messages (spec §2.8); never work."""
DEAD_LETTER_SUFFIX = "_rejected"
"""Where this runner puts requests it gives up on, beside the queue they came from."""
NON_WORK_SUFFIXES = (RESPONSE_SUFFIX, DEAD_LETTER_SUFFIX)

MAX_REASON_CHARS = 2000
"""Reasons travel in headers and message attributes, which brokers cap; the head says enough."""


class QueueError(RuntimeError):
    """The broker could not be reached or refused an operation; the message says which and where."""


class DeliveryLost(QueueError):
    """The claim on a held message ended (connection closed, receipt expired); the broker redelivers it."""


def dead_letter_queue(queue: str) -> str:
    return f"{queue}{DEAD_LETTER_SUFFIX}"


def clip_reason(reason: str) -> str:
    reason = reason.strip() or "no reason given"
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


def utc_now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Delivery(abc.ABC):
    """One held message. Settle it with exactly one of ack/requeue/retry/reject, then it is closed.

    ``attempts`` counts runs of this request that ended in a counted failure plus this one
    (1 on first delivery); ``retry`` republishes with it incremented. A crash or a lost
    connection is not counted: the broker's own redelivery keeps the count unchanged.
    """

    def __init__(
        self,
        queue: str,
        body: bytes,
        *,
        attempts: int = 1,
        redelivered: bool = False,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        self.queue = queue
        self.body = body
        self.attempts = max(1, attempts)
        self.redelivered = redelivered
        self.headers: dict[str, Any] = dict(headers or {})
        self._settled: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = self._settled or ("closed" if self._closed else "held")
        return f"<{type(self).__name__} {self.queue} attempt {self.attempts} {state}>"

    @property
    def settled(self) -> bool:
        return self._settled is not None

    # --- settling: the public methods guard the state; transports implement the _ methods ---
    def ack(self) -> None:
        """The work is done and its results are safe: remove the message for good."""
        self._settle("ack", self._ack)

    def requeue(self) -> None:
        """Give the message back now without counting an attempt (shutdown, busy, storage blip)."""
        self._settle("requeue", self._requeue)

    def retry(self, reason: str) -> None:
        """Republish a copy with ``attempts + 1``, then remove this one: a counted failure."""
        self._settle("retry", lambda: self._retry(clip_reason(reason)))

    def reject(self, reason: str) -> None:
        """Dead-letter to ``<queue>_rejected`` with the reason, queue and time, then remove this one."""
        self._settle("reject", lambda: self._reject(clip_reason(reason)))

    def hold_until(self, done: threading.Event) -> None:
        """Keep the claim alive until ``done`` is set; called on the receiving thread while work runs elsewhere."""
        done.wait()

    def close(self) -> None:
        """Release what the delivery holds; an unsettled message goes back to its queue as after a crash."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._settled is None:
                self._abandon()
        finally:
            self._release()

    def __enter__(self) -> Delivery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _settle(self, how: str, operation: Any) -> None:
        if self._settled is not None:
            raise RuntimeError(f"{self!r} is already settled ({self._settled}); a message is settled once")
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; it went back to its queue and can no longer be settled")
        operation()
        self._settled = how
        self.close()

    @abc.abstractmethod
    def _ack(self) -> None: ...

    @abc.abstractmethod
    def _requeue(self) -> None: ...

    @abc.abstractmethod
    def _retry(self, reason: str) -> None: ...

    @abc.abstractmethod
    def _reject(self, reason: str) -> None: ...

    def _abandon(self) -> None:  # noqa: B027 - an optional hook
        """Give an unsettled message back; by default the broker does it when the claim is released."""

    def _release(self) -> None:  # noqa: B027 - an optional hook
        """Free connections, locks or timers; never raises."""


class Transport(abc.ABC):
    """One queue server (a RabbitMQ broker, a set of SQS accounts, a queue directory).

    ``discover`` and ``exists`` may be called from any thread; ``get`` from any thread, and
    the delivery it returns belongs to that thread.
    """

    kind: TransportKind
    waits_for_messages = False
    """``get`` waits for a message to arrive (push or long poll), so an empty answer needs no back-off."""
    has_events = False
    """``watch`` reports new and deleted queues as they happen; listings remain the fallback."""

    @abc.abstractmethod
    def discover(self) -> list[str]:
        """Bare names of the queues this server has now, unfiltered (the matcher filters)."""

    @abc.abstractmethod
    def get(
        self, queue: str, wait: float | None = None, stop: Callable[[], bool] | None = None
    ) -> Delivery | None:
        """Claim one message from ``queue``, or None when it is empty or gone. Where the transport
        ``waits_for_messages``, wait up to ``wait`` seconds (None: its default) for one to arrive,
        returning early once ``stop()`` is true or the queue is gone."""

    def watch(
        self, on_change: Callable[[str, str], None], stop: threading.Event, ready: Callable[[], None]
    ) -> None:
        """Call ``on_change("created" | "deleted", queue)`` as queues come and go, until ``stop`` is
        set; ``ready()`` once listening. Raises QueueError when events cannot be had."""
        raise NotImplementedError(f"{type(self).__name__} reports no queue events; list them with discover()")

    def release_thread(self) -> None:  # noqa: B027 - most transports keep nothing per thread
        """Free what the calling thread kept between ``get`` calls (a queue worker ends)."""

    @abc.abstractmethod
    def exists(self, queue: str) -> bool: ...

    def close(self) -> None:  # noqa: B027 - most transports cache nothing
        """Drop cached clients; held deliveries are closed by their holders."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def describe(self) -> str:
        """Where this transport points, safe to log (no credentials)."""
        return self.kind
