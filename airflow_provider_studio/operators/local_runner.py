"""``studio-runner`` as a child process of the Airflow worker: the ``local`` execution mode.

Operators run the very same runner command they would run in a pod, so what passes in CI in
``local`` mode is what runs on the cluster. The child gets its own session, so the supervisor's
signals to the task's process group cannot cut it short; :meth:`LocalRunnerProcess.stop` sends
SIGTERM (the runner stops its workload and uploads what it has, or gives queued work back) and
SIGKILL only after a grace period. Its output reaches the task log as it comes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from airflow.sdk import conf

_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_POLL_SECONDS = 0.2
TAIL_LINES = 20
"""Runner log lines kept to explain a runner that left no result."""


class LocalRunnerProcess:
    """One ``studio-runner`` child: started, relayed into ``log``, and stopped gracefully on demand.

    stdout (the experiment's console in ``run`` mode) is relayed line by line at INFO; stderr (the
    runner's JSON events) one readable line per event at the event's own level.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        log: logging.Logger,
        kill_grace_period: float,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.log = log
        self.kill_grace_period = kill_grace_period
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.process: subprocess.Popen[bytes] | None = None

    def run(self, stdin: bytes | None = None) -> int:
        """Start the runner, hand it ``stdin``, relay its output until it exits; its exit status.

        Anything that interrupts the wait (the task being stopped) stops the runner first.
        """
        process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        self.process = process
        relays = [
            threading.Thread(target=self._relay_console, args=(process.stdout,), daemon=True),
            threading.Thread(target=self._relay_runner_log, args=(process.stderr,), daemon=True),
        ]
        for relay in relays:
            relay.start()
        try:
            assert process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                if stdin:
                    process.stdin.write(stdin)
                process.stdin.close()
            while process.poll() is None:
                time.sleep(_POLL_SECONDS)
        except BaseException:
            self.stop()
            raise
        finally:
            for relay in relays:
                relay.join(timeout=30)
        return process.returncode

    def stop(self) -> None:
        """SIGTERM (the runner saves or gives back its work), SIGKILL after the grace period."""
        process = self.process
        if process is None or process.returncode is not None or _exited(process.pid):
            return
        self.log.warning(
            "stopping studio-runner (pid %d): SIGTERM now, SIGKILL in %.0fs",
            process.pid,
            self.kill_grace_period,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace_period
        while time.monotonic() < deadline:
            if _exited(process.pid):
                return
            time.sleep(_POLL_SECONDS)
        self.log.error("studio-runner (pid %d) still running; killing it", process.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def last_lines(self) -> str:
        return "\n".join(self.tail) or "(no output)"

    def _relay_console(self, stream: IO[bytes]) -> None:
        """The experiment's console (runner notes and workload output), line by line, as it comes."""
        for raw in iter(stream.readline, b""):
            self.log.info("%s", raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        stream.close()

    def _relay_runner_log(self, stream: IO[bytes]) -> None:
        """The runner's JSON events as one readable line each, at their own level."""
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "msg" in event:
                level = _LOG_LEVELS.get(str(event.get("level", "info")).lower(), logging.INFO)
                text = str(event["msg"])
                if event.get("error"):
                    text += "\n" + str(event["error"])
                self.log.log(level, "studio-runner: %s", text)
            else:
                text = line
                self.log.warning("studio-runner: %s", text)
            self.tail.append(text)
        stream.close()


def worker_environment(reserved: Collection[str]) -> dict[str, str]:
    """The worker's environment less Airflow's settings (which can hold secrets) and less the
    ``reserved`` runner options, whose stray worker values would override the operator's."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AIRFLOW", "_AIRFLOW")) and name not in reserved
    }


def local_dirs() -> tuple[Path, Path]:
    """Working and cache folders for local runs; persistent by default, so the venv cache is reused."""
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    work = conf.get("studio", "local_working_dir", fallback="") or ""
    cache = conf.get("studio", "local_cache_dir", fallback="") or ""
    return (
        Path(work).expanduser() if work.strip() else home / "studio-runner" / "work",
        Path(cache).expanduser() if cache.strip() else home / "studio-runner" / "cache",
    )


def local_command(subcommand: str, result_file: Path, *options: str) -> list[str]:
    """``studio-runner <subcommand>`` for this worker: its summary to ``result_file``, the worker's
    persistent folders, and JSON events (which :class:`LocalRunnerProcess` relays by level)."""
    work_dir, cache_dir = local_dirs()
    return [
        *runner_command(),
        subcommand,
        "--result-file",
        str(result_file),
        "--working-dir",
        str(work_dir),
        "--cache-dir",
        str(cache_dir),
        "--log-format",
        "json",
        *options,
    ]


def runner_command() -> list[str]:
    """``studio-runner`` beside this interpreter (virtualenvs), on PATH, or as a module."""
    beside = Path(sys.executable).parent / "studio-runner"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("studio-runner")
    if found:
        return [found]
    return [sys.executable, "-m", "studio_runner.cli"]


def read_summary(path: Path) -> dict[str, Any] | None:
    """The JSON object a runner left in its ``--result-file``; None if it left none."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _exited(pid: int) -> bool:
    """Whether a child has ended, without reaping it (so no lock is shared with Popen.poll)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
