"""A local Airflow 3 (SQLite, LocalExecutor, the repo's ``dags/``) for the demo and for browsing runs.

``airflow standalone`` runs the scheduler, DAG processor, triggerer and API server (the UI)
together, bound to 127.0.0.1. Every user is an admin: the UI opens without a login, which is
fine for a loopback-only demo and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from .services import REPO, Endpoints, Server, free_port, port_free

DEFAULT_HOME = REPO / ".local" / "airflow"
API_PORT = 28080
HEALTH_PARTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
PRELOADED_MODULES = (
    "airflow.providers.amazon.aws.hooks.s3",
    "airflow.providers.standard.operators.trigger_dagrun",
    "airflow_provider_studio.operators.experiment",
    "matplotlib.pyplot",
)
"""What the example DAGs' tasks import. The LocalExecutor forks its workers from the scheduler and
each task process from a worker, so what the scheduler imported at start is already there: a
task's DAG parse then takes a fraction of a second instead of several (Kubernetes clients, boto3)
on 2 busy cores, and a generation's few task hops cost little more than the scheduler's loop."""
LOCAL_SETTINGS_MARK = "# written by devtools/local_airflow.py"


class AirflowError(RuntimeError):
    """Airflow could not be set up or did not answer; the message says where to look."""


@dataclass
class LocalAirflow:
    home: Path
    endpoints: Endpoints
    port: int = API_PORT
    process: subprocess.Popen[bytes] | None = None
    server: Server | None = None
    """The process group of ``process`` (standalone and everything it started)."""
    dags_folder: Path = REPO / "dags"
    triggerer: subprocess.Popen[bytes] | None = None
    """A triggerer :meth:`start_triggerer` started, replacing standalone's own."""
    triggerer_server: Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.home / "standalone.log"

    @property
    def pid_file(self) -> Path:
        """The running Airflow's process group, so an interrupted demo's Airflow is found and stopped."""
        return self.home / "standalone.pid.json"

    @property
    def triggerer_pid_file(self) -> Path:
        return self.home / "triggerer.pid.json"

    def stop_leftover(self) -> bool:
        """Stop an Airflow that an earlier, killed demo left running on this home: its scheduler
        would pick up this run's tasks with that run's settings (ports, connections)."""
        stopped = False
        for pid_file in (self.triggerer_pid_file, self.pid_file):
            try:
                leftover = Server(**json.loads(pid_file.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            pid_file.unlink(missing_ok=True)
            if leftover.alive():
                leftover.stop(timeout=30)
                stopped = True
        return stopped

    def choose_port(self) -> None:
        """Keep the usual UI port when it is free; another checkout's Airflow may hold it."""
        if not port_free(self.port):
            self.port = free_port()

    def environment(self) -> dict[str, str]:
        """Airflow settings and the ``aws_default`` connection (SeaweedFS) for every Airflow process."""
        bin_dir = str(Path(sys.executable).parent)
        aws = {
            "conn_type": "aws",
            "login": self.endpoints.s3_access_key,
            "password": self.endpoints.s3_secret_key,
            "extra": {"endpoint_url": self.endpoints.s3_endpoint, "region_name": self.endpoints.region},
        }
        return {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            # Demo settings for 2 cores (issue 11): the DAG files do not change during a demo, so
            # the DAG processor lists the folder often (a new checkout's DAGs appear in seconds)
            # but re-parses each file rarely and with one process, leaving the cores to training;
            # the scheduler looks again a quarter second after an idle loop, not a second, so
            # the next task of a generation starts as soon as the previous one has ended.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",
            # a cold machine's first import of the providers takes tens of seconds on 2 busy cores
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "180",
            "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws),
        }

    def write_local_settings(self) -> None:
        """``config/airflow_local_settings.py`` (on every Airflow process's path, imported at its
        start) preloading :data:`PRELOADED_MODULES`; a file someone else wrote is left alone."""
        path = self.home / "config" / "airflow_local_settings.py"
        if path.exists() and LOCAL_SETTINGS_MARK not in path.read_text():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            LOCAL_SETTINGS_MARK,
            "import matplotlib",
            "",
            'matplotlib.use("Agg")',
            *(f"import {module}  # noqa: E402,F401" for module in PRELOADED_MODULES),
            "",
            "__all__: list[str] = []  # no policies or settings: Airflow takes public names as overrides",
        ]
        path.write_text("\n".join(lines) + "\n")

    def migrate(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_local_settings()
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env=self.environment(),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise AirflowError(f"airflow db migrate failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(
        self,
        command: tuple[str, ...] = ("standalone",),
        progress: Callable[[str], None] = print,
        timeout: float = 300,
    ) -> None:
        """Start ``airflow standalone`` (or only the API server, for browsing) and wait until healthy.

        Another checkout's Airflow may take the port between our check and our bind; then its
        health would look like ours and its API would get our DAG runs. So the answer must come
        from our own process group, else we start again on a free port.
        """
        for _attempt in range(3):
            if self._start_once(command, progress, timeout):
                return
            self.stop()
            self.port = free_port()
            progress(f"another Airflow took the port first; starting again on {self.url}")
        raise AirflowError(f"another process kept taking Airflow's port; see {self.log_file}")

    def _start_once(self, command: tuple[str, ...], progress: Callable[[str], None], timeout: float) -> bool:
        """True once healthy, False when a process outside ours answers on the port."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.process, self.server = self._spawn("airflow", command, self.log_file, self.pid_file)
        needs = HEALTH_PARTS if command == ("standalone",) else ("metadatabase",)
        started = time.monotonic()
        said = started
        while time.monotonic() - started < timeout:
            listener = self._listener()
            if listener is not None and not self._ours(listener):
                return False
            if self.process.poll() is not None:
                raise AirflowError(f"airflow {' '.join(command)} exited; see {self.log_file}")
            waiting = self._unhealthy(needs) if listener is not None else ["api server", *needs[1:]]
            if not waiting:
                return True
            if time.monotonic() - said >= 15:
                said = time.monotonic()
                progress(
                    f"waiting for Airflow ({time.monotonic() - started:.0f} s): {', '.join(waiting)} not healthy yet"
                )
            time.sleep(1)
        raise AirflowError(f"Airflow did not become healthy in {timeout:.0f} s; see {self.log_file}")

    def _listener(self) -> int | None:
        """The PID listening on our port (0 when it cannot be told, e.g. another user's); None if none."""
        for connection in psutil.net_connections(kind="tcp"):
            if (
                connection.status == psutil.CONN_LISTEN
                and connection.laddr
                and connection.laddr.port == self.port
            ):
                return connection.pid or 0
        return None

    def _ours(self, pid: int) -> bool:
        try:
            return self.process is not None and pid > 0 and os.getpgid(pid) == self.process.pid
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every Airflow process we started (one process group, and a triggerer we restarted)."""
        if self.triggerer_server is not None:
            self.triggerer_server.stop(timeout=timeout)
            self.triggerer_server = None
        self.triggerer_pid_file.unlink(missing_ok=True)
        if self.process is not None and self.server is not None:
            self.server.stop(timeout=timeout)  # the whole group, even once standalone itself has exited
            self.process.poll()
        self.pid_file.unlink(missing_ok=True)

    def _spawn(
        self, name: str, command: tuple[str, ...], log_file: Path, pid_file: Path
    ) -> tuple[subprocess.Popen[bytes], Server]:
        """``airflow <command>`` in its own process group, output to ``log_file``, remembered in
        ``pid_file`` so that a later run finds and stops it if this one is killed."""
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "airflow", *command],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = Server.of(name, process.pid)
        pid_file.write_text(json.dumps(asdict(server)))
        return process, server

    # --- restarting the triggerer ------------------------------------------------------------
    def stop_triggerer(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Stop only the triggerer, as a rollout (SIGTERM to its main process, which should shut
        down cleanly) or a lost node (SIGKILL to it and its trigger-runner child) would; the
        scheduler, DAG processor and API server keep running and deferred tasks stay deferred."""
        (main,) = self._triggerer_processes()
        tree = [main, *main.children(recursive=True)]
        for process in tree if sig == signal.SIGKILL else [main]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while (alive := [p for p in tree if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if alive:
            raise AirflowError(
                f"the triggerer did not stop within {timeout:.0f} s of {sig.name}; see {self.log_file}"
            )

    def start_triggerer(self, timeout: float = 180.0) -> None:
        """Start a new triggerer (after :meth:`stop_triggerer`) and wait until its job heartbeats.
        Its output goes to ``triggerer.log`` in the home; :meth:`stop` stops it too."""
        if self._triggerer_processes():
            raise AirflowError("a triggerer is still running: stop it first")
        before = self._latest_triggerer_job()
        self.triggerer, self.triggerer_server = self._spawn(
            "triggerer", ("triggerer",), self.home / "triggerer.log", self.triggerer_pid_file
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.triggerer.poll() is not None:
                raise AirflowError(f"the new triggerer exited; see {self.home / 'triggerer.log'}")
            job = self._latest_triggerer_job()
            if job and job["id"] != (before or {}).get("id") and job["state"] == "running":
                return
            time.sleep(1)
        raise AirflowError(
            f"the new triggerer did not start within {timeout:.0f} s; see {self.home / 'triggerer.log'}"
        )

    def _triggerer_processes(self) -> list[psutil.Process]:
        """The running main triggerer process (standalone's child or ours), without its children."""
        roots = [p.pid for p in (self.process, self.triggerer) if p is not None and p.poll() is None]
        found: list[psutil.Process] = []
        for root in roots:
            try:
                tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in tree:
                try:
                    if (
                        _running(process)
                        and "triggerer" in process.cmdline()
                        and "triggerer" not in process.parent().cmdline()
                    ):
                        found.append(process)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, AttributeError):
                    continue
        return found

    def _latest_triggerer_job(self) -> dict[str, Any] | None:
        jobs = self.api("GET", "/jobs?job_type=TriggererJob&order_by=-id&limit=1")["jobs"]
        return jobs[0] if jobs else None

    # --- the REST API --------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None, *, patience: float = 120) -> Any:
        """One REST call. Reads (GET) are retried for ``patience`` seconds while the API server
        does not answer: on 2 busy cores a single call can take longer than its 30 s timeout."""
        deadline = time.monotonic() + (patience if method == "GET" else 0)
        while True:
            try:
                return self._call(method, path, body)
            except OSError as error:
                if time.monotonic() >= deadline:
                    raise AirflowError(
                        f"{method} {path}: Airflow at {self.url} did not answer ({error}); see {self.log_file}"
                    ) from None
                time.sleep(3)

    def _call(self, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/api/v2{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {self._token()}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            raise AirflowError(
                f"{method} {path}: HTTP {error.code}: {error.read()[:500].decode(errors='replace')}"
            ) from None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of one DAG run (mapped ones one by one), across the API's pages."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.api(
                "GET", f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances?limit=100&offset={len(found)}"
            )
            found.extend(page["task_instances"])
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                return found

    def task_log(self, ti: dict[str, Any]) -> Path:
        """Where the task's log file is (Airflow's default ``log_filename_template``)."""
        folder = (
            self.home
            / "logs"
            / f"dag_id={ti['dag_id']}"
            / f"run_id={ti['dag_run_id']}"
            / f"task_id={ti['task_id']}"
        )
        if ti.get("map_index", -1) >= 0:
            folder = folder / f"map_index={ti['map_index']}"
        return folder / f"attempt={max(1, ti.get('try_number') or 1)}.log"

    def wait_for_dag(
        self, dag_id: str, timeout: float = 300, progress: Callable[[str], None] = print
    ) -> None:
        """Until the DAG processor has parsed ``dag_id``; an import error fails at once, except a
        parse that timed out (a cold, busy machine), which the DAG processor soon tries again."""
        started = time.monotonic()
        said = started
        while time.monotonic() - started < timeout:
            errors = self.api("GET", "/importErrors")["import_errors"]
            lasting = [e for e in errors if "AirflowTaskTimeout" not in e["stack_trace"]]
            if lasting:
                raise AirflowError(
                    "DAG import errors:\n" + "\n".join(e["stack_trace"][-1500:] for e in lasting)
                )
            try:
                self.api("GET", f"/dags/{dag_id}")
                return
            except AirflowError:
                time.sleep(2)
            if time.monotonic() - said >= 15:
                said = time.monotonic()
                slow = " (a parse timed out; it is tried again)" if errors else ""
                progress(f"waiting for the DAG processor to parse {dag_id} ({said - started:.0f} s){slow}")
        raise AirflowError(f"DAG {dag_id} was not parsed within {timeout:.0f}s; see {self.log_file}")

    def _token(self) -> str:
        with urllib.request.urlopen(f"{self.url}/auth/token", timeout=10) as answer:
            return json.loads(answer.read())["access_token"]

    def _unhealthy(self, parts: tuple[str, ...]) -> list[str]:
        """The parts not yet healthy; all of them while the API server does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=3) as answer:
                health = json.loads(answer.read())
        except (OSError, ValueError):
            return ["api server", *parts[1:]]
        return [part for part in parts if (health.get(part) or {}).get("status") != "healthy"]


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie: standalone never reaps the triggerer it started, so once stopped
    the triggerer stays a zombie until standalone ends."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
