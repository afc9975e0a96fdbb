"""How a serving runner ends work and ends itself, end to end on the session's RabbitMQ and SeaweedFS.

- ``serve`` exits only after the late ``retval`` refresh of its last experiment (bounded by the
  grace period), whether ``--limit-tasks`` or SIGTERM ends it.
- A request whose ``experimentLifetime`` has passed is dead-lettered with its reason and never
  run, whether it was stale when published or its lifetime passed while it waited in the queue;
  one whose lifetime passes during the run is stopped and dead-lettered too (RUNNER_PROTOCOL §4.7).
"""

from __future__ import annotations

import io
import json
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.broker import dead_letters, publish_like_client, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import script_request
from tests.runner.results import final_document, scrape_documents

pytestmark = pytest.mark.timeout(300)

WITH_RETVAL = """\
import os
os.makedirs("../retval", exist_ok=True)
with open("../retval/retval", "w") as out:
    out.write("42")
print("wrote a return value")
"""

MARKS_ITS_RUN = """\
import sys, time
open(sys.argv[1], "w").close()
print("running", flush=True)
time.sleep(float(sys.argv[2]))
"""
"""Creates the file it is given as soon as it runs, then sleeps: a run leaves a trace."""


@pytest.fixture
def queue() -> str:
    return unique_queue("rmq_endings")


def publish(services, queue: str, request: dict[str, Any]) -> None:
    publish_like_client(services.amqp_url, queue, [json.dumps(request).encode()])


def queue_empties(services, queue: str) -> None:
    """The message was settled (the management API's counts lag by a few seconds)."""
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 60, "the queue to empty")


def retval_uploads(runner) -> list[dict]:
    return [e for e in runner.events() if e["msg"].startswith("uploaded retval")]


def stored_retval(s3_client, bucket: str, key: str) -> bytes:
    body = s3_client.get_object(Bucket=bucket, Key=f"experiments/{key}/retval.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        [member] = archive.getmembers()
        return archive.extractfile(member).read()


# --- the late retval refresh -----------------------------------------------------------------------


def test_serve_with_limit_tasks_exits_only_after_the_retval_refresh(
    serve_runner, services, s3_client, bucket: str, queue: str
) -> None:
    key = f"retval_{queue}"
    publish(services, queue, script_request(services, s3_client, bucket, key, WITH_RETVAL, retval=True))
    runner = serve_runner("--queue-match", f"^{queue}$", "--limit-tasks", "1")
    assert runner.process.wait(timeout=180) == 0  # it exits by itself after one experiment

    uploads = retval_uploads(runner)
    assert len(uploads) == 2, [e["msg"] for e in runner.events()]
    assert uploads[1]["thread"] == f"retval {key}"  # the second is the late refresh
    assert stored_retval(s3_client, bucket, key) == b"42"
    assert final_document(s3_client, bucket, key)["studioml"]["status"] == "succeeded"
    queue_empties(services, queue)


def test_serve_stopped_by_sigterm_still_sends_the_retval_refresh(
    serve_runner, services, s3_client, bucket: str, queue: str
) -> None:
    key = f"retval_term_{queue}"
    runner = serve_runner("--queue-match", f"^{queue}$")
    publish(services, queue, script_request(services, s3_client, bucket, key, WITH_RETVAL, retval=True))
    wait_for(lambda: len(retval_uploads(runner)) >= 1, 180, "the first retval upload")
    runner.process.send_signal(signal.SIGTERM)  # before the refresh is due
    assert runner.process.wait(timeout=120) == 0

    uploads = retval_uploads(runner)
    assert len(uploads) == 2, [e["msg"] for e in runner.events()]
    assert uploads[1]["thread"] == f"retval {key}"
    assert stored_retval(s3_client, bucket, key) == b"42"


# --- lifetime expiry -------------------------------------------------------------------------------


def assert_dead_lettered_unrun(services, s3_client, bucket: str, queue: str, key: str, marker: Path) -> None:
    dead = wait_for(lambda: dead_letters(services, queue), 120, "the dead letter")
    assert len(dead) == 1
    body, headers = dead[0]
    assert json.loads(body)["experiment"]["key"] == key  # the request itself is kept
    assert "experimentLifetime passed before the run started" in headers["x-studio-reject-reason"]
    assert not marker.exists(), "the workload ran"
    assert scrape_documents(s3_client, bucket, key) == []  # no attempt was recorded
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"experiments/{key}/")
    assert listed.get("KeyCount", 0) == 0  # nothing was uploaded for it
    queue_empties(services, queue)


def test_a_request_whose_lifetime_passed_before_it_was_taken_is_dead_lettered_unrun(
    serve_runner, services, s3_client, bucket: str, queue: str, tmp_path: Path
) -> None:
    key = f"stale_{queue}"
    marker = tmp_path / "ran"
    request = script_request(services, s3_client, bucket, key, MARKS_ITS_RUN, str(marker), "0")
    request["experiment"]["time_added"] = time.time() - 3600
    request["config"]["experimentLifetime"] = "30m"  # ran out half an hour ago
    publish(services, queue, request)
    serve_runner("--queue-match", f"^{queue}$")
    assert_dead_lettered_unrun(services, s3_client, bucket, queue, key, marker)


def test_a_request_whose_lifetime_passes_while_it_waits_in_the_queue_is_dead_lettered_unrun(
    serve_runner, services, s3_client, bucket: str, queue: str, tmp_path: Path
) -> None:
    key = f"waited_{queue}"
    marker = tmp_path / "ran"
    request = script_request(services, s3_client, bucket, key, MARKS_ITS_RUN, str(marker), "0")
    added = time.time()
    request["experiment"]["time_added"] = added
    request["config"]["experimentLifetime"] = "2s"
    publish(services, queue, request)  # alive when queued
    wait_for(lambda: time.time() > added + 3, 30, "the lifetime to pass while no runner serves the queue")
    serve_runner("--queue-match", f"^{queue}$")
    assert_dead_lettered_unrun(services, s3_client, bucket, queue, key, marker)


def test_a_lifetime_that_runs_out_during_the_run_stops_it_and_dead_letters_it(
    serve_runner, services, s3_client, bucket: str, queue: str, tmp_path: Path
) -> None:
    key = f"outlived_{queue}"
    marker = tmp_path / "ran"
    request = script_request(services, s3_client, bucket, key, MARKS_ITS_RUN, str(marker), "600")
    request["experiment"]["time_added"] = time.time()
    request["config"]["experimentLifetime"] = "30s"
    publish(services, queue, request)
    serve_runner("--queue-match", f"^{queue}$", "--grace-period", "2s")

    dead = wait_for(lambda: dead_letters(services, queue), 180, "the dead letter")
    assert marker.exists()  # it was alive when taken, so it ran
    [(body, headers)] = dead
    assert json.loads(body)["experiment"]["key"] == key
    assert "experimentLifetime ran out during the run" in headers["x-studio-reject-reason"]
    document = final_document(s3_client, bucket, key)
    assert document["studioml"]["status"] == "expired"
    queue_empties(services, queue)
