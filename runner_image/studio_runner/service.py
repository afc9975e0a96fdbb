"""``studio-runner serve``: take requests from every matching queue, run them, settle each message.

Threads: the ``run()`` caller refreshes queue lists and watches limits; a watcher thread per
transport that reports queue events (RabbitMQ's event exchange) starts and retires workers the
moment a queue is created or deleted, the listing being the fallback and the reconciliation.
Each matching queue has one worker thread that waits on it (a consumer the broker pushes to,
or a long poll), and that thread keeps any message it receives for the message's whole life
(RabbitMQ's pika connections are confined to one thread). The
experiment itself runs on a separate handler thread while the worker holds the message
alive, then the worker settles it. The handler gets a ``Message`` (plain values and the
cancel event), never the delivery. A queue that disappears withdraws the work running from it. A worker never holds more than one message, which is
how a runner keeps at most one request in flight per queue (spec §2.5).
"""

from __future__ import annotations

import contextvars
import enum
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import logs
from .cancellation import Cancellation
from .metrics import RunnerMetrics
from .outcome import Disposition, Outcome, Status
from .queues.base import NON_WORK_SUFFIXES, Delivery, DeliveryLost, Transport, TransportKind

log = logging.getLogger(__name__)

DEFAULT_QUEUE_MATCH = r"^(rmq|sqs|local)_.*$"


@dataclass(frozen=True)
class Message:
    """One held message as its handler sees it: plain values, never the delivery itself (only
    the receiving thread may touch that), plus the event that asks the handler to stop."""

    body: bytes
    queue: str
    attempts: int = 1
    redelivered: bool = False
    """The broker handed it out before and it was never settled (a runner died or lost its claim)."""
    transport: TransportKind | str = "local"
    cancel: Cancellation = field(default_factory=Cancellation, compare=False, repr=False)

    @property
    def taken_before(self) -> bool:
        """Another attempt may have run it: redelivered, or a retry copy (the twin of a redelivered
        original when a runner died between publishing the copy and acking the original)."""
        return self.redelivered or self.attempts > 1


Handler = Callable[[Message], Outcome]
"""``handler(message) -> Outcome``: runs one request; returns soon after ``message.cancel`` is set."""
Capacity = Callable[[str], bool]
"""``capacity(queue)``: False when the last request seen on that queue would not fit now."""

TAKE_WAIT_SECONDS = 2.0
"""How long a worker waits for a message in one take where the transport can wait (a RabbitMQ
consumer returns at once when stopped; an SQS long poll of this many seconds is how long a stop or
drain may wait for it)."""
QUICK_LISTING_SECONDS = 1.0
"""How often a transport that reports no queue events (SQS, directories, RabbitMQ without the
event plugin) is listed, so a new queue waits about a second, as with StudioML's own worker."""
REQUEUE_BACKOFF_SECONDS = 5.0
"""After giving a message back (busy, or its earlier attempt still runs), the queue's worker waits
this long before taking from that queue again, so a message at the head is not taken in a loop."""


class RunnerState(str, enum.Enum):
    """The Kubernetes ConfigMap ``STATE`` values (spec §7.3)."""

    RUNNING = "Running"
    DRAIN_AND_SUSPEND = "DrainAndSuspend"
    DRAIN_AND_TERMINATE = "DrainAndTerminate"


@dataclass(frozen=True)
class QueueMatcher:
    """Which queues are work queues (spec §2.1); the one place names are filtered, for every transport."""

    match: str = DEFAULT_QUEUE_MATCH
    mismatch: str | None = None

    def __post_init__(self) -> None:
        for option, pattern in (("--queue-match", self.match), ("--queue-mismatch", self.mismatch)):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{option} {pattern!r} is not a regular expression: {error}") from error

    def __call__(self, queue: str) -> bool:
        if queue.endswith(NON_WORK_SUFFIXES):
            return False
        # unanchored search, like Go's MatchString that upstream used
        if not re.search(self.match, queue):
            return False
        return not (self.mismatch and re.search(self.mismatch, queue))


@dataclass
class ServiceSummary:
    """What ``run()`` did: how many messages it handled, how each ended, and why it returned."""

    ended_by: str = ""
    handled: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    settle_failures: int = 0
    abandoned: int = 0
    lost_acks: int = 0
    """Requests that succeeded with their results stored whose ack never reached the broker."""


