"""Session-wide real servers: one RabbitMQ, SeaweedFS and moto SQS for the whole test run.

They bind free loopback ports, so a developer's own brokers (or the demo's) keep running
undisturbed. A server that cannot start fails the session loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.services import Endpoints, Ports, ServiceSet

REPO_ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ("tests.fixtures_runner",)
"""The real StudioML client and ``studio-runner serve`` fixtures, for every test folder."""

# Airflow reads its configuration when first imported, so the private AIRFLOW_HOME (SQLite in a
# temporary folder, the example DAGs as the dags folder) must be in place before any test module
# imports it. Subprocesses (`airflow dags test`, `studio-runner`) inherit the same settings.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="studio-airflow-home-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
    }
)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database, created once for the tests that need one."""
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def service_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceSet]:
    services = ServiceSet(data_dir=tmp_path_factory.mktemp("services"), ports=Ports.free())
    services.start()
    yield services
    services.stop()


@pytest.fixture(scope="session")
def services(service_set: ServiceSet) -> Endpoints:
    return service_set.endpoints


@pytest.fixture(scope="session")
def s3_client(services: Endpoints):
    """A boto3 S3 client for checking what the code under test stored."""
    return services.s3_client()


@pytest.fixture
def bucket(s3_client) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
