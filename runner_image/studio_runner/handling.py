"""What ``serve`` does with one message: open it, run it, and remember how it ended.

It sits between ``service`` (which moves messages and settles them) and ``experiment`` (which
runs one request), so that neither knows about envelopes, metrics, response queues or the
``serve --result-file`` summary, and ``cli`` only wires the pieces together.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import logs
from .envelope import RunnerKeyring, open_message
from .experiment import ExperimentRunner
from .outcome import Outcome, Status
from .request import RequestError, Resources
from .summary import HandledExperiment

if TYPE_CHECKING:
    from .metrics import RunnerMetrics
    from .reports import Reporter, ResponseQueues
    from .service import Message

log = logging.getLogger(__name__)

RECENT_EXPERIMENTS = 100
"""``serve --result-file`` lists at most this many (the latest) experiments; the counts cover all."""


class MessageHandler:
    """The service's handler: one message in, one ``Outcome`` out; safe to call from several threads
    at once (one per queue)."""

    def __init__(
        self,
        runner: ExperimentRunner,
        metrics: RunnerMetrics,
        *,
        keys: RunnerKeyring | None = None,
        clear_text_allowed: bool = False,
        responses: ResponseQueues | None = None,
    ) -> None:
        self.runner = runner
        self.metrics = metrics
        self.keys = keys
        self.clear_text_allowed = clear_text_allowed
        self.responses = responses
        self._wanted: dict[str, Resources] = {}
        self._recent: collections.deque[HandledExperiment] = collections.deque(maxlen=RECENT_EXPERIMENTS)

    def fits(self, queue: str) -> bool:
        """The service's capacity check: would the last request seen on ``queue`` fit now?"""
        wanted = self._wanted.get(queue)
        return wanted is None or self.runner.resources.fits(wanted)

    def recent(self) -> list[HandledExperiment]:
        """The latest experiments handled, oldest first, as ``serve --result-file`` lists them."""
        return list(self._recent)

    def __call__(self, message: Message) -> Outcome:
        queue = message.queue
        with logs.bound(queue=queue):
            try:
                request = open_message(
                    message.body, queue, self.keys, clear_text_allowed=self.clear_text_allowed
                )
            except RequestError as error:
                log.warning("rejecting a message from %s: %s", queue, error)
                self._remember(None, message, Status.INVALID, str(error))
                return Outcome(Status.INVALID, reason=str(error))
            self._wanted[queue] = request.experiment.resources_needed
            with logs.bound(experiment=request.key):
                log.info(
                    "experiment %s from %s (attempt %d%s)",
                    request.key,
                    queue,
                    message.attempts,
                    ", redelivered" if message.redelivered else "",
                )
                with (
                    self.metrics.experiment_started(
                        message.transport, queue, request.project, request.key, request.experiment.time_added
                    ),
                    self._reporting(message, request.key) as reporter,
                ):
                    outcome = self.runner.run(
                        request, cancel=message.cancel, reporter=reporter, redelivered=message.taken_before
                    )
                log.info(
                    "experiment %s %s%s",
                    request.key,
                    outcome.status.value,
                    f": {outcome.reason}" if outcome.reason else "",
                )
                self._remember(request.key, message, outcome.status, outcome.reason)
                return outcome

    def _remember(self, key: str | None, message: Message, status: Status, reason: str | None) -> None:
        self._recent.append(HandledExperiment.of(key, message.queue, message.attempts, status, reason))

    @contextlib.contextmanager
    def _reporting(self, message: Message, key: str) -> Iterator[Reporter]:
        """The attempt's reporter, closed (its reports flushed) when the attempt is over."""
        from .reports import NO_REPORTS

        if self.responses is None or message.transport != "rmq":  # upstream reported on RabbitMQ only
            yield NO_REPORTS
            return
        reporter = self.responses.open(message.queue, key)
        try:
            yield reporter
        finally:
            reporter.close()