@dataclass
class _Job:
    queue: str
    cancel: Cancellation = field(default_factory=Cancellation)
    release: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None


@dataclass
class _Worker:
    key: tuple[int, str]
    transport: Transport
    wake: threading.Event = field(default_factory=threading.Event)
    retired: bool = False
    thread: threading.Thread | None = None

    @property
    def queue(self) -> str:
        return self.key[1]


class Service:
    """Polls the matching queues of every transport and runs one request per queue at a time."""

    def __init__(
        self,
        transports: Sequence[Transport],
        matcher: QueueMatcher,
        handler: Handler,
        *,
        max_attempts: int = 3,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
        refresh_interval: float = 15.0,
        take_wait: float = TAKE_WAIT_SECONDS,
        quick_listing: float = QUICK_LISTING_SECONDS,
        limit_tasks: int = 0,
        limit_idle_seconds: float = 0.0,
        capacity: Capacity | None = None,
        settle_timeout: float = 30.0,
        metrics: RunnerMetrics | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        if poll_interval <= 0 or refresh_interval <= 0:
            raise ValueError("poll_interval and refresh_interval must be positive (seconds)")
        self.transports = list(transports)
        self.matcher = matcher
        self.handler = handler
        self.max_attempts = max_attempts
        self.poll_interval = poll_interval
        self.max_poll_interval = max(max_poll_interval, poll_interval)
        self.refresh_interval = refresh_interval
        self.take_wait = take_wait
        self.quick_listing = quick_listing
        self.limit_tasks = limit_tasks
        self.limit_idle_seconds = limit_idle_seconds
        self.capacity = capacity
        self.settle_timeout = settle_timeout
        self.metrics = metrics

        self._cond = threading.Condition(threading.RLock())
        self._state = RunnerState.RUNNING
        self._drain = False
        self._stop_deadline: float | None = None
        self._shutdown = threading.Event()
        self._finished = threading.Event()
        self._run_thread: int | None = None
        self._workers: dict[tuple[int, str], _Worker] = {}
        self._jobs: dict[tuple[int, str], _Job] = {}
        self._reserved = 0
        self._summary = ServiceSummary()
        self._statuses: Counter[str] = Counter()
        self._last_activity = time.monotonic()
        self._loop_turned = time.monotonic()
        self._last_answer: float | None = None
        self._refresh_due = [False] * len(self.transports)
        self._next_refresh = [0.0] * len(self.transports)  # a fast first pass
        self._watchers: list[threading.Thread] = []
        self._following: set[int] = set()
        self._listed_since_following: set[int] = set()

    # --- control (any thread) -----------------------------------------------------------------
    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def running(self) -> int:
        """Requests being worked on now."""
        with self._cond:
            return len(self._jobs)

    @property
    def taking_work(self) -> bool:
        """State Running, not draining, not stopping: new messages are taken."""
        return self._taking_work()

    @property
    def ended(self) -> bool:
        """``run()`` has finished or is winding down to return."""
        return self._finished.is_set() or bool(self._summary.ended_by)

    @property
    def last_answer(self) -> float | None:
        """``time.monotonic()`` when a queue server last answered a listing or a poll; None before any."""
        return self._last_answer

    def loop_age(self) -> float:
        """Seconds since the ``run()`` loop last turned (or since construction, before it starts)."""
        return time.monotonic() - self._loop_turned

    @property
    def following_events(self) -> list[str]:
        """The transports whose queue events this service follows now (listed once since subscribing)."""
        with self._cond:
            return [self.transports[index].describe() for index in sorted(self._listed_since_following)]

    def queues(self) -> list[str]:
        """The queues being serviced now."""
        with self._cond:
            return sorted(w.queue for w in self._workers.values() if not w.retired)

    def set_state(self, state: RunnerState | str) -> None:
        """Running takes work; DrainAndSuspend stops taking it; DrainAndTerminate also returns from ``run()`` when idle."""
        try:
            new = RunnerState(state)
        except ValueError:
            allowed = ", ".join(s.value for s in RunnerState)
            raise ValueError(f"unknown runner state {state!r}; expected one of {allowed}") from None
        with self._cond:
            if new is not self._state:
                log.info("runner state %s -> %s", self._state.value, new.value)
            self._state = new
            self._cond.notify_all()
        self._wake_workers()

    def drain(self) -> None:
        """Stop taking work, let running work finish, then return from ``run()``."""
        with self._cond:
            self._drain = True
            self._cond.notify_all()
        log.info("draining: no new work; %d running request(s) will finish", self.running)

    def stop(self, grace_seconds: float = 30.0, *, wait: bool = True) -> None:
        """Stop taking work now and cancel running work; after the grace period give back whatever still runs.

        From a signal handler on the thread running ``run()``, pass ``wait=False``.
        """
        with self._cond:
            deadline = time.monotonic() + max(0.0, grace_seconds)
            if self._stop_deadline is None or deadline < self._stop_deadline:
                self._stop_deadline = deadline
            jobs = list(self._jobs.values())
            self._cond.notify_all()
        for job in jobs:
            job.cancel.set()
        log.info("stopping: %d running request(s) cancelled, %.0f s to wind down", len(jobs), grace_seconds)
        self._wake_workers()
        if wait and self._run_thread is not None and self._run_thread != threading.get_ident():
            self._finished.wait()

    # --- the main loop ------------------------------------------------------------------------
    def run(self) -> ServiceSummary:
        """Service queues until stopped, drained, or a limit is reached; returns what was done."""
        with self._cond:
            if self._run_thread is not None:
                raise RuntimeError("Service.run() is already running; a service runs once")
            self._run_thread = threading.get_ident()
            self._last_activity = time.monotonic()
        next_refresh = self._next_refresh
        failures = [0] * len(self.transports)
        abandon_deadline: float | None = None
        self._start_watchers()
        try:
            while True:
                now = self._loop_turned = time.monotonic()
                with self._cond:
                    ended_by = self._end_reason(now)
                    if ended_by is None and self._stop_deadline is not None and now >= self._stop_deadline:
                        if abandon_deadline is None:
                            abandon_deadline = now + self.settle_timeout
                            self._abandon_jobs()
                        elif now >= abandon_deadline:
                            ended_by = "stopped"
                    if ended_by is not None:
                        self._summary.ended_by = ended_by
                        break
                if self._taking_work():
                    for index, transport in enumerate(self.transports):
                        if now >= next_refresh[index] or self._refresh_due[index]:
                            self._refresh_due[index] = False
                            next_refresh[index] = now + self._refresh(index, transport, failures)
                with self._cond:
                    self._cond.wait(timeout=0.1)
        finally:
            self._shut_down_workers()
            self._finished.set()
        with self._cond:
            summary = self._summary
            summary.statuses = dict(self._statuses)
        log.info(
            "service ended (%s): %d handled %s, %d settle failure(s)",
            summary.ended_by,
            summary.handled,
            summary.statuses,
            summary.settle_failures,
        )
        return summary

    def _end_reason(self, now: float) -> str | None:
        busy = bool(self._jobs)
        if self._stop_deadline is not None:
            return None if busy else "stopped"
        if busy:
            return None
        if self._drain:
            return "drained"
        if self._state is RunnerState.DRAIN_AND_TERMINATE:
            return "drain_and_terminate"
        if self.limit_tasks and self._summary.handled >= self.limit_tasks:
            return "limit_tasks"
        if self.limit_idle_seconds and now - self._last_activity >= self.limit_idle_seconds:
            return "limit_idle"
        return None

    def _abandon_jobs(self) -> None:
        for job in self._jobs.values():
            log.warning(
                "a request from %s did not finish within the grace period; returning its message", job.queue
            )
            job.release.set()

    def _refresh(self, index: int, transport: Transport, failures: list[int]) -> float:
        """Start workers for new matching queues and retire those gone; returns the delay to the next refresh."""
        try:
            names = transport.discover()
        except Exception as error:
            if self.metrics is not None:
                self.metrics.queues_listed(transport.describe(), ok=False)
            failures[index] += 1
            delay = min(2.0 ** (failures[index] - 1), 180.0)
            log.warning(
                "listing queues of %s failed (%s); trying again in %.0f s", transport.describe(), error, delay
            )
            return delay
        failures[index] = 0
        self._last_answer = time.monotonic()
        interval = self.refresh_interval if index in self._following else self._listing_interval()
        if self.metrics is not None:
            self.metrics.queues_listed(transport.describe(), ok=True)
        wanted = {name for name in names if self.matcher(name)}
        with self._cond:
            for name in sorted(wanted):
                self._start_worker(index, transport, name)
            running: list[tuple[str, _Job]] = []
            for key, worker in list(self._workers.items()):
                if key[0] == index and key[1] not in wanted and not worker.retired:
                    log.info("queue %s is gone from %s; its worker stops", key[1], transport.describe())
                    job = self._retire(worker)
                    if job is not None:
                        running.append((key[1], job))
        for queue, job in running:
            self._cancel_withdrawn(transport, queue, job)
        return interval

    def _listing_interval(self) -> float:
        """Without queue events, listing is how new queues are found: list often."""
        return min(self.refresh_interval, self.quick_listing)

    def _start_worker(self, index: int, transport: Transport, name: str) -> None:
        """A worker for a matching queue, unless it has one (a retiring one is kept on)."""
        with self._cond:
            worker = self._workers.get((index, name))
            if worker is not None:
                worker.retired = False
                return
            if self._shutdown.is_set():
                return
            worker = _Worker(key=(index, name), transport=transport)
            worker.thread = threading.Thread(
                target=self._work, args=(worker,), name=f"queue {transport.kind} {name}", daemon=True
            )
            self._workers[worker.key] = worker
            log.info("servicing %s queue %s", transport.kind, name)
            worker.thread.start()

    def _retire(self, worker: _Worker) -> _Job | None:
        """Stop a queue's worker; returns the job running from that queue, if any."""
        with self._cond:
            worker.retired = True
            worker.wake.set()
            return self._jobs.get(worker.key)

    # --- queue events -------------------------------------------------------------------------
    def _start_watchers(self) -> None:
        for index, transport in enumerate(self.transports):
            if transport.has_events:
                thread = threading.Thread(
                    target=self._watch, args=(index, transport), name=f"events {transport.kind}", daemon=True
                )
                self._watchers.append(thread)
                thread.start()

    def _watch(self, index: int, transport: Transport) -> None:
        """Follow the transport's queue events until shutdown; when they fail, the listing carries
        on alone and the watcher tries again with back-off. Each (re)subscription asks for a
        listing, which covers whatever happened while nobody was listening."""
        failures = 0

        def ready() -> None:
            nonlocal failures
            failures = 0
            log.info("following queue events of %s", transport.describe())
            with self._cond:
                self._following.add(index)
            if self._taking_work():
                self._next_refresh[index] = time.monotonic() + self._refresh(index, transport, [0])
            else:
                with self._cond:
                    self._refresh_due[index] = True
            with self._cond:
                self._listed_since_following.add(index)

        while not self._shutdown.is_set():
            try:
                transport.watch(
                    lambda change, queue: self._on_queue_event(index, transport, change, queue),
                    self._shutdown,
                    ready,
                )
            except Exception as error:
                with self._cond:
                    self._following.discard(index)
                    self._listed_since_following.discard(index)
                    self._next_refresh[index] = min(
                        self._next_refresh[index], time.monotonic() + self._listing_interval()
                    )
                failures += 1
                delay = min(2.0 ** (failures - 1), 60.0)
                log.warning(
                    "queue events of %s are unavailable (%s); new queues are found by listing every "
                    "%.0f s. Trying again in %.0f s",
                    transport.describe(),
                    error,
                    self.refresh_interval,
                    delay,
                )
                self._shutdown.wait(delay)

    def _on_queue_event(self, index: int, transport: Transport, change: str, queue: str) -> None:
        if not self.matcher(queue):
            return
        if change == "created":
            if self._taking_work():
                self._start_worker(index, transport, queue)
            return
        with self._cond:
            worker = self._workers.get((index, queue))
            if worker is None or worker.retired:
                return
            log.info("queue %s was deleted from %s; its worker stops", queue, transport.describe())
            job = self._retire(worker)
        if job is not None:
            self._cancel_withdrawn(transport, queue, job)

    def _cancel_withdrawn(self, transport: Transport, queue: str, job: _Job) -> None:
        """A deleted queue cancels the work taken from it (spec §2.7), once the queue itself, not
        just its listing, is confirmed gone: a glitch in a listing must not kill a day-long run."""
        try:
            gone = not transport.exists(queue)
        except Exception as error:
            log.warning(
                "queue %s left the listing but cannot be checked (%s); its work goes on", queue, error
            )
            return
        if not gone:
            log.info("queue %s left the listing but still exists; its work goes on", queue)
            return
        reason = f"queue {queue} was deleted"
        log.warning("%s: cancelling the request running from it", reason)
        job.cancel.withdraw(reason)

    def _shut_down_workers(self) -> None:
        self._shutdown.set()
        self._wake_workers()
        deadline = time.monotonic() + self.settle_timeout
        with self._cond:
            workers = list(self._workers.values())
        for worker in workers:
            if worker.thread is not None:
                worker.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for thread in self._watchers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _wake_workers(self) -> None:
        with self._cond:
            for worker in self._workers.values():
                worker.wake.set()

    def _taking_work(self) -> bool:
        return (
            self._state is RunnerState.RUNNING
            and not self._drain
            and self._stop_deadline is None
            and not self._shutdown.is_set()
        )

    # --- queue workers ------------------------------------------------------------------------
    def _work(self, worker: _Worker) -> None:
        with logs.bound(queue=worker.queue):
            try:
                self._work_loop(worker)
            finally:
                worker.transport.release_thread()

    def _work_loop(self, worker: _Worker) -> None:
        delay = 0.0
        while True:
            if delay:
                worker.wake.wait(delay)
                worker.wake.clear()
            with self._cond:
                if worker.retired or self._shutdown.is_set():
                    del self._workers[worker.key]
                    return
            try:
                delay = self._poll_once(worker, delay)
            except Exception:
                log.exception("unexpected error servicing queue %s; carrying on", worker.queue)
                delay = self._backoff(delay)

    def _backoff(self, delay: float) -> float:
        return self.poll_interval if delay <= 0 else min(delay * 2, self.max_poll_interval)

    def _poll_once(self, worker: _Worker, delay: float) -> float:
        """One attempt to take and run a message; returns how long to wait before the next."""
        if not self._taking_work():
            if self.metrics is not None:
                self.metrics.queue_ignored(worker.transport.kind, worker.queue)
            return self.poll_interval
        if self.capacity is not None:
            try:
                fits = self.capacity(worker.queue)
            except Exception:
                log.exception("the capacity check for %s failed; skipping the queue for now", worker.queue)
                fits = False
            if not fits:
                return self._backoff(delay)
        if not self._reserve():
            return self.poll_interval
        if self.metrics is not None:
            self.metrics.queue_checked(worker.transport.kind, worker.queue)
        waits = worker.transport.waits_for_messages
        started = time.monotonic()
        try:
            delivery = worker.transport.get(
                worker.queue,
                wait=self.take_wait if waits else None,
                stop=lambda: worker.retired or not self._taking_work(),
            )
        except Exception as error:
            self._unreserve()
            log.warning("polling %s failed: %s", worker.queue, error)
            return self._backoff(delay)
        self._last_answer = time.monotonic()
        if delivery is None:
            self._unreserve()
            # a wait that ran its course means an empty queue: wait again at once. An early empty
            # answer (the queue is gone, or the transport cannot wait) backs off instead.
            waited = waits and self._last_answer - started >= self.take_wait / 2
            return 0.0 if waited else self._backoff(delay)
        with self._cond:
            self._last_activity = time.monotonic()
        if self._process(worker, delivery) is Disposition.REQUEUE:
            return max(delay, REQUEUE_BACKOFF_SECONDS)
        return 0.0

    def _reserve(self) -> bool:
        """Count a task against ``limit_tasks`` before taking it, so concurrent queues cannot overshoot."""
        with self._cond:
            if self.limit_tasks and self._reserved >= self.limit_tasks:
                return False
            self._reserved += 1
            return True

    def _unreserve(self) -> None:
        with self._cond:
            self._reserved -= 1

    def _process(self, worker: _Worker, delivery: Delivery) -> Disposition | None:
        """Run the handler on its own thread while this (receiving) thread holds, then settles, the
        message; returns what was done with it (None when it was only given back unrun)."""
        job = _Job(queue=worker.queue)
        with self._cond:
            accepted = self._taking_work()
            if accepted:
                self._jobs[worker.key] = job
        if not accepted:  # stopped or drained while we were receiving
            self._unreserve()
            try:
                delivery.requeue()
            except Exception as error:
                log.warning(
                    "could not give back a message from %s (%s); the broker will redeliver it",
                    worker.queue,
                    error,
                )
            finally:
                delivery.close()
            return None
        message = Message(
            body=delivery.body,
            queue=delivery.queue,
            attempts=delivery.attempts,
            redelivered=delivery.redelivered,
            transport=worker.transport.kind,
            cancel=job.cancel,
        )
        try:
            log.debug("running a request from %s (attempt %d)", worker.queue, delivery.attempts)
            # the handler runs in a copy of this thread's context, so its log lines keep the queue
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._run_handler, job, message),
                name=f"handler {worker.queue}",
                daemon=True,
            ).start()
            try:
                delivery.hold_until(job.release)
            except Exception:
                log.exception(
                    "holding a message from %s failed; it stays ours until the run ends", worker.queue
                )
                job.release.wait()
            with logs.bound(experiment=(job.outcome.key or None) if job.outcome else None):
                return self._settle(delivery, job.outcome)
        finally:
            delivery.close()
            with self._cond:
                del self._jobs[worker.key]
                self._summary.handled += 1
                self._last_activity = time.monotonic()
                self._cond.notify_all()

    def _run_handler(self, job: _Job, message: Message) -> None:
        started = time.monotonic()
        try:
            outcome = self.handler(message)
            if not isinstance(outcome, Outcome):
                raise TypeError(f"the handler returned {type(outcome).__name__}, not an Outcome")
        except BaseException as error:  # a handler must never take the service down
            log.exception("the handler failed on a request from %s", job.queue)
            outcome = Outcome(
                Status.INFRASTRUCTURE,
                reason=f"the runner's handler raised {type(error).__name__}: {error}",
                duration_seconds=time.monotonic() - started,
            )
        if self.metrics is not None:
            self.metrics.message_handled(message.transport, outcome.status.value, time.monotonic() - started)
        job.outcome = outcome
        job.release.set()

    def _settle(self, delivery: Delivery, outcome: Outcome | None) -> Disposition | None:
        """Apply the outcome's disposition; a failure to settle leaves redelivery to the broker."""
        disposition: Disposition | None = None
        if outcome is None:
            with self._cond:
                self._summary.abandoned += 1
            action, operation = "give back", delivery.requeue
        else:
            with self._cond:
                self._statuses[outcome.status.value] += 1
            reason = f"{outcome.status.value}: {outcome.reason}" if outcome.reason else outcome.status.value
            disposition = outcome.disposition
            if disposition is Disposition.RETRY and delivery.attempts >= self.max_attempts:
                disposition = Disposition.REJECT
                reason = f"failed after {delivery.attempts} attempts: {reason}"
            action, operation = {
                Disposition.ACK: ("ack", delivery.ack),
                Disposition.REQUEUE: ("requeue", delivery.requeue),
                Disposition.RETRY: ("retry", lambda: delivery.retry(reason)),
                Disposition.REJECT: ("reject", lambda: delivery.reject(reason)),
                # its queue is gone: closing the delivery hands back whatever claim is left
                Disposition.RELEASE: ("release", lambda: None),
            }[disposition]
            log.info(
                "request from %s ended %s (attempt %d): %s",
                delivery.queue,
                outcome.status.value,
                delivery.attempts,
                action if disposition is not Disposition.REJECT else f"reject: {reason}",
            )
        try:
            operation()
        except Exception as error:
            with self._cond:
                self._summary.settle_failures += 1
            if disposition is Disposition.ACK and isinstance(error, DeliveryLost) and outcome is not None:
                with self._cond:
                    self._summary.lost_acks += 1
                log.error(
                    "LOST ACK: experiment %s from %s succeeded and its results are stored (%s), but the "
                    "broker no longer accepts its ack (%s). The broker hands the message out again; "
                    "that copy finds these results and is acked without running again. Frequent lost "
                    "acks mean runs outlast the broker's claim: see docs/brokers.md",
                    outcome.key or "?",
                    delivery.queue,
                    outcome.scrape_uri or "no scrape document",
                    error,
                )
                return disposition
            log.error(
                "could not %s a message from %s (%s); it is not lost: the broker redelivers it",
                action,
                delivery.queue,
                error,
            )
        return disposition
