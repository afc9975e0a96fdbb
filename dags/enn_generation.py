"""ENN generations: one DAG run trains one generation of a population of neural networks.

    breed ──► train (one StudioML experiment per genome, mapped) ──► select ──► next_generation

``breed`` makes generation ``g`` from generation ``g - 1``'s results in S3 (generation 0 is
random); ``train`` runs each genome's experiment with ``StudioExperimentOperator`` (a GPU pod, or
the worker itself in local mode); ``select`` reads the experiments' scrape documents, scores the
generation, records its summary and the fitness plot, and decides whether another generation
follows; ``next_generation`` starts the run for ``g + 1``, or is skipped (with the reason) at the
generation limit or the target fitness. With ``mode=queue`` one ``train_queue`` task queues the
whole generation to ``rmq_enn_<campaign>`` and waits in the triggerer instead (runners: the
``queue_runners`` this DAG starts, or Deployments scaled by KEDA); selection and breeding are the
same. Few tasks between one generation's training and the next: each hop costs a task process
and a DAG parse. Each generation is one row in the Grid view, retried and cleared on its own;
clearing a generation re-runs it and, through ``reset_dag_run``, the ones after it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from airflow_provider_studio.operators.experiment import StudioExperimentOperator
from airflow_provider_studio.operators.generation import StudioGenerationOperator
from airflow_provider_studio.operators.queue_runner import StudioQueueRunnerOperator, exactly

DAG_ID = "enn_generation"
WORKLOAD = Path(__file__).parent / "enn" / "workload"
AWS_CONN_ID = "aws_default"
RABBITMQ_CONN_ID = "studio_rabbitmq_default"
QUEUE = "rmq_enn_{{ params.campaign }}"
"""Queue mode's StudioML queue: one per campaign, so runners of another campaign never take its work."""
FIELDS = ["experiment.fitness", "experiment.genome_id", "experiment.train_seconds"]
TABLE_URI = "s3://{{ params.bucket }}/enn/{{ params.campaign }}/generation-{{ '%03d' % params.generation }}/table.jsonl"
"""S3 for workspaces, results and campaign state; an ``endpoint_url`` extra points it at SeaweedFS or MinIO."""

PARAMS = {
    "campaign": Param(
        "digits",
        type="string",
        pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
        description="Names the campaign's S3 folder and run ids.",
    ),
    "generation": Param(
        0, type="integer", minimum=0, description="The generation this run trains (0 starts a campaign)."
    ),
    "generations": Param(
        4, type="integer", minimum=1, maximum=100, description="Stop after this many generations."
    ),
    "population": Param(8, type="integer", minimum=2, maximum=512, description="Genomes per generation."),
    "epochs": Param(
        2,
        type="integer",
        minimum=1,
        maximum=200,
        description="Training epochs per genome (few: the demo should show evolution, not patience).",
    ),
    "target_fitness": Param(
        0.995, type="number", minimum=0, maximum=1, description="Stop early at this validation accuracy."
    ),
    "seed": Param(3, type="integer", minimum=0, description="Seeds breeding: a campaign replays exactly."),
    "training_seed": Param(0, type="integer", minimum=0, description="Seeds each genome's mini-batch order."),
    "gpus_per_experiment": Param(
        0, type="integer", minimum=0, maximum=8, description="GPU cards per experiment (0 = CPU)."
    ),
    "bucket": Param(
        "studio-enn", type="string", description="S3 bucket for workspaces, results and the campaign's state."
    ),
    "mode": Param(
        "mapped",
        enum=["mapped", "queue"],
        description="mapped: one task instance per genome (tens to hundreds); queue: one task queues the "
        "generation to a StudioML queue that runners drain (thousands).",
    ),
    "queue_runners": Param(
        2,
        type="integer",
        minimum=0,
        maximum=64,
        description="Queue mode: runners this DAG starts (StudioQueueRunnerOperator); 0 when runner "
        "Deployments scaled by KEDA (deploy/keda) serve the queue.",
    ),
    "min_success_ratio": Param(
        1.0,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        description="Queue mode: the share of genomes that must succeed for the generation to go on.",
    ),
}


