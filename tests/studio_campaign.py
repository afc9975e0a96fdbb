"""A small ENN campaign written to S3 and the Airflow database as the DAG leaves one.

Lets the Studio view's API be tested without training: the layout is the one
``dags/enn/campaign.py`` writes, and the scrape documents have the runner's blocks.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

DAG_ID = "enn_generation"


def genome(index: int, generation: int, parents: list[str]) -> dict[str, Any]:
    return {
        "hidden_layers": [32 + index],
        "activation": "relu",
        "learning_rate": 0.01,
        "weight_decay": 1e-05,
        "batch_size": 32,
        "init_seed": index,
        "parents": parents,
        "generation": generation,
        "genome_id": f"{generation:02d}{index:010d}",
    }


def output_tar(text: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = text.encode()
        info = tarfile.TarInfo("output")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_campaign(s3, bucket: str, campaign: str, sizes: list[int]) -> list[dict[str, Any]]:
    """Every generation's population, table, summary, scrape documents and outputs; returns the
    generations' runs as ``{run_id, conf, genomes, fitness}``."""
    runs = []
    previous: list[str] = []
    for generation, size in enumerate(sizes):
        prefix = f"enn/{campaign}/generation-{generation:03d}/"
        population = [genome(i, generation, previous[:2] if previous else []) for i in range(size)]
        rows, fitness = [], []
        for i, g in enumerate(population):
            key = f"enn-{campaign}-g{generation:03d}-{g['genome_id']}"
            value = round(0.5 + 0.01 * i + 0.1 * generation, 4)
            fitness.append(value)
            scrape_key = f"metadata/scrape-host-test-{key}.json"
            document = {
                "studioml": {
                    "experiment": {"key": key},
                    "status": "succeeded",
                    "log": [{"ts": "0", "msg": "Init"}],
                },
                "experiment": {"fitness": value, "genome_id": g["genome_id"], "train_seconds": 1.5},
                "runner": {"version": "0.1.0", "exit_code": 0},
            }
            s3.put_object(Bucket=bucket, Key=scrape_key, Body=json.dumps(document))
            s3.put_object(
                Bucket=bucket,
                Key=f"experiments/{key}/output.tar",
                Body=output_tar(f"epoch 1\nfitness {value}\n"),
            )
            rows.append(
                {
                    "key": key,
                    "status": "succeeded",
                    "scrape_uri": f"s3://{bucket}/{scrape_key}",
                    "artifacts": {},
                    "experiment.fitness": value,
                    "experiment.genome_id": g["genome_id"],
                    "experiment.train_seconds": 1.5,
                    "error": None,
                }
            )
        summary = {
            "generation": generation,
            "count": size,
            "failures": 0,
            "best_fitness": max(fitness),
            "mean_fitness": sum(fitness) / size,
            "worst_fitness": min(fitness),
            "experiments": size,
            "wall_seconds": 30.0,
            "run_id": f"{campaign}-gen-{generation:03d}",
        }
        s3.put_object(Bucket=bucket, Key=prefix + "population.json", Body=json.dumps(population))
        s3.put_object(Bucket=bucket, Key=prefix + "table.jsonl", Body="\n".join(json.dumps(r) for r in rows))
        s3.put_object(Bucket=bucket, Key=prefix + "summary.json", Body=json.dumps(summary))
        conf = {"campaign": campaign, "generation": generation, "bucket": bucket, "population": size}
        runs.append({"run_id": summary["run_id"], "conf": conf, "genomes": population, "fitness": fitness})
        previous = [g["genome_id"] for g in population]
    return runs


def record_runs(runs: list[dict[str, Any]], dag_id: str = DAG_ID) -> None:
    """The generations' DAG runs in the Airflow database, as triggering them would leave them."""
    import pendulum
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        for run in runs:
            session.add(
                DagRun(
                    dag_id=dag_id,
                    run_id=run["run_id"],
                    run_type="manual",
                    conf=run["conf"],
                    state="success",
                    run_after=pendulum.now("UTC"),
                )
            )
