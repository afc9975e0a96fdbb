"""One experiment attempt, start to end: the runner's straight path.

decode → time limit → allocate resources → fetch artifacts → prepare the (cached) virtualenv
→ run the job under its deadline → scrape metadata → upload results (``_metadata`` last)
→ an ``Outcome`` whose disposition tells the queue what to do with the message.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import logs
from .artifacts import ArtifactError, ArtifactSet, find_earlier_success
from .cache import DownloadCache
from .checkpoints import Checkpointer
from .interpreters import PythonEnvError
from .job import JobResult, run_job, write_job_script
from .jobenv import job_environment, job_script_exports
from .layout import ExperimentLayout
from .lease import DEFAULT_PERIOD_SECONDS, LeaseKeeper, read_lease
from .limits import TimeLimit, checkpoint_period, time_limit
from .metadata import RunnerFacts, ScrapeFile, accession_id, scrape_file_name
from .outcome import Outcome, Status
from .pythonenv import VirtualenvCache
from .reports import NO_REPORTS, Reporter
from .request import Request
from .requirements import groom
from .resources import Allocation, ResourcePool, ResourceUnavailable
from .storage import Storage

log = logging.getLogger(__name__)


@dataclass
class ExperimentRunner:
    """What every attempt on this runner shares: storage clients, caches and the resource pool."""

    working_dir: Path
    storage: Storage
    venvs: VirtualenvCache
    resources: ResourcePool
    cache: DownloadCache | None = None
    host: str = field(default_factory=socket.gethostname)
    schema_logs: bool = True
    keep_workdirs: bool = False
    env_passthrough: tuple[str, ...] = ()
    grace_seconds: float = 30.0
    retval_refresh_seconds: float | None = 5.0
    """Re-upload ``retval`` this long after the results, for CompletionService clients that
    record their submit time late (see STUDIOML_CLIENT.md); None to skip (``run`` mode)."""
    on_line: Callable[[str], None] | None = None
    """Receives every line of the experiment's console log (runner notes and workload output)."""
    lease_seconds: float = DEFAULT_PERIOD_SECONDS
    """How often a running attempt renews its lease (``lease.py``)."""
    late_refreshes: LateRefreshes = field(default_factory=lambda: LateRefreshes(), repr=False)

    def finish_late_refreshes(self, timeout: float) -> None:
        """Before the process exits: run the pending ``retval`` refreshes, waiting at most ``timeout``."""
        self.late_refreshes.finish(timeout)

    def run(
        self,
        request: Request,
        *,
        cancel: threading.Event | None = None,
        reporter: Reporter = NO_REPORTS,
        redelivered: bool = False,
    ) -> Outcome:
        """``reporter`` receives this attempt's progress reports (response queue, spec §2.8).

        ``redelivered``: the message may have been taken before (a runner died holding it, or it
        is a retry copy), so an attempt that already stored its results is looked for first.
        """
        cancel = cancel or threading.Event()
        started = time.time()
        limit = time_limit(request, now=started)
        if limit.expired:
            return (redelivered and self._earlier_success(request)) or Outcome(
                Status.EXPIRED, reason="experimentLifetime passed before the run started", key=request.key
            )
        try:
            allocation = self.resources.allocate(request.experiment.resources_needed)
        except ResourceUnavailable as error:
            return Outcome(Status.NO_CAPACITY, reason=str(error), key=request.key)
        with allocation:
            # after the allocation, so that a request requeued for capacity does not search each time
            if redelivered:
                earlier = self._earlier_attempt_running(request) or self._earlier_success(request)
                if earlier is not None:
                    return earlier
            layout = ExperimentLayout.create(self.working_dir, request.key)
            attempt = _Attempt(self, request, layout, allocation, started, reporter)
            lease = LeaseKeeper(
                request, self.storage, accession=attempt.accession, host=self.host, period=self.lease_seconds
            )
            with logs.bound(experiment=request.key):
                try:
                    with lease:
                        outcome = attempt.run(limit, cancel)
                        lease.end(outcome.status.value)  # after the results are stored
                        return outcome
                finally:
                    attempt.clean_up()

    def _earlier_attempt_running(self, request: Request) -> Outcome | None:
        """RUNNING_ELSEWHERE while an earlier attempt's lease is alive: the broker's claim ended
        (consumer_timeout, SQS visibility ceiling) but that attempt still runs; never run twice."""
        try:
            lease = read_lease(request, self.storage)
        except Exception as error:  # cannot tell: running it is the side that loses nothing
            log.warning("could not read the lease of %s (%s); running it", request.key, error)
            return None
        if lease is None or not lease.alive():
            return None
        log.info(
            "experiment %s: an earlier attempt still runs (%s); giving this copy back until it ends",
            request.key,
            lease.describe(),
        )
        return Outcome(
            Status.RUNNING_ELSEWHERE,
            reason=f"an earlier attempt still runs: {lease.describe()}",
            key=request.key,
        )

    def _earlier_success(self, request: Request) -> Outcome | None:
        """SUCCEEDED when an earlier attempt stored its results but died before its ack."""
        try:
            uri = find_earlier_success(request, self.storage)
        except Exception as error:  # cannot tell: running it again is the side that loses nothing
            log.warning("could not look for an earlier success of %s (%s); running it", request.key, error)
            return None
        if uri is None:
            return None
        log.info(
            "experiment %s: an earlier attempt already stored its results (%s); acking without running it again",
            request.key,
            uri,
        )
        return Outcome(
            Status.SUCCEEDED,
            reason=f"an earlier attempt already stored its results ({uri})",
            key=request.key,
            scrape_uri=uri,
        )


