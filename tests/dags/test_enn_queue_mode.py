"""The ENN DAG with ``mode=queue`` through real Airflow (``airflow dags test``), RabbitMQ, SeaweedFS
and two ``studio-runner serve`` processes standing in for the runner Deployments KEDA scales.

``airflow dags test`` runs one task at a time and a deferred task's trigger inline, so the DAG's
own ``queue_runners`` (which run beside ``train_queue`` under a scheduler) are set to 0 here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.provider.task_context import seaweed_conn_json
from tests.runner.results import scrape_documents

DAG_ID = "enn_generation"
DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "enn_generation.py"
POPULATION = 4


@pytest.fixture
def airflow_env(services, airflow_db) -> dict[str, str]:
    rabbitmq = {
        "conn_type": "studio_rabbitmq",
        "host": "127.0.0.1",
        "port": int(services.amqp_url.rsplit(":", 1)[1].split("/")[0]),
        "login": "guest",
        "password": "guest",
        "schema": "/",
        "extra": {"management_url": services.amqp_management_url},
    }
    return {
        **os.environ,
        "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
        "AIRFLOW_CONN_AWS_DEFAULT": seaweed_conn_json(services),
        "AIRFLOW_CONN_STUDIO_RABBITMQ_DEFAULT": json.dumps(rabbitmq),
    }


def test_the_dag_offers_both_modes_and_branches_between_them() -> None:
    dag = DagBag(dag_folder=str(DAG_FILE)).dags[DAG_ID]
    assert dag.params["mode"] == "mapped"
    assert set(dag.get_task("choose_mode").downstream_task_ids) == {"train", "train_queue", "runner_slots"}
    # select collects the mapped experiments itself (one hop fewer) or takes train_queue's table
    assert {"train", "train_queue"} <= set(dag.get_task("select").upstream_task_ids)


def test_a_queue_mode_generation_runs_through_airflow_with_two_runners(
    airflow_env, services, serve_runner, s3_client, bucket
) -> None:
    campaign = f"q{uuid.uuid4().hex[:8]}"
    env = {"AWS_ACCESS_KEY_ID": services.s3_access_key, "AWS_SECRET_ACCESS_KEY": services.s3_secret_key}
    [serve_runner("--queue-match", f"^rmq_enn_{campaign}$", env=env) for _ in range(2)]
    conf = {
        "campaign": campaign,
        "population": POPULATION,
        "generations": 1,
        "epochs": 1,
        "bucket": bucket,
        "mode": "queue",
        "queue_runners": 0,
        "generation": 0,
    }
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "-c", json.dumps(conf)],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "state=success" in log, log[-6000:]
    table = [
        json.loads(line)
        for line in s3_client.get_object(Bucket=bucket, Key=f"enn/{campaign}/generation-000/table.jsonl")[
            "Body"
        ]
        .read()
        .splitlines()
    ]
    assert len(table) == POPULATION
    assert all(row["status"] == "succeeded" and 0 < row["experiment.fitness"] <= 1 for row in table)
    for row in table:  # each genome ran once
        assert len(scrape_documents(s3_client, bucket, row["key"])) == 1
    summary = json.loads(
        s3_client.get_object(Bucket=bucket, Key=f"enn/{campaign}/generation-000/summary.json")["Body"].read()
    )
    assert summary["best_fitness"] == max(row["experiment.fitness"] for row in table)
