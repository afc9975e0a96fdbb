"""A generation shaped like ``enn_generation``'s (mapped train with ``cache=True``, then collect),
with a stand-in workload whose genomes can be made to fail: the memoization tests and
``bench/memo_rerun.py`` run it with ``DAG.test`` (what ``airflow dags test`` calls) at a fixed
logical date and run time, so a second run replaces the first under the same run id and every
task runs again with the same experiment keys, as clearing the generation's run does."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task

from airflow_provider_studio.operators.experiment import StudioExperimentOperator
from airflow_provider_studio.operators.metadata import MetadataScrapeOperator

DAG_ID = "memo_generation"
WORKLOAD = Path(__file__).parent / "workload"


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "bucket": Param("studio-memo", type="string"),
        "genomes": Param(8, type="integer", minimum=1),
        "seconds": Param(1.0, type="number", minimum=0),
        "faults": Param("", type="string", description="folder whose genome-<i> files make genome i fail"),
    },
)
def memo_generation():
    @task
    def breed() -> list[list[str]]:
        params = get_current_context()["params"]
        return [
            [
                "--genome",
                str(i),
                "--seconds",
                str(params["seconds"]),
                "--fail-while",
                f"{params['faults']}/genome-{i}",
            ]
            for i in range(params["genomes"])
        ]

    train = StudioExperimentOperator.partial(
        task_id="train",
        script="genome.py",
        workspace=str(WORKLOAD),
        results_bucket="{{ params.bucket }}",
        aws_conn_id="aws_default",
        cache=True,
        fail_on_experiment_error=False,
        map_index_template="{{ experiment_key }}",
    ).expand(args=breed())

    MetadataScrapeOperator(
        task_id="collect",
        experiments=train.output,
        bucket="{{ params.bucket }}",
        aws_conn_id="aws_default",
        fields=["experiment.genome", "experiment.fitness"],
        allow_missing=True,
        trigger_rule="all_done",
    )


generation = memo_generation()
