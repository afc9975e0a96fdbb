"""The ENN generations DAG through real Airflow (``airflow dags test``), SeaweedFS and the runner.

Two small generations: generation 0 trains a random population and triggers generation 1;
generation 1 is bred from generation 0's results in S3, keeps its best genomes and stops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.provider.task_context import seaweed_conn_json
from tests.runner.results import scrape_documents

DAG_ID = "enn_generation"
POPULATION = 4


@pytest.fixture
def airflow_env(services, airflow_db) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
        "AIRFLOW_CONN_AWS_DEFAULT": seaweed_conn_json(services),
    }


def run_generation(env: dict[str, str], conf: dict) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "-c", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "DagRun Finished" in log and "state=success" in log, log[-6000:]
    return log


def s3_json(s3_client, bucket: str, key: str):
    return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def run_conf(run_id: str) -> dict | None:
    """The conf of a DAG run in the test's Airflow database, None if there is no such run."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id).one_or_none()
        return None if run is None else dict(run.conf or {})


def test_two_generations_evolve_through_airflow(airflow_env, s3_client, bucket):
    campaign = f"t{uuid.uuid4().hex[:8]}"
    conf = {"campaign": campaign, "population": POPULATION, "generations": 2, "epochs": 2, "bucket": bucket}
    prefix = f"enn/{campaign}"

    log = run_generation(airflow_env, {**conf, "generation": 0})
    assert "--genome" in log, "the workload's command line reaches the task log"
    population0 = s3_json(s3_client, bucket, f"{prefix}/generation-000/population.json")
    assert len(population0) == POPULATION
    table0 = [
        json.loads(line)
        for line in s3_client.get_object(Bucket=bucket, Key=f"{prefix}/generation-000/table.jsonl")["Body"]
        .read()
        .splitlines()
    ]
    assert len(table0) == POPULATION
    assert all(row["status"] == "succeeded" and 0 < row["experiment.fitness"] <= 1 for row in table0)
    for row in table0:  # every experiment left its scrape document, with the workload's values in it
        (document,) = scrape_documents(s3_client, bucket, row["key"])
        assert document["experiment"]["fitness"] == row["experiment.fitness"]
        assert document["studioml"]["status"] == "succeeded"
    summary0 = s3_json(s3_client, bucket, f"{prefix}/generation-000/summary.json")
    assert summary0["best_fitness"] == max(row["experiment.fitness"] for row in table0)
    assert s3_client.head_object(Bucket=bucket, Key=f"{prefix}/fitness.png")["ContentLength"] > 1000

    triggered = run_conf(f"{campaign}-gen-001")
    assert triggered is not None, "generation 0 triggers the run of generation 1"
    assert triggered["generation"] == 1 and triggered["campaign"] == campaign

    run_generation(airflow_env, {**conf, "generation": 1})
    population1 = s3_json(s3_client, bucket, f"{prefix}/generation-001/population.json")
    ids0 = {genome["genome_id"] for genome in population0}
    best0 = max(table0, key=lambda row: row["experiment.fitness"])["experiment.genome_id"]
    ids1 = [genome["genome_id"] for genome in population1]
    assert ids1[0] == best0, "the best genome of generation 0 survives at the head of generation 1"
    children = [genome for genome in population1 if genome["genome_id"] not in ids0]
    assert children and all(set(child["parents"]) <= ids0 and child["parents"] for child in children)
    summary1 = s3_json(s3_client, bucket, f"{prefix}/generation-001/summary.json")
    assert summary1["best_fitness"] >= summary0["best_fitness"]
    assert run_conf(f"{campaign}-gen-002") is None, "the generation limit stops the chain"
