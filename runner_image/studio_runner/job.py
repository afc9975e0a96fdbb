"""Running one workload: the job script, its process group, its output and its time limit.

The workload runs through a generated bash script, as upstream did, because the client
shell-quotes ``filename`` and ``args`` and expects a shell to un-quote them. The runner owns
the whole process group (and session) it starts: on a deadline or a cancel every process in
it is stopped, and processes the workload leaves behind are stopped when it exits, so a
finished attempt leaves nothing running on the allocated cores and GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .layout import ExperimentLayout
from .request import Request

logger = logging.getLogger(__name__)

SCRIPT_NAME = "runner.sh"
EOF_WAIT_SECONDS = 2.0
"""After every process of the job is gone, how long to wait for the output pipe to close.

Only a process that left the job's session (``setsid``, a daemon) can still hold it; its
output is then abandoned rather than letting it keep the runner waiting.
"""
MAX_LINE_BYTES = 64 * 1024
"""A longer run of output without a newline is passed to ``on_line`` in pieces of this size."""
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_READS_PER_WAKEUP = 16
_CANCEL_POLL_SECONDS = 0.1
_MEMBER_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class JobResult:
    """How the workload ended. Times are wall-clock (``time.time()``).

    ``exit_code`` is the script's exit status, or the negative signal number when it died of a
    signal (Python's convention; the script ``exec``s the workload, so a killed workload reads
    ``-15``/``-9``, never bash's ``128+n``). ``None`` means it was never started, because the
    deadline had already passed or the cancel was already set.
    """

    exit_code: int | None
    timed_out: bool
    cancelled: bool
    started_at: float
    ended_at: float
    first_output_at: float | None


def bash_double_quoted(value: str) -> str:
    """``value`` for use inside ``"..."`` in bash with ``$VAR``/``${VAR}`` still expanded.

    ``"``, ``\\`` and backticks are escaped, and ``$(`` too, so a value can reference variables
    but not run commands; ``\\$`` is kept, so a value can still ask for a literal ``$``.
    """
    out = []
    i = 0
    while i < len(value):
        char = value[i]
        following = value[i + 1] if i + 1 < len(value) else ""
        if char == "\\" and following == "$":
            out.append("\\$")
            i += 2
            continue
        if char in '"\\`':
            out.append("\\" + char)
        elif char == "$" and following == "(":
            out.append("\\$")
        else:
            out.append(char)
        i += 1
    return "".join(out)


def write_job_script(
    layout: ExperimentLayout,
    request: Request,
    *,
    python: Path,
    exports: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<runner_dir>/runner.sh`` (mode 0700) and return its path.

    ``exports`` (see ``jobenv.job_script_exports``) become ``export NAME="value"`` lines so
    bash expands their ``$VAR`` references against the job environment. ``filename`` and
    ``args`` are inserted verbatim: the client already shell-quoted each of them, and the
    ``module`` form arrives as filename ``-m`` with the module as the first argument.
    """
    experiment = request.experiment
    lines = ["#!/bin/bash", f"# studio-runner job script for experiment attempt {layout.name}"]
    for name, value in (exports or {}).items():
        if not _SHELL_NAME.match(name):
            raise ValueError(f"{name!r} is not a shell variable name")
        lines.append(f'export {name}="{bash_double_quoted(value)}"')
    lines.append(f"cd -- {shlex.quote(str(layout.workspace_dir))} || exit 1")
    command = ["exec", shlex.quote(str(python)), "-u", experiment.filename, *experiment.args]
    lines.append(" ".join(part for part in command if part != ""))
    script = layout.runner_dir / SCRIPT_NAME
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o700)
    try:
        os.fchmod(fd, 0o700)
        os.write(fd, ("\n".join(lines) + "\n").encode())
    finally:
        os.close(fd)
    return script


def run_job(
    script: Path,
    *,
    env: Mapping[str, str],
    cwd: Path,
    output_file: Path,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    grace_seconds: float = 10.0,
    on_line: Callable[[str], None] | None = None,
) -> JobResult:
    """Run ``/bin/bash script`` in a new session and wait for it and everything it started.

    stdout and stderr share one pipe, so their lines keep the order they were written in;
    each chunk is appended to ``output_file`` as soon as it is read and each line goes to
    ``on_line`` (keep it quick: output is not read while it runs). On ``deadline``
    (``time.monotonic()``) or ``cancel`` the job's processes get SIGTERM, and SIGKILL after
    ``grace_seconds``; the same happens to processes still running when the script exits.
    """
    now = time.time()
    if deadline is not None and time.monotonic() >= deadline:
        return JobResult(None, True, False, now, now, None)
    if cancel is not None and cancel.is_set():
        return JobResult(None, False, True, now, now, None)
    with open(output_file, "ab", buffering=0) as output:
        started_at = time.time()
        process = subprocess.Popen(
            ["/bin/bash", str(script)],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            bufsize=0,
        )
        watcher = _Watcher(process, output, deadline, cancel, grace_seconds, on_line)
        try:
            watcher.run()
        finally:
            watcher.close()
    return JobResult(
        exit_code=process.returncode,
        timed_out=watcher.timed_out,
        cancelled=watcher.cancelled,
        started_at=started_at,
        ended_at=time.time(),
        first_output_at=watcher.first_output_at,
    )