CAMPAIGN_RESULTS = AssetAlias("enn-campaign-results")
"""Each campaign's results (``s3://<bucket>/enn/<campaign>/``) is an Asset; its events, one per
generation, carry the generation, best and mean fitness and that generation's table URI."""

RESOURCES = {
    "cpus": 1,
    "ram": "1g",
    "hdd": "2g",
    # StudioML counts cards in gpuCount; gpus is the slots each card must have (spec §4.6), so
    # "GPU cards" asks for that many whole cards of any size, and 0 for none (gpus 0: no GPU)
    "gpuCount": "{{ params.gpus_per_experiment }}",
    "gpus": "{{ 1 if params.gpus_per_experiment else 0 }}",
}
"""Each experiment's StudioML ``resources_needed``; the pod's ``nvidia.com/gpu`` is ``gpuCount``."""
EXPERIMENT = {
    "script": "train_genome.py",
    "workspace": str(WORKLOAD),
    "results_bucket": "{{ params.bucket }}",
    "aws_conn_id": AWS_CONN_ID,
    "project": "enn-{{ params.campaign }}",
    "resources_needed": RESOURCES,
    "max_duration": "20m",
}
"""What every genome's experiment shares, in either mode (mapped ``train`` or queued ``train_queue``)."""


def _skip_unless_continuing(context: Any) -> None:
    """``next_generation`` runs only when ``select`` decided that another generation follows."""
    decision = context["ti"].xcom_pull(task_ids="select") or {}
    if not decision.get("continue"):
        raise AirflowSkipException(decision.get("reason") or "select decided that no generation follows")


