"""One queue-mode generation (``StudioGenerationOperator``) whose experiments each wait for the test
to open their gate (a file), so tests/dags/test_generation_triggerer_restart.py decides when each
finishes and can stop the triggerer while the generation is still running."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

from airflow_provider_studio.operators.generation import StudioGenerationOperator

DAG_ID = "generation_restart"
WORKLOAD = Path(__file__).parent / "workload"


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "queue": Param("rmq_generation_restart", type="string"),
        "bucket": Param("studio-restart", type="string"),
        "genomes": Param(4, type="integer", minimum=1),
        "gates": Param("", type="string", description="folder whose open-<i> file lets genome i finish"),
    },
)
def generation_restart():
    @task
    def breed() -> list[dict[str, object]]:
        params = get_current_context()["params"]
        return [
            {"experiment_key": f"{params['queue']}-g{i}", "args": [params["gates"], str(i)]}
            for i in range(params["genomes"])
        ]

    StudioGenerationOperator(
        task_id="train",
        experiments=breed(),
        queue_name="{{ params.queue }}",
        results_bucket="{{ params.bucket }}",
        script="gated.py",
        workspace=str(WORKLOAD),
        poll_interval=1.0,
        fields=["experiment.fitness"],
    )


generation_restart()
