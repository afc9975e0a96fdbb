"""A local Airflow 3 (SQLite, LocalExecutor, the repo's ``dags/``) for the demo and for browsing runs.

``airflow standalone`` runs the scheduler, DAG processor, triggerer and API server (the UI)
together, bound to 127.0.0.1. Every user is an admin: the UI opens without a login, which is
fine for a loopback-only demo and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .services import REPO, Endpoints

DEFAULT_HOME = REPO / ".local" / "airflow"
API_PORT = 28080


class AirflowError(RuntimeError):
    """Airflow could not be set up or did not answer; the message says where to look."""


@dataclass
class LocalAirflow:
    home: Path
    endpoints: Endpoints
    port: int = API_PORT
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.home / "standalone.log"

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
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws),
        }

    def migrate(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env=self.environment(),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise AirflowError(f"airflow db migrate failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(
        self, command: tuple[str, ...] = ("standalone",), progress: Callable[[str], None] = print
    ) -> None:
        """Start ``airflow standalone`` (or only the API server, for browsing) and wait until healthy."""
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "airflow", *command],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AirflowError(f"airflow {' '.join(command)} exited; see {self.log_file}")
            if self._healthy(needs_scheduler=command == ("standalone",)):
                return
            time.sleep(1)
        raise AirflowError(f"Airflow did not become healthy in 180 s; see {self.log_file}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every Airflow process we started (one process group)."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    # --- the REST API --------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/api/v2{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token()}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            raise AirflowError(
                f"{method} {path}: HTTP {error.code}: {error.read()[:500].decode(errors='replace')}"
            ) from None

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        """Until the DAG processor has parsed ``dag_id`` without import errors."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = self.api("GET", "/importErrors")["import_errors"]
            if errors:
                raise AirflowError(
                    "DAG import errors:\n" + "\n".join(e["stack_trace"][-1500:] for e in errors)
                )
            try:
                self.api("GET", f"/dags/{dag_id}")
                return
            except AirflowError:
                time.sleep(2)
        raise AirflowError(f"DAG {dag_id} was not parsed within {timeout:.0f}s; see {self.log_file}")

    def _token(self) -> str:
        with urllib.request.urlopen(f"{self.url}/auth/token", timeout=10) as answer:
            return json.loads(answer.read())["access_token"]

    def _healthy(self, *, needs_scheduler: bool) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=3) as answer:
                health = json.loads(answer.read())
        except (OSError, ValueError):
            return False
        parts = (
            ("metadatabase", "scheduler", "triggerer", "dag_processor")
            if needs_scheduler
            else ("metadatabase",)
        )
        return all(health.get(part, {}).get("status") == "healthy" for part in parts)
