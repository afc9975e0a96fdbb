"""The queue-driven capacity DAG: its runner-count rule, a parse without I/O, and a real run.

The end-to-end test is what a team sees: the real StudioML client queues experiments with
``studio run``, and ``airflow dags test`` (local execution mode) notices them with the deferred
sensor, starts runners that drain the queue and exit when it is idle, and sums up.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pika
import pytest

from tests.broker import management, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.results import final_document, tar_members

REPO_ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = REPO_ROOT / "dags" / "studio_queue_capacity.py"
DAG_ID = "studio_queue_capacity"


# --- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "resources", "per_runner", "max_runners", "gpus", "expected"),
    [
        (7, {}, 2, 10, 0, 4),  # one runner per two requests, rounded up
        (7, {"requests": 7, "cards": 7}, 2, 10, 4, 2),  # 7 cards fill two 4-GPU runners
        (30, {"requests": 10, "cards": 10}, 1, 8, 1, 8),  # never more than max_runners
        (3, {"requests": 3, "cards": 0}, 1, 8, 2, 1),  # CPU work on GPU runners: one runner
        (1, {}, 5, 4, 1, 1),  # anything queued gets a runner
        (0, {}, 2, 4, 1, 0),
        (20, {"requests": 10, "cards": 5}, 1, 50, 1, 10),  # half the peeked ask a GPU: 10 of 20
    ],
)
def test_runner_count_follows_the_documented_rule(depth, resources, per_runner, max_runners, gpus, expected):
    from dags.studio_queue_capacity import runner_count

    count = runner_count(
        depth, resources, experiments_per_runner=per_runner, max_runners=max_runners, gpus_per_runner=gpus
    )
    assert count == expected


# --- parsing -------------------------------------------------------------------------------------

PARSE_PROBE = textwrap.dedent(
    """\
    import json, socket, subprocess, sys, time
    import airflow.sdk  # loaded before any DAG file, as in the DAG processor
    from airflow.configuration import conf
    from airflow.dag_processing.dagbag import DagBag

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:3]))
        raise OSError("no I/O while parsing a DAG file")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    subprocess.Popen.__init__ = refuse
    before = set(sys.modules)
    started = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1])
    seconds = time.perf_counter() - started
    dag = bag.dags.get("studio_queue_capacity")
    print("PROBE " + json.dumps({
        "seconds": seconds,
        "errors": {path: str(error) for path, error in bag.import_errors.items()},
        "attempts": attempts,
        "timeout": conf.getfloat("core", "dagbag_import_timeout"),
        "imported": sorted(set(sys.modules) - before),
        "tasks": sorted(dag.task_dict) if dag else [],
        "timetable": type(dag.timetable).__name__ if dag else None,
        "max_active_runs": dag.max_active_runs if dag else None,
        "params": sorted(dag.params) if dag else [],
    }))
    """
)


def test_the_dag_parses_without_io_and_well_within_the_import_timeout(record_property) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(DAG_FILE)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    probe = json.loads(line.removeprefix("PROBE "))
    record_property("dag_parse_seconds", round(probe["seconds"], 3))
    print(f"\nstudio_queue_capacity parsed in {probe['seconds']:.2f}s (cold imports included)")

    assert probe["errors"] == {}
    assert probe["attempts"] == []  # no broker, API or database was contacted
    assert probe["tasks"] == ["drain", "plan_runners", "summarise", "wait_for_experiments"]
    assert probe["timetable"] == "ContinuousTimetable" and probe["max_active_runs"] == 1
    assert set(probe["params"]) >= {"queue", "min_messages", "max_runners", "gpus_per_runner"}
    # only what the DAG needs: no S3 hook, no experiment machinery, no runner internals
    for module in (
        "airflow.providers.amazon.aws.hooks.s3",
        "airflow_provider_studio.operators.experiment",
        "studio_runner.cli",
        "studio_runner.service",
    ):
        assert module not in probe["imported"], module
    # the limit Airflow enforces on a DAG file (a broken guard, not a speed target: see bench/)
    assert probe["seconds"] < probe["timeout"]


# --- end to end ----------------------------------------------------------------------------------

TRAIN = """\
import json, sys, time
print("capacity workload", sys.argv[1:], flush=True)
print(json.dumps({"experiment": {"fitness": float(sys.argv[2])}}), flush=True)
time.sleep(1.5)
"""
"""The sleep keeps one runner's attempts in different seconds: an attempt's scrape file is named
``scrape-host-<host>-<start second>`` (runner spec §4.9), so two attempts that start within one
second on one host would overwrite each other's document."""