class _Attempt:
    """The state of one attempt, so each step below stays a few readable lines."""

    def __init__(
        self,
        runner: ExperimentRunner,
        request: Request,
        layout: ExperimentLayout,
        allocation: Allocation,
        started: float,
        reporter: Reporter = NO_REPORTS,
    ) -> None:
        self.reporter = reporter
        self.runner = runner
        self.request = request
        self.layout = layout
        self.allocation = allocation
        self.started = started
        self.accession = accession_id(runner.host, started)
        # kept for the whole attempt, so each checkpoint reads only the console's new output
        self.scrape_file = ScrapeFile(
            layout.output_file, layout.metadata_dir, self.accession, schema_logs=runner.schema_logs
        )
        self.artifacts = ArtifactSet(request, layout, runner.storage, cache=runner.cache, note=self.note)
        self.job_started: float | None = None
        self._retval_pending = False

    def note(self, line: str) -> None:
        """A runner line in the experiment's own console log, so the user sees it in ``output``."""
        with open(self.layout.output_file, "a", encoding="utf-8") as output:
            output.write(f"studio-runner: {line}\n")
        self._line(f"studio-runner: {line}")

    def _line(self, line: str) -> None:
        if self.runner.on_line is not None:
            self.runner.on_line(line)
        self.reporter.line(line)

    def run(self, limit: TimeLimit, cancel: threading.Event) -> Outcome:
        self.reporter.started(self.accession)
        try:
            status, reason, exit_code = self._execute(limit, cancel)
            outcome = self._finish(status, reason, exit_code)
        except BaseException as error:
            self.reporter.stopped(False, f"the runner failed: {error}")
            raise
        success = outcome.status is Status.SUCCEEDED and outcome.results_saved
        self.reporter.stopped(success, outcome.reason, outcome.exit_code)
        return outcome

    def _execute(self, limit: TimeLimit, cancel: threading.Event) -> tuple[Status, str, int | None]:
        request = self.request
        deadline = time.monotonic() + limit.seconds
        try:
            self.note(f"experiment {request.key} attempt {self.accession} on {self.runner.host}")
            self.artifacts.fetch_all()
            requirements = groom(
                request.experiment.pythonenv,
                request.config.pip,
                workspace=self.layout.workspace_dir,
                gpu=bool(self.allocation.gpus),
                warn=self.note,
            )
            venv = self.runner.venvs.ensure(request.experiment.pythonver, requirements, log=_debug)
            for warning in venv.warnings:
                self.note(warning)
            if venv.restored:
                self.note(f"environment {venv.key} restored from cache in {venv.seconds:.1f} s")
            else:
                self.note(
                    f"python environment {venv.key} ({'built' if venv.built else 'cached'}, {venv.seconds:.1f}s)"
                )
            allocation_env = self.allocation.env()
            passthrough = self.runner.env_passthrough
            script = write_job_script(
                self.layout,
                request,
                python=venv.python,
                exports=job_script_exports(request, allocation_env=allocation_env, passthrough=passthrough),
            )
            env = job_environment(
                request, self.layout, venv=venv, allocation_env=allocation_env, passthrough=passthrough
            )
            with self.runner.venvs.in_use(venv), Checkpointer(checkpoint_period(request), self._checkpoint):
                self.job_started = time.time()
                result = run_job(
                    script,
                    env=env,
                    cwd=self.layout.runner_dir,
                    output_file=self.layout.output_file,
                    deadline=deadline,
                    cancel=cancel,
                    grace_seconds=self.runner.grace_seconds,
                    on_line=self._line if self.runner.on_line or self.reporter is not NO_REPORTS else None,
                )
        except ArtifactError as error:
            return (Status.INVALID if error.permanent else Status.INFRASTRUCTURE), str(error), None
        except PythonEnvError as error:
            # one rule (PythonEnvError.permanent): what no runner can install is refused and
            # dead-lettered; an unreachable index or a broken build is retried
            self.note(f"python environment failed: {error}")
            status = Status.INVALID if error.permanent else Status.INFRASTRUCTURE
            return status, f"python environment failed: {error}", None
        return _ending(result, limit, getattr(cancel, "withdrawn", None))

    def _checkpoint(self) -> None:
        self._scrape(status="running", exit_code=None, stopped=None)
        self.artifacts.checkpoint()
        self.artifacts.upload_metadata()

    def _scrape(
        self, *, status: str, exit_code: int | None, stopped: float | None, reason: str = ""
    ) -> Path | None:
        facts = RunnerFacts(
            host=self.runner.host,
            key=self.request.key,
            project=self.request.project,
            artifacts={
                label: self.artifacts.uri(label)
                for label, a in self.request.experiment.artifacts.items()
                if a.qualified
            },
            load_time=self.started,
            start_time=self.job_started,
            stop_time=stopped,
            status=status,
            exit_code=exit_code,
            reason=reason or None,
        )
        return self.scrape_file.write(before=facts.before(), after=facts.after(), final=stopped is not None)

    def _finish(self, status: Status, reason: str, exit_code: int | None) -> Outcome:
        stopped = time.time()
        if status is not Status.SUCCEEDED:
            self.note(f"{status.value}: {reason}")
        self._scrape(status=status.value, exit_code=exit_code, stopped=stopped, reason=reason)
        outcome = Outcome(
            status,
            reason=reason,
            key=self.request.key,
            exit_code=exit_code,
            duration_seconds=stopped - self.started,
            scrape_uri=self.artifacts.scrape_uri(scrape_file_name(self.accession)),
        )
        try:
            outcome.artifacts = self.artifacts.upload_results()
        except ArtifactError as error:
            outcome.results_saved = False
            outcome.reason = (
                f"{reason}; results not saved: {error}" if reason else f"results not saved: {error}"
            )
            return outcome
        self._retval_pending = "retval" in outcome.artifacts
        return outcome

    def clean_up(self) -> None:
        """Remove the attempt's folders, after one late ``retval`` refresh when one is due."""
        if self.runner.keep_workdirs:
            return
        delay = self.runner.retval_refresh_seconds
        if not self._retval_pending or delay is None:
            self.layout.remove()
            return

        def refresh_then_remove() -> None:
            try:
                self.artifacts.refresh_retval()
            except ArtifactError as error:
                log.warning("late retval refresh for %s failed: %s", self.request.key, error)
            finally:
                self.layout.remove()

        self.runner.late_refreshes.schedule(delay, refresh_then_remove, name=f"retval {self.request.key}")


