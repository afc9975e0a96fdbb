"""Faults with real processes: SIGKILLed runners, a RabbitMQ restart, a SeaweedFS outage, poison.

The scenarios and what "done exactly once" means are in fault_scenarios.py, which
``bench/faults.py`` runs too (with more trials) to print the figures; here they are asserted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from studio_runner.artifacts import find_earlier_success
from studio_runner.metadata import accession_id, scrape_file_name
from studio_runner.request import decode_request
from studio_runner.storage import Storage

from tests.runner.fault_scenarios import (
    FaultEnv,
    Figures,
    broker_restart_scenario,
    kill_scenario,
    lost_ack_scenario,
    poison_bodies,
    poison_scenario,
    storage_outage_scenario,
)

pytestmark = pytest.mark.timeout(600)


# --- the tests ----------------------------------------------------------------------------------------
@pytest.fixture
def faults(services, service_set, s3_client, bucket, serve_runner, tmp_path) -> Iterator[FaultEnv]:
    yield FaultEnv(services, service_set, s3_client, bucket, serve_runner, tmp_path)


def explain(figures: Figures) -> str:
    summary = {k: v for k, v in vars(figures).items() if k not in ("scenario", "problems")}
    return f"{figures.scenario}: " + "; ".join(figures.problems[:10]) + f" -- {summary}"


def test_sigkilled_runners_lose_nothing_and_finish_every_request_once(faults: FaultEnv) -> None:
    figures = kill_scenario(faults, requests=20, kills=20, runners=2)
    print(explain(figures))
    assert figures.problems == [], explain(figures)
    assert figures.kills == 20, f"only {figures.kills} kills landed while a runner held an experiment"
    assert figures.completed_once == 20 and figures.losses == 0 and figures.duplicates == 0
    assert figures.redeliveries >= figures.kills  # each landed kill came back ...
    assert figures.redelivered_flags >= figures.redeliveries  # ... flagged by RabbitMQ
    assert figures.highest_attempt == 1  # a crash is not a counted attempt
    assert figures.dead_lettered == 0


def test_a_lost_ack_is_not_a_second_run(faults: FaultEnv) -> None:
    figures = lost_ack_scenario(faults)
    print(explain(figures))
    assert figures.problems == [], explain(figures)
    assert figures.completed_once == 1 and figures.already_done_acks == 1 and figures.redelivered_flags == 1


def test_a_rabbitmq_restart_loses_no_waiting_request(faults: FaultEnv) -> None:
    figures = broker_restart_scenario(faults, requests=5)
    print(explain(figures))
    assert figures.problems == [], explain(figures)
    assert figures.completed_once == 5 and figures.duplicates == 0 and figures.dead_lettered == 0


def test_uploads_ride_out_a_seaweedfs_outage_and_the_experiment_completes(faults: FaultEnv) -> None:
    figures = storage_outage_scenario(faults, outage=8.0)
    print(explain(figures))
    assert figures.problems == [], explain(figures)
    assert figures.completed_once == 1 and figures.storage_retries > 0 and figures.outage_seconds >= 8.0


def test_poison_messages_are_refused_at_once_and_never_block_the_queue(faults: FaultEnv) -> None:
    figures = poison_scenario(faults)
    print(explain(figures))
    assert figures.problems == [], explain(figures)
    assert figures.dead_lettered == len(poison_bodies(faults, "k")) and figures.completed_once == 3
    assert figures.handler_crashes == 0


def test_an_earlier_success_is_found_by_key_status_and_start_time(tmp_path: Path) -> None:
    """What a redelivered request looks for before it runs (here in ``file://`` storage)."""
    added = 1_800_000_000.0
    folder = tmp_path / "experiments" / "k" / "metadata"
    folder.mkdir(parents=True)
    request = decode_request(
        {
            "experiment": {
                "key": "k",
                "filename": "a.py",
                "time_added": added,
                "artifacts": {
                    "workspace": {"qualified": f"file://{tmp_path}/ws.tar"},
                    "_metadata": {
                        "qualified": f"file://{tmp_path}/experiments/k/_metadata.tar",
                        "mutable": True,
                    },
                },
            }
        }
    )

    def document(key: str, status: str, started: float) -> Path:
        path = folder / scrape_file_name(accession_id("runner-a", started))
        path.write_text(json.dumps({"studioml": {"experiment": {"key": key}, "status": status}}))
        return path

    document("k", "succeeded", added - 3600)  # an earlier request with the same key
    document("other", "succeeded", added + 5)
    document("k", "running", added + 6)
    document("k", "failed", added + 7)
    (folder / scrape_file_name(accession_id("runner-b", added + 9))).write_text("not json")
    assert find_earlier_success(request, Storage()) is None
    stored = document("k", "succeeded", added + 8)
    assert find_earlier_success(request, Storage()) == f"file://{stored}"
