"""A task's surroundings for operator tests that call ``execute`` in this process: the Task SDK's
own template context, a task instance that records XComs, and the session's SeaweedFS as an
Airflow AWS connection."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from airflow.sdk import BaseOperator
from moto import mock_aws

from tests import task_context


def seaweed_conn_json(services) -> str:
    return json.dumps(
        {
            "conn_type": "aws",
            "login": services.s3_access_key,
            "password": services.s3_secret_key,
            "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
        }
    )


def runtime_context(op: BaseOperator, *, run_id: str = "manual__2026-03-01T00:00:00+00:00") -> Any:
    """The Task SDK's own template context for ``op`` in a manual run whose conf names generation 12."""
    return task_context.runtime_context(op, conf={"generation": 12}, run_id=run_id)


class RecordingTI:
    """Stands in for the task instance where a test runs ``execute`` in this process."""

    def __init__(self, dag_id: str = "studio_local", task_id: str = "run", map_index: int = -1) -> None:
        self.dag_id, self.task_id, self.map_index = dag_id, task_id, map_index
        self.run_id = "manual__2026-03-01T00:00:00+00:00"
        self.try_number = 1
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


@contextlib.contextmanager
def moto_s3_connection(
    monkeypatch: pytest.MonkeyPatch, conn_id: str, *, login: str, password: str
) -> Iterator[str]:
    """AWS S3 (moto, eu-west-1) behind Airflow connection ``conn_id``, with none of this process's
    own AWS credentials in the way; yields the results bucket."""
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps(
            {"conn_type": "aws", "login": login, "password": password, "extra": {"region_name": "eu-west-1"}}
        ),
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        bucket = "studio-results-eu"
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        yield bucket
