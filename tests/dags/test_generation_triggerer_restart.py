"""A queue-mode generation survives its triggerer being stopped, through real Airflow.

``airflow standalone`` (devtools/local_airflow.py: SQLite, scheduler, triggerer, API server) runs
tests/dags/restart_dag's generation of 4 gated experiments against RabbitMQ, SeaweedFS and two
``studio-runner serve`` processes. While ``train`` is deferred and its experiments are still
running, the triggerer is stopped with SIGTERM, experiments finish with no triggerer at all (the
task stays deferred), a new triggerer takes the trigger over; then the same again with SIGKILL.
The task completes once, with every experiment's row, and nothing was published or run twice.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from devtools.local_airflow import LocalAirflow
from devtools.services import free_port
from tests.broker import management, queue_depth, unique_queue
from tests.polling import wait_for
from tests.provider.connections import rabbitmq_connection
from tests.runner.results import scrape_documents

DAG_FOLDER = Path(__file__).resolve().parent / "restart_dag"
DAG_ID = "generation_restart"
GENOMES = 4
WAIT = 300.0
"""Only a guard against a hung test on 2 busy cores; nothing here measures speed."""


@pytest.fixture
def airflow(service_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalAirflow]:
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")  # its own SQLite in its home
    monkeypatch.setenv("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "triggerer-restart-test-" + "x" * 48)
    # a SIGKILLed triggerer's triggers go to the next one once its heartbeat is this old (30 s by default)
    monkeypatch.setenv("AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD", "15")
    monkeypatch.setenv(
        "AIRFLOW_CONN_STUDIO_RABBITMQ_DEFAULT", json.dumps(rabbitmq_connection(service_set.endpoints))
    )
    server = LocalAirflow(
        home=tmp_path / "airflow", endpoints=service_set.endpoints, port=free_port(), dags_folder=DAG_FOLDER
    )
    server.migrate()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def train(airflow: LocalAirflow, run_id: str) -> dict[str, Any]:
    return airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/train")


def deferred_to_a_new_triggerer(airflow: LocalAirflow, run_id: str, earlier: set[int]) -> int | None:
    """The triggerer job running ``train``'s trigger, once it is none of ``earlier``."""
    ti = train(airflow, run_id)
    assert ti["state"] in (None, "scheduled", "queued", "running", "deferred"), ti
    triggerer = (ti.get("trigger") or {}).get("triggerer_id")
    return triggerer if ti["state"] == "deferred" and triggerer and triggerer not in earlier else None


def finish(services: Any, s3: Any, bucket: str, gates: Path, queue: str, genomes: range) -> None:
    """Open the gates of ``genomes`` and wait until their experiments wrote a succeeded result."""
    for genome in genomes:
        (gates / f"open-{genome}").touch()
    for genome in genomes:
        key = f"{queue}-g{genome}"
        wait_for(
            lambda key=key: any(
                d.get("studioml", {}).get("status") == "succeeded" for d in scrape_documents(s3, bucket, key)
            ),
            WAIT,
            f"{key}'s result",
            interval=1,
        )


def test_a_deferred_generation_survives_sigterm_and_sigkill_of_the_triggerer(
    airflow: LocalAirflow, services, serve_runner, s3_client, bucket: str, tmp_path: Path
) -> None:
    queue = unique_queue("rmq_restart")
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {"AWS_ACCESS_KEY_ID": services.s3_access_key, "AWS_SECRET_ACCESS_KEY": services.s3_secret_key}
    for _ in range(2):
        serve_runner("--queue-match", f"^{queue}$", "--max-attempts", "1", env=env)

    airflow.wait_for_dag(DAG_ID)
    airflow.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    conf = {"queue": queue, "bucket": bucket, "genomes": GENOMES, "gates": str(gates)}
    run_id = airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})[
        "dag_run_id"
    ]

    first = wait_for(lambda: deferred_to_a_new_triggerer(airflow, run_id, set()), WAIT, "train to defer")
    # the generation is running: two experiments held by the runners at their gates, two queued
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == GENOMES, 30, "4 requests out")

    airflow.stop_triggerer(signal.SIGTERM)
    finish(services, s3_client, bucket, gates, queue, range(0, 2))
    assert train(airflow, run_id)["state"] == "deferred", "no triggerer, so nothing resumes the task"
    airflow.start_triggerer()
    wait_for(lambda: deferred_to_a_new_triggerer(airflow, run_id, {first}), WAIT, "a new triggerer")

    airflow.stop_triggerer(signal.SIGKILL)
    finish(services, s3_client, bucket, gates, queue, range(2, GENOMES))
    assert train(airflow, run_id)["state"] == "deferred", "all finished, but no triggerer has seen it"
    airflow.start_triggerer()

    def ended() -> str | None:
        state = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}")["state"]
        return state if state in ("success", "failed") else None

    assert wait_for(ended, WAIT, "the generation's run to end", interval=1) == "success", airflow.log_file
    ti = train(airflow, run_id)
    assert ti["state"] == "success" and ti["try_number"] == 1, "resumed, never retried or re-executed"
    rows = airflow.api(
        "GET",
        f"/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/train/xcomEntries/return_value?deserialize=true",
    )["value"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [row["key"] for row in rows] == [f"{queue}-g{genome}" for genome in range(GENOMES)]
    assert all(row["status"] == "succeeded" and row["error"] is None for row in rows), rows
    assert [row["experiment.fitness"] for row in rows] == [round(1 / (2 + g), 4) for g in range(GENOMES)]

    # published once, ran once: the broker counted 4 publishes, and each key has one result
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 30, "an empty queue")
    published = wait_for(
        lambda: (
            management(services.amqp_management_url, f"/api/queues/%2F/{queue}")
            .get("message_stats", {})
            .get("publish")
        ),
        30,
        "the broker's publish count",
    )
    assert published == GENOMES
    for row in rows:
        assert len(scrape_documents(s3_client, bucket, row["key"])) == 1, row["key"]