@pytest.fixture
def broker_user(services) -> Iterator[tuple[str, str]]:
    """A broker user of its own, with a password that must appear nowhere Airflow writes."""
    login = f"capacity_{uuid.uuid4().hex[:8]}"
    password = f"pw/{uuid.uuid4().hex}@x:y"
    management(
        services.amqp_management_url,
        f"/api/users/{login}",
        "PUT",
        {"password": password, "tags": "monitoring"},
    )
    management(
        services.amqp_management_url,
        f"/api/permissions/%2F/{login}",
        "PUT",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    yield login, password
    management(services.amqp_management_url, f"/api/users/{login}", "DELETE")


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def xcom_value(raw: Any) -> Any:
    value = json.loads(raw)
    return json.loads(value) if isinstance(value, str) else value


class OutputReader:
    """Reads a process's output on a thread, so the test can act on a line while it keeps running."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    def find(self, *fragments: str) -> int | None:
        for index, line in enumerate(list(self.lines)):
            if all(fragment in line for fragment in fragments):
                return index
        return None

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def test_experiments_queued_by_studio_run_are_drained_by_the_runners_the_dag_starts(
    airflow_db: Path,
    services,
    s3_client,
    studio_client,
    runner_cache: Path,
    broker_user: tuple[str, str],
    tmp_path: Path,
) -> None:
    login, password = broker_user
    queue = unique_queue("rmq_capacity")
    amqp_port = pika.URLParameters(services.amqp_url).port
    rabbitmq = {
        "conn_type": "studio_rabbitmq",
        "host": "127.0.0.1",
        "port": amqp_port,
        "login": login,
        "password": password,
        "schema": "/",
        # the management API named without credentials: runners use the AMQP login there too
        "extra": {"management_url": f"http://127.0.0.1:{urlsplit(services.amqp_management_url).port}"},
    }
    aws = {
        "conn_type": "aws",
        "login": services.s3_access_key,
        "password": services.s3_secret_key,
        "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
    }
    env = {
        **os.environ,
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
        "AIRFLOW__STUDIO__LOCAL_CACHE_DIR": str(runner_cache),
        "AIRFLOW__STUDIO__LOCAL_WORKING_DIR": str(tmp_path / "runner-work"),
        "AIRFLOW_CONN_STUDIO_RABBITMQ_DEFAULT": json.dumps(rabbitmq),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws),
        "PYTHONUNBUFFERED": "1",  # lines must arrive while the trigger waits, not at exit
    }
    conf = {
        "queue": queue,
        "min_messages": 3,
        "experiments_per_runner": 2,
        "max_runners": 4,
        "gpus_per_runner": 0,
        "idle_duration": "10s",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow",
            "dags",
            "test",
            DAG_ID,
            "-c",
            json.dumps(conf),
            "-f",
            str(DAG_FILE),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(900, process.kill)  # a guard against a hang, not a speed check
    watchdog.start()
    try:
        output = OutputReader(process)
        wait_for(
            lambda: (
                process.poll() is not None
                or output.find("Waiting for 3 request(s)", f"'{queue}'") is not None
            ),
            300,
            "the trigger to start waiting",
        )
        assert process.poll() is None, "".join(output.lines)[-6000:]
        published_after = len(output.lines)
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        (workspace / "train.py").write_text(TRAIN)
        keys = [f"cap{index}_{queue}" for index in range(3)]
        for index, key in enumerate(keys):
            studio_client.run(workspace, queue, "train.py", "--fitness", f"0.{index + 1}", key=key)
        returncode = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    log = output.text()
    assert returncode == 0, log[-8000:]

    # the sensor deferred before the work arrived and resumed once all three were queued
    deferred_at = output.find("Pausing task as DEFERRED")
    resumed_at = output.find(f"Queue '{queue}' holds 3 request(s)")
    assert deferred_at is not None and resumed_at is not None, log[-8000:]
    assert deferred_at < published_after <= resumed_at

    db = airflow_db / "airflow.db"
    ((run_id, run_state),) = [
        (run, state)
        for run, state, run_conf in query(
            db, "SELECT run_id, state, conf FROM dag_run WHERE dag_id = ?", DAG_ID
        )
        if queue in str(run_conf)
    ]
    assert run_state == "success", log[-8000:]
    states = {
        (task, index): state
        for task, index, state in query(
            db,
            "SELECT task_id, map_index, state FROM task_instance WHERE run_id = ? AND dag_id = ?",
            run_id,
            DAG_ID,
        )
    }
    assert states == {
        ("wait_for_experiments", -1): "success",
        ("plan_runners", -1): "success",
        ("drain", 0): "success",
        ("drain", 1): "success",
        ("summarise", -1): "success",
    }
    xcoms = {
        (task, index): xcom_value(value)
        for task, index, value in query(
            db,
            "SELECT task_id, map_index, value FROM xcom WHERE run_id = ? AND dag_id = ? AND key = 'return_value'",
            run_id,
            DAG_ID,
        )
    }
    found = xcoms[("wait_for_experiments", -1)]
    assert found["queue"] == queue and found["depth"] == 3 and found["resources"]["requests"] == 3
    plan = xcoms[("plan_runners", -1)]
    assert len(plan) == 2  # 3 requests, 2 per runner
    assert {runner["queue_match"] for runner in plan} == {f"^{queue}$"}

    # every runner drained until the queue was idle, and together they ran each experiment once
    reports = [xcoms[("drain", index)] for index in (0, 1)]
    assert [report["ended_by"] for report in reports] == ["limit_idle", "limit_idle"]
    assert sum(report["handled"] for report in reports) == 3
    handled = [entry for report in reports for entry in report["experiments"]]
    assert sorted(entry["key"] for entry in handled) == sorted(keys)
    assert {entry["status"] for entry in handled} == {"succeeded"}
    assert {entry["queue"] for entry in handled} == {queue}

    # the results are where the client looks, and the queue is empty
    for index, key in enumerate(keys):
        document = final_document(s3_client, studio_client.bucket, key)
        assert document is not None and document["studioml"]["status"] == "succeeded"
        assert document["experiment"] == {"fitness": float(f"0.{index + 1}")}
        output_tar = tar_members(s3_client, studio_client.bucket, f"experiments/{key}/output.tar")
        assert f"capacity workload ['--fitness', '0.{index + 1}']" in output_tar["./output"].decode()
    assert queue_depth(services.amqp_management_url, queue) == 0

    summary = xcoms[("summarise", -1)]
    assert summary["queue"] == queue
    assert summary["runners"] == 2 and summary["runners_reported"] == 2
    assert summary["experiments"] == {"succeeded": 3} and summary["attempts"] == {"succeeded": 3}
    assert summary["keys"] == sorted(keys)
    assert summary["ended_by"] == ["limit_idle"]

    # the broker password went to the runners' environment only
    fields = query(db, "SELECT rendered_fields FROM rendered_task_instance_fields WHERE run_id = ?", run_id)
    stored = [row[0] for row in fields] + [json.dumps(value) for value in xcoms.values()]
    for secret in (password, quote(password, safe="")):
        assert secret not in log
        assert all(secret not in text for text in stored)
    assert f"amqp://{login}@127.0.0.1:{amqp_port}/%2F" in log  # the URL the runners were given
