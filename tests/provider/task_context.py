"""A task's surroundings for operator tests that call ``execute`` in this process: the Task SDK's
own template context, a task instance that records XComs, and the session's SeaweedFS as an
Airflow AWS connection."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pendulum
from airflow.sdk import BaseOperator
from airflow.sdk.api.datamodels._generated import DagRun, DagRunState, DagRunType, TIRunContext
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance


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
    """The Task SDK's own template context for ``op``, as a worker builds it (no server needed)."""
    when = pendulum.datetime(2026, 3, 1, tz="UTC")
    dag_run = DagRun(
        dag_id=op.dag_id,
        run_id=run_id,
        logical_date=when,
        data_interval_start=when,
        data_interval_end=when,
        run_after=when,
        start_date=when,
        end_date=None,
        run_type=DagRunType.MANUAL,
        state=DagRunState.RUNNING,
        consumed_asset_events=[],
        partition_key=None,
        conf={"generation": 12},
    )
    ti = RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(),
        task_id=op.task_id,
        dag_id=op.dag_id,
        run_id=run_id,
        try_number=1,
        dag_version_id=uuid.uuid4(),
        map_index=-1,
        task=op,
        start_date=when,
        max_tries=0,
    )
    ti._ti_context_from_server = TIRunContext(dag_run=dag_run, max_tries=0)
    return ti.get_template_context()


class RecordingTI:
    """Stands in for the task instance where a test runs ``execute`` in this process."""

    def __init__(self, dag_id: str = "studio_local", task_id: str = "run", map_index: int = -1) -> None:
        self.dag_id, self.task_id, self.map_index = dag_id, task_id, map_index
        self.run_id = "manual__2026-03-01T00:00:00+00:00"
        self.try_number = 1
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value
