"""A generation of 1,000 trivial experiments in queue mode vs mapped mode, through real Airflow.

Private RabbitMQ and SeaweedFS, a fresh Airflow home with SQLite, and two DAGs written to a
scratch dags folder: ``scale_queue`` (one ``StudioGenerationOperator`` task; two local
``studio-runner serve`` processes drain its queue) and ``scale_mapped`` (``StudioExperimentOperator``
mapped over the genomes in local execution mode, then ``MetadataScrapeOperator``). Each runs with
``airflow dags test``, which runs one task instance at a time and a deferred task's trigger
inline. Printed: wall time, per-experiment time, task instances, rows added to the metadata DB,
and lost or duplicated experiments (scrape documents per key: exactly one each).

    .venv/bin/python bench/generation_scale.py [--experiments 1000] [--mapped-experiments 5 25]

Mapped mode at 1,000 takes over an hour here (one ``studio-runner run`` process per task
instance), so by default it is measured at two small sizes and extrapolated to the queue size by
the marginal cost per experiment between them (the fixed cost of a run counted once), and the
printout says so; ``--mapped-experiments 5 1000`` measures it. 1,000 is below
``max_map_length`` (1,024): mapped mode does not fail at the mapping limit here, it is slow.
Targets (issue 12): queue mode >= 5x less wall time than mapped, <= 10 task instances, 0 lost
or duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.services import Endpoints, private_services  # noqa: E402

WORKLOAD = (
    'import json, sys\nprint(json.dumps({"experiment": {"fitness": float(sys.argv[1])}}), flush=True)\n'
)

DAGS = textwrap.dedent(
    '''\
    """Benchmark DAGs (written by bench/generation_scale.py)."""
    from __future__ import annotations

    from datetime import datetime

    from airflow.sdk import dag, get_current_context, task

    from airflow_provider_studio.operators.experiment import StudioExperimentOperator
    from airflow_provider_studio.operators.generation import StudioGenerationOperator
    from airflow_provider_studio.operators.metadata import MetadataScrapeOperator

    WORKSPACE = {workspace!r}


    def genomes(params):
        return [
            {{"experiment_key": f"{{params['prefix']}}-{{i:05d}}", "args": [f"0.{{i:05d}}"]}}
            for i in range(params["n"])
        ]


    @dag(dag_id="scale_queue", schedule=None, start_date=datetime(2026, 1, 1), params={{"n": 1, "prefix": "x", "queue": "rmq_x", "bucket": "b"}})
    def scale_queue():
        @task
        def breed():
            return genomes(get_current_context()["params"])

        StudioGenerationOperator(
            task_id="train_queue",
            experiments=breed(),
            queue_name="{{{{ params.queue }}}}",
            results_bucket="{{{{ params.bucket }}}}",
            script="train.py",
            workspace=WORKSPACE,
            resources_needed={{"cpus": 1, "ram": "256m", "hdd": "1g"}},
            poll_interval=5.0,
        )


    @dag(dag_id="scale_mapped", schedule=None, start_date=datetime(2026, 1, 1), params={{"n": 1, "prefix": "x", "bucket": "b"}})
    def scale_mapped():
        @task
        def breed():
            return [{{"experiment_key": g["experiment_key"], "args": g["args"]}} for g in genomes(get_current_context()["params"])]

        train = StudioExperimentOperator.partial(
            task_id="train",
            script="train.py",
            workspace=WORKSPACE,
            results_bucket="{{{{ params.bucket }}}}",
            resources_needed={{"cpus": 1, "ram": "256m", "hdd": "1g"}},
            execution_mode="local",
        ).expand_kwargs(breed())
        MetadataScrapeOperator(task_id="collect", experiments=train.output, bucket="{{{{ params.bucket }}}}")


    scale_queue()
    scale_mapped()
    '''
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument(
        "--mapped-experiments",
        type=int,
        nargs=2,
        default=(5, 25),
        metavar=("SMALL", "LARGE"),
        help="mapped mode is run at both sizes; their difference gives its cost per experiment",
    )
    parser.add_argument("--runners", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="generation-scale-") as scratch:
        root = Path(scratch)
        with private_services(root / "services") as services:
            endpoints = services.endpoints
            env = airflow_home(root, endpoints)
            queue = measure_queue(root, endpoints, env, options.experiments, options.runners)
            mapped = [measure_mapped(root, endpoints, env, size) for size in options.mapped_experiments]
    report(queue, mapped, options)
    return 0


def airflow_home(root: Path, endpoints: Endpoints) -> dict[str, str]:
    home = root / "airflow"
    dags = home / "dags"
    workspace = root / "workspace"
    dags.mkdir(parents=True)
    workspace.mkdir()
    (workspace / "train.py").write_text(WORKLOAD)
    (dags / "scale_dags.py").write_text(DAGS.format(workspace=str(workspace)))
    aws = {
        "conn_type": "aws",
        "login": endpoints.s3_access_key,
        "password": endpoints.s3_secret_key,
        "extra": {"endpoint_url": endpoints.s3_endpoint, "region_name": endpoints.region},
    }
    port = int(endpoints.amqp_url.rsplit(":", 1)[1].split("/")[0])
    rabbitmq = {
        "conn_type": "studio_rabbitmq",
        "host": "127.0.0.1",
        "port": port,
        "login": "guest",
        "password": "guest",
        "schema": "/",
        "extra": {"management_url": endpoints.amqp_management_url},
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
        "AIRFLOW__STUDIO__LOCAL_WORKING_DIR": str(root / "local-work"),
        "AIRFLOW__STUDIO__LOCAL_CACHE_DIR": str(root / "runner-cache"),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws),
        "AIRFLOW_CONN_STUDIO_RABBITMQ_DEFAULT": json.dumps(rabbitmq),
        "AWS_DEFAULT_REGION": endpoints.region,
    }
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
    )
    return env


def db_rows(env: dict[str, str]) -> dict[str, int]:
    path = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        return {table: db.execute(f'select count(*) from "{table}"').fetchone()[0] for table in tables}


def run_dag(env: dict[str, str], dag_id: str, conf: dict) -> tuple[float, dict]:
    """Wall time of ``airflow dags test`` and what it added to the metadata DB."""
    before = db_rows(env)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", dag_id, "-c", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - started
    log = result.stdout + result.stderr
    if result.returncode != 0 or "state=success" not in log:
        raise SystemExit(f"{dag_id} failed:\n{log[-5000:]}")
    after = db_rows(env)
    added = {
        table: after[table] - before.get(table, 0) for table in after if after[table] != before.get(table, 0)
    }
    return wall, added


def counts(s3, bucket: str, prefix: str, n: int) -> tuple[int, int, int]:
    """(keys with exactly one scrape document, lost keys, duplicated keys)."""
    found: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="metadata/scrape-host-"):
        for item in page.get("Contents", []):
            document = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
            key = document["studioml"]["experiment"]["key"]
            if key.startswith(prefix):
                found[key] = found.get(key, 0) + 1
    once = sum(1 for value in found.values() if value == 1)
    duplicated = sum(1 for value in found.values() if value > 1)
    return once, n - len(found), duplicated


def measure_queue(root: Path, endpoints: Endpoints, env: dict[str, str], n: int, runner_count: int) -> dict:
    s3 = endpoints.s3_client()
    bucket = f"scale-q-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    queue = f"rmq_scale_{uuid.uuid4().hex[:8]}"
    runner_env = {
        **os.environ,
        **endpoints.aws_identity(),
    }
    runners = []
    for index in range(runner_count):
        log = open(root / f"runner-{index}.log", "wb")  # noqa: SIM115  (closed with the process)
        command = [
            str(Path(sys.executable).parent / "studio-runner"),
            "serve",
            "--working-dir",
            str(root / f"work-{index}"),
            "--cache-dir",
            str(root / "runner-cache"),
            "--amqp-url",
            endpoints.amqp_url,
            "--amqp-mgt-url",
            endpoints.amqp_management_url,
            "--queue-match",
            f"^{queue}$",
            "--prom-address",
            "off",
        ]
        runners.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=runner_env), log))
    try:
        prefix = f"q{uuid.uuid4().hex[:6]}"
        conf = {"n": n, "prefix": prefix, "queue": queue, "bucket": bucket}
        wall, added = run_dag(env, "scale_queue", conf)
    finally:
        for process, log in runners:
            process.terminate()
            process.wait(120)
            log.close()
    once, lost, duplicated = counts(s3, bucket, prefix, n)
    return {"n": n, "wall": wall, "added": added, "once": once, "lost": lost, "duplicated": duplicated}


def measure_mapped(root: Path, endpoints: Endpoints, env: dict[str, str], n: int) -> dict:
    s3 = endpoints.s3_client()
    bucket = f"scale-m-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    prefix = f"m{uuid.uuid4().hex[:6]}"
    wall, added = run_dag(env, "scale_mapped", {"n": n, "prefix": prefix, "bucket": bucket})
    once, lost, duplicated = counts(s3, bucket, prefix, n)
    return {"n": n, "wall": wall, "added": added, "once": once, "lost": lost, "duplicated": duplicated}


def report(queue: dict, mapped_runs: list[dict], options: argparse.Namespace) -> None:
    def line(name: str, result: dict) -> None:
        rows = sum(result["added"].values())
        tis = result["added"].get("task_instance", 0)
        print(
            f"{name:<7} {result['n']:>6} experiments  wall {result['wall']:8.1f} s  "
            f"{result['wall'] / result['n']:6.3f} s/experiment  task instances {tis:>5}  "
            f"metadata rows +{rows:<6}  once {result['once']}, lost {result['lost']}, duplicated {result['duplicated']}"
        )
        top = sorted(result["added"].items(), key=lambda item: -item[1])[:6]
        print("        rows by table: " + ", ".join(f"{table} +{count}" for table, count in top))

    print(
        f"\n{options.runners} local runners in queue mode; mapped mode runs under airflow dags test (one task at a time)"
    )
    line("queue", queue)
    for mapped in mapped_runs:
        line("mapped", mapped)
    small, large = mapped_runs
    slope = (large["wall"] - small["wall"]) / max(1, large["n"] - small["n"])
    extrapolated = large["wall"] + slope * (queue["n"] - large["n"])
    measured = (
        "measured"
        if large["n"] == queue["n"]
        else f"extrapolated: {large['wall']:.0f} s at {large['n']} plus {slope:.2f} s per further experiment, "
        f"the marginal cost between {small['n']} and {large['n']}"
    )
    print(
        f"\nmapped mode at {queue['n']} experiments: {extrapolated:.0f} s ({measured})\n"
        f"queue mode at {queue['n']}: {queue['wall']:.0f} s, {queue['wall'] / queue['n']:.3f} s per experiment: "
        f"{extrapolated / queue['wall']:.1f}x less wall time than mapped"
    )
    tis_per = (large["added"].get("task_instance", 0) - small["added"].get("task_instance", 0)) / max(
        1, large["n"] - small["n"]
    )
    print(
        f"task instances for {queue['n']}: queue {queue['added'].get('task_instance', 0)}, "
        f"mapped ~{large['added'].get('task_instance', 0) + tis_per * (queue['n'] - large['n']):.0f} "
        "(max_map_length 1,024 caps one mapped task)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