class LateRefreshes:
    """The ``retval`` refreshes due a few seconds after their attempts, each on its own thread.

    The threads are daemons so that nothing can hold a stopping runner for ever; ``finish``
    is what keeps them from being lost when ``serve`` exits right after a task.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[_LateRefresh] = set()

    def schedule(self, delay: float, action: Callable[[], None], *, name: str) -> None:
        # threads start with an empty context: carry the experiment and queue into its log lines
        refresh = _LateRefresh(time.monotonic() + delay, contextvars.copy_context(), action, self._done)
        with self._lock:
            self._pending.add(refresh)
        threading.Thread(target=refresh.run, name=name, daemon=True).start()

    def finish(self, timeout: float) -> None:
        """Run every pending refresh: at its due time when that comes within ``timeout``, else now."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            pending = list(self._pending)
        if pending:
            log.info("waiting up to %.0fs for %d late retval refresh(es)", timeout, len(pending))
        for refresh in pending:
            if refresh.due > deadline:
                refresh.hurry.set()
            refresh.finished.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = len(self._pending)
        if left:
            log.warning(
                "%d late retval refresh(es) did not finish within %.0fs; exiting without them", left, timeout
            )

    def _done(self, refresh: _LateRefresh) -> None:
        with self._lock:
            self._pending.discard(refresh)


@dataclass(eq=False)
class _LateRefresh:
    due: float
    context: contextvars.Context
    action: Callable[[], None]
    done: Callable[[_LateRefresh], None]
    hurry: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            self.hurry.wait(max(0.0, self.due - time.monotonic()))
            self.context.run(self.action)
        finally:
            self.done(self)
            self.finished.set()


def _ending(result: JobResult, limit: TimeLimit, withdrawn: str | None) -> tuple[Status, str, int | None]:
    if result.cancelled and withdrawn:
        return Status.CANCELLED, withdrawn, result.exit_code
    if result.cancelled:
        return (
            Status.INTERRUPTED,
            "the runner is stopping; the experiment goes back to the queue",
            result.exit_code,
        )
    if result.timed_out:
        if limit.cause == "lifetime":
            return Status.EXPIRED, "experimentLifetime ran out during the run", result.exit_code
        return Status.TIMED_OUT, f"killed after max_duration ({limit.seconds:.0f}s)", result.exit_code
    if result.exit_code == 0:
        return Status.SUCCEEDED, "", 0
    return Status.FAILED, f"the workload exited with status {result.exit_code}", result.exit_code


def _debug(line: str) -> None:
    log.debug("pip: %s", line)
