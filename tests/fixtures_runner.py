"""End-to-end fixtures: the real ``studioml`` client and ``studio-runner serve`` processes.

A ``pytest_plugins`` module (registered in tests/conftest.py), so the runner, provider, DAG and
security tests all get the same fixtures without importing a conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from devtools.services import Endpoints
from tests.runner.processes import RunnerProcess

STUDIOML_VERSION = "0.0.44.post6"
"""The last release whose CompletionService imports and works unpatched (STUDIOML_CLIENT.md)."""

STUDIOML_PINS = ("urllib3<2", "requests-toolbelt<1")
"""Without these, ``import studio.runner`` fails on Python 3.11."""


def build_studioml_client(repo_root: Path) -> Path:
    """A virtualenv with the real StudioML client, kept under ``.cache/`` between sessions; its bin folder."""
    venv = repo_root / ".cache" / f"studioml-client-{STUDIOML_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if not marker.exists():
        shutil.rmtree(venv, ignore_errors=True)
        uv = Path(sys.executable).parent / "uv"
        subprocess.run([str(uv), "venv", "--quiet", "--python", "3.11", str(venv)], check=True)
        subprocess.run(
            [
                str(uv),
                "pip",
                "install",
                "--quiet",
                "--python",
                str(python),
                f"studioml=={STUDIOML_VERSION}",
                *STUDIOML_PINS,
            ],
            check=True,
        )
        marker.touch()
    return venv / "bin"


@pytest.fixture(scope="session")
def studioml_client(repo_root: Path) -> Path:
    return build_studioml_client(repo_root)


@dataclass
class StudioClient:
    """Runs the real client's commands and scripts with a config that points at our servers."""

    bin_dir: Path
    config: Path
    home: Path
    bucket: str
    sqs_endpoint: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_"))}
        env.update(
            HOME=str(self.home),
            PATH=f"{self.bin_dir}:{env.get('PATH', '')}",
            AWS_ENDPOINT_URL_SQS=self.sqs_endpoint,
        )
        return env

    def run(
        self, workspace: Path, queue: str, script: str, *args: str, key: str, options: tuple[str, ...] = ()
    ) -> None:
        """``studio run --queue=... script args``: publishes and returns, as the client does."""
        command = [
            "studio-run",
            f"--config={self.config}",
            f"--queue={queue}",
            f"--experiment={key}",
            *options,
            script,
            *args,
        ]
        result = subprocess.run(
            command, cwd=workspace, env=self.env(), capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"studio run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    def python(self, script: str, *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "python"), "-c", script],
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def make_studio_client(bin_dir: Path, services: Endpoints, bucket: str, folder: Path) -> StudioClient:
    """A client whose config (written under ``folder``) points at ``services`` and stores in ``bucket``."""
    credentials = {"aws": {"access_key": services.s3_access_key, "secret_access_key": services.s3_secret_key}}
    store = {"type": "s3", "endpoint": services.s3_endpoint, "bucket": bucket, "credentials": credentials}
    config = {
        "database": {**store, "authentication": "none"},
        "storage": store,
        "cloud": {
            "queue": {
                "rmq": services.amqp_url,
                # the client's SQS queue reads keys here; AWS_ENDPOINT_URL_SQS (see env) points it at moto
                "sqs": {"credentials": {"aws": {**credentials["aws"], "region": services.region}}},
            }
        },
        "env": {
            "AWS_ACCESS_KEY_ID": services.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": services.s3_secret_key,
            "AWS_DEFAULT_REGION": services.region,
            "PYTHONUNBUFFERED": "1",
        },
        "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "1g", "gpus": 0},
        "saveWorkspaceFrequency": "1m",
        "experimentLifetime": "30m",
        "verbose": "error",
        "sleep_time": 1,
    }
    path = folder / "studioml-config.yaml"
    path.write_text(yaml.safe_dump(config))
    home = folder / "client-home"
    home.mkdir()
    return StudioClient(
        bin_dir=bin_dir, config=path, home=home, bucket=bucket, sqs_endpoint=services.sqs_endpoint
    )


@pytest.fixture
def studio_client(studioml_client: Path, services: Endpoints, s3_client, tmp_path: Path) -> StudioClient:
    bucket = f"studio-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    return make_studio_client(studioml_client, services, bucket, tmp_path)


@pytest.fixture(scope="session")
def runner_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv and download cache for every runner in the session: the client's freeze builds once."""
    return tmp_path_factory.mktemp("runner-cache")


@pytest.fixture
def serve_runner(
    services: Endpoints, runner_cache: Path, tmp_path: Path
) -> Iterator[Callable[..., RunnerProcess]]:
    """Start ``studio-runner serve`` processes for a test; all are stopped when it ends."""
    started: list[RunnerProcess] = []

    def start(*options: str, env: dict[str, str] | None = None) -> RunnerProcess:
        log = tmp_path / f"runner-{len(started)}.log"
        command = [
            str(Path(sys.executable).parent / "studio-runner"),
            "serve",
            "--working-dir",
            str(tmp_path / f"work-{len(started)}"),
            "--cache-dir",
            str(runner_cache),
            "--amqp-url",
            services.amqp_url,
            "--amqp-mgt-url",
            services.amqp_management_url,
            *options,
        ]
        if "--prom-address" not in options:
            command += ["--prom-address", "off"]  # tests that read metrics choose a free port
        full_env = {**os.environ, "AWS_DEFAULT_REGION": services.region, **(env or {})}
        with open(log, "wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=full_env)
        runner = RunnerProcess(process, log)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()
