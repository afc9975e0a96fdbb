"""The Task SDK's own template context for an operator, as a worker builds it (no API server).

Rendering an operator with it shows exactly what a task would run: its templates, the DAG's
params merged with the run's conf (and validated against them), and the run's identity.
"""

from __future__ import annotations

import uuid
from typing import Any

import pendulum
from airflow.sdk.api.datamodels._generated import DagRun, DagRunState, DagRunType, TIRunContext
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance


def runtime_context(
    op: Any,
    *,
    conf: dict[str, Any] | None = None,
    run_id: str = "manual__2026-03-01T00:00:00+00:00",
    map_index: int = -1,
) -> Any:
    """The context a worker would give ``op`` in a manual run with ``conf``."""
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
        conf=conf or {},
    )
    ti = RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(),
        task_id=op.task_id,
        dag_id=op.dag_id,
        run_id=run_id,
        try_number=1,
        dag_version_id=uuid.uuid4(),
        map_index=map_index,
        task=op,
        start_date=when,
        max_tries=0,
    )
    ti._ti_context_from_server = TIRunContext(dag_run=dag_run, max_tries=0)
    return ti.get_template_context()