class _Watcher:
    """The loop of ``run_job``: output, exit, deadline, cancel and the kill sequence."""

    RUNNING, STOPPING, STOPPED = "running", "stopping", "stopped"

    def __init__(
        self,
        process: subprocess.Popen,
        output,
        deadline: float | None,
        cancel: threading.Event | None,
        grace_seconds: float,
        on_line: Callable[[str], None] | None,
    ) -> None:
        self.process = process
        self.session = process.pid  # start_new_session: session id = group id = pid
        self.output = output
        self.deadline = deadline
        self.cancel = cancel
        self.grace = max(0.0, grace_seconds)
        self.on_line = on_line
        self.timed_out = False
        self.cancelled = False
        self.first_output_at: float | None = None
        self.state = self.RUNNING
        self.kill_at: float | None = None
        self.give_up_at: float | None = None
        self.pending = b""
        self.callback_failed = False
        assert process.stdout is not None
        self.pipe = process.stdout.fileno()
        os.set_blocking(self.pipe, False)
        self.pipe_open = True
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.pipe, selectors.EVENT_READ, "pipe")
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(process.pid)
            self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            self.pidfd = None  # no pidfd: notice the exit by polling

    def run(self) -> None:
        while True:
            now = time.monotonic()
            exited = self.process.poll() is not None
            if self.state == self.RUNNING:
                if exited:
                    if _job_processes(self.session):
                        self._stop("the script exited; stopping the processes it left running")
                    else:
                        self._stopped(now)
                elif self.deadline is not None and now >= self.deadline:
                    self.timed_out = True
                    self._stop("time limit reached")
                elif self.cancel is not None and self.cancel.is_set():
                    self.cancelled = True
                    self._stop("cancelled")
            if self.state == self.STOPPING:
                if exited and not _job_processes(self.session):
                    self._stopped(now)
                elif self.kill_at is not None and now >= self.kill_at:
                    _signal_job(self.session, signal.SIGKILL)
                    self._stopped(now)
            if self.state == self.STOPPED and exited and self._output_done(now):
                break
            self._wait(self._timeout(now, exited))
        self._flush_pending()

    def _output_done(self, now: float) -> bool:
        """The pipe closed, or only a process that left the session can still be holding it."""
        return not self.pipe_open or (self.give_up_at is not None and now >= self.give_up_at)

    def _stop(self, why: str) -> None:
        logger.info("job %d: %s; SIGTERM, SIGKILL after %.0f s", self.session, why, self.grace)
        _signal_job(self.session, signal.SIGTERM)
        self.state = self.STOPPING
        self.kill_at = time.monotonic() + self.grace

    def _stopped(self, now: float) -> None:
        self.state = self.STOPPED
        self.give_up_at = now + EOF_WAIT_SECONDS

    def _timeout(self, now: float, exited: bool) -> float | None:
        waits: list[float] = []
        if self.state == self.RUNNING:
            if self.deadline is not None:
                waits.append(self.deadline - now)
            if self.cancel is not None:
                waits.append(_CANCEL_POLL_SECONDS)
        elif self.state == self.STOPPING:
            waits.append(_MEMBER_POLL_SECONDS)
            if self.kill_at is not None:
                waits.append(self.kill_at - now)
        elif exited and self.give_up_at is not None:
            waits.append(self.give_up_at - now)
        if self.pidfd is None and not exited:
            waits.append(_MEMBER_POLL_SECONDS)
        return max(0.0, min(waits)) if waits else None

    def _wait(self, timeout: float | None) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data == "exit":
                self.selector.unregister(key.fd)  # stays readable once the process has exited
            else:
                self._read()

    def _read(self) -> None:
        for _ in range(_READS_PER_WAKEUP):  # bounded, so a flood of output cannot hide the deadline
            try:
                chunk = os.read(self.pipe, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.pipe_open = False
                self.selector.unregister(self.pipe)
                return
            if self.first_output_at is None:
                self.first_output_at = time.time()
            view = memoryview(chunk)
            while view:
                view = view[self.output.write(view) :]
            self._lines(chunk)

    def _lines(self, chunk: bytes) -> None:
        if self.on_line is None:
            return
        data = self.pending + chunk
        *lines, self.pending = data.split(b"\n")
        for line in lines:
            self._emit(line)
        while len(self.pending) >= MAX_LINE_BYTES:
            self._emit(self.pending[:MAX_LINE_BYTES])
            self.pending = self.pending[MAX_LINE_BYTES:]

    def _flush_pending(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = b""

    def _emit(self, line: bytes) -> None:
        assert self.on_line is not None
        text = line.decode("utf-8", "replace")
        if text.endswith("\r"):
            text = text[:-1]
        try:
            self.on_line(text)
        except Exception:
            if not self.callback_failed:
                logger.exception(
                    "job %d: on_line callback failed; output still goes to the file", self.session
                )
            self.callback_failed = True

    def close(self) -> None:
        """Leave nothing behind, even when the loop was interrupted."""
        if self.process.poll() is None or _job_processes(self.session):
            _signal_job(self.session, signal.SIGKILL)
        self.process.wait()
        self.selector.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _signal_job(session: int, sig: int) -> None:
    """Signal the job's process group and any of its session that moved to another group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, sig)
    for pid in _job_processes(session):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _job_processes(session: int) -> list[int]:
    """Live (non-zombie) processes in the job's session or process group, from ``/proc``."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return _group_alive_fallback(session)
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 4 or fields[0] in (b"Z", b"X"):
            continue
        if int(fields[2]) == session or int(fields[3]) == session:
            members.append(int(name))
    return members


def _group_alive_fallback(session: int) -> list[int]:
    try:
        os.killpg(session, 0)
    except (ProcessLookupError, PermissionError):
        return []
    return [session]