def _campaign(params: dict[str, Any]):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from enn.campaign import Campaign

    return Campaign(S3Hook(aws_conn_id=AWS_CONN_ID), params["bucket"], params["campaign"])


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["studioml", "enn", "example"],
    doc_md=__doc__,
)
def enn_generation():
    @task
    def breed() -> list[dict[str, Any]]:
        """This generation's genomes, as the train task's mapped arguments (one experiment each)."""
        from enn.campaign import experiment_key
        from enn.evolution import initial_population, next_generation

        params = get_current_context()["params"]
        campaign = _campaign(params)
        campaign.ensure_bucket()
        generation, size, seed = params["generation"], params["population"], params["seed"]
        if generation == 0:
            population = initial_population(size, seed)
        else:
            population = next_generation(campaign.scored(generation - 1), size, seed, generation)
        campaign.save_population(generation, population)
        requirements = (WORKLOAD / "requirements.txt").read_text().split()
        training_seed = str(params["training_seed"])
        return [
            {
                "experiment_key": experiment_key(params["campaign"], generation, genome),
                "args": [
                    "--genome",
                    genome.to_json(),
                    "--epochs",
                    str(params["epochs"]),
                    "--seed",
                    training_seed,
                ],
                "pythonenv": requirements,
            }
            for genome in population
        ]

    @task.branch
    def choose_mode() -> list[str]:
        """Mapped: a task instance per genome; queue: one task for the whole generation."""
        if get_current_context()["params"]["mode"] == "queue":
            return ["train_queue", "runner_slots"]
        return ["train"]

    genomes = breed()
    mode = choose_mode()
    genomes >> mode

    train = StudioExperimentOperator.partial(
        task_id="train",
        **EXPERIMENT,
        fail_on_experiment_error=False,  # a genome that fails scores nothing; the generation goes on
        cache=True,  # clearing a generation re-runs only the genomes without a succeeded result
        map_index_template="{{ task.experiment_key }}",
    ).expand_kwargs(genomes)

    mode >> train

    train_queue = StudioGenerationOperator(
        task_id="train_queue",
        experiments=genomes,
        queue_name=QUEUE,
        **EXPERIMENT,
        rabbitmq_conn_id=RABBITMQ_CONN_ID,
        min_success_ratio="{{ params.min_success_ratio }}",
        cache=True,  # as train: publishes only the genomes without a succeeded result, under any key
        poll_interval=5.0,
        fields=FIELDS,
        output_uri=TABLE_URI,
    )

    @task
    def runner_slots() -> list[str]:
        """One queue match per runner this DAG starts (none: the queue's capacity comes from elsewhere)."""
        params = get_current_context()["params"]
        return [exactly(f"rmq_enn_{params['campaign']}")] * params["queue_runners"]

    slots = runner_slots()
    StudioQueueRunnerOperator.partial(
        task_id="queue_runners",
        rabbitmq_conn_id=RABBITMQ_CONN_ID,
        aws_conn_id=AWS_CONN_ID,
        limit_idle_duration="1m",
    ).expand(queue_match=slots)
    mode >> [train_queue, slots]

    @task(trigger_rule="all_done", outlets=[CAMPAIGN_RESULTS])  # a failed genome scores nothing
    def select(results: Any, queued: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Collect the generation's results (mapped: from the experiments' scrape documents; queue:
        the table ``train_queue`` returned), score it, record it, and decide whether another follows."""
        from enn.campaign import fitness_plot
        from enn.evolution import summarise

        context = get_current_context()
        params = context["params"]
        campaign = _campaign(params)
        generation = params["generation"]
        if params["mode"] == "queue":
            if queued is None:
                raise AirflowFailException("train_queue returned no table: the generation did not finish")
            table = queued
        else:
            table = campaign.collect(generation, results)
        scored = campaign.scored(generation)
        started = context["dag_run"].start_date
        summary = {
            "generation": generation,
            **summarise(scored),
            "experiments": len(table),
            "wall_seconds": round((datetime.now(started.tzinfo) - started).total_seconds(), 1)
            if started
            else None,
            "run_id": context["run_id"],
        }
        campaign.save_summary(generation, summary)
        history = campaign.summaries()
        plot = campaign.save_plot(fitness_plot(history, params["campaign"]))
        best = summary["best_fitness"] or 0.0
        if generation + 1 >= params["generations"]:
            reason = f"generation limit reached ({params['generations']} generations)"
        elif best >= params["target_fitness"]:
            reason = f"target fitness reached ({best:.4f} >= {params['target_fitness']})"
        else:
            reason = None
        context["outlet_events"][CAMPAIGN_RESULTS].add(
            Asset(
                uri=f"s3://{params['bucket']}/enn/{params['campaign']}/",
                name=f"enn-campaign-{params['campaign']}",
            ),
            extra={
                "generation": generation,
                "best_fitness": summary["best_fitness"],
                "mean_fitness": summary["mean_fitness"],
                "table_uri": campaign.table_uri(generation),
            },
        )
        print(f"generation {generation}: best {best:.4f}, mean {summary['mean_fitness']}, plot {plot}")
        print(f"stopping: {reason}" if reason else f"generation {generation + 1} follows")
        return {
            "summary": summary,
            "plot": plot,
            "continue": reason is None,
            "reason": reason,
            "next_conf": {**params, "generation": generation + 1},
            "next_run_id": f"{params['campaign']}-gen-{generation + 1:03d}",
        }

    decision = select(train.output, train_queue.output)
    TriggerDagRunOperator(
        task_id="next_generation",
        trigger_dag_id=DAG_ID,
        trigger_run_id=decision["next_run_id"],
        conf=decision["next_conf"],
        reset_dag_run=True,  # re-running generation g re-runs the generations that came from it
        wait_for_completion=False,
        pre_execute=_skip_unless_continuing,  # the decision stays visible: skipped, with the reason
    )


enn_generation()
