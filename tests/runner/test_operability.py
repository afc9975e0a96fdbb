"""Running the runner in production: metrics, health, drain by ConfigMap, signals, limits, logs.

Real ``studio-runner serve`` processes against the session's RabbitMQ and SeaweedFS. Workloads
wait on files the test creates, so every step is driven by the test rather than by sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from studio_runner import logs
from studio_runner.checkpoints import Checkpointer
from studio_runner.drain import read_state
from studio_runner.service import RunnerState

from tests.broker import dead_letters, publish_like_client, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import script_request
from tests.runner.results import final_document, scrape_documents, tar_members

pytestmark = pytest.mark.timeout(300)

GATED = """\
import os, sys, time
started, release = sys.argv[1], sys.argv[2]
print("waiting for", release, flush=True)
open(started, "w").close()
deadline = time.time() + 120
while not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.1)
print("released", flush=True)
"""
"""Runs until the test creates ``release``; ``started`` tells the test the workload is running."""

QUICK = "print('quick work done')\n"

INTERRUPTIBLE = """\
import os, signal, sys, time
marker, started = sys.argv[1], sys.argv[2]
if os.path.exists(marker):
    print("second attempt: the work is finished", flush=True)
    sys.exit(0)
def on_sigterm(signum, frame):
    print("SIGTERM: stopping after a partial run", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_sigterm)
open(marker, "w").close()
for step in range(10000):
    print(f"step {step}", flush=True)
    if step == 0:
        open(started, "w").close()
    time.sleep(0.2)
"""
"""Runs for ever the first time (stopping cleanly on SIGTERM); finishes at once the second time."""

WITH_RETVAL = """\
import os
os.makedirs("../retval", exist_ok=True)
with open("../retval/retval", "w") as out:
    out.write("42")
print("wrote a return value")
"""


# --- helpers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0  # not listening (yet, or any more)


def metric(port: int, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``; None when there is none."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return None


def runner_options(queue: str, port: int, *more: str) -> tuple[str, ...]:
    """Serve just this test's queue (the broker is shared) with the HTTP server on ``port``."""
    return ("--queue-match", f"^{queue}$", "--prom-address", f"127.0.0.1:{port}", *more)


def publish_script(
    services, s3_client, bucket: str, queue: str, key: str, script: str, *args: str, retval: bool = False
) -> None:
    request = script_request(services, s3_client, bucket, key, script, *args, retval=retval)
    publish_like_client(services.amqp_url, queue, [json.dumps(request).encode()])


def succeeded(s3_client, bucket: str, key: str) -> Callable[[], bool]:
    def check() -> bool:
        document = final_document(s3_client, bucket, key)
        return bool(document) and document["studioml"]["status"] == "succeeded"

    return check


class StateFile:
    """The runner state as a plain file the test writes, or a ConfigMap mounted as a folder.

    The folder is updated as the kubelet does it: a new timestamped folder, a ``..data_tmp``
    symlink to it renamed over ``..data`` (atomic), ``STATE`` a symlink into ``..data``.
    """

    def __init__(self, root: Path, style: str) -> None:
        self.style = style
        self.path = root / ("runner-state" if style == "configmap" else "STATE")
        self._versions: list[Path] = []
        if style == "configmap":
            self.path.mkdir()
            self.set("Running")

    def set(self, value: str) -> None:
        if self.style == "file":
            self.path.write_text(value + "\n")
            return
        version = self.path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:8]}"
        version.mkdir()
        (version / "STATE").write_text(value)
        temporary = self.path / "..data_tmp"
        temporary.symlink_to(version.name)
        os.replace(temporary, self.path / "..data")
        if not (self.path / "STATE").is_symlink():
            (self.path / "STATE").symlink_to("..data/STATE")
        for old in self._versions:
            (old / "STATE").unlink()
            old.rmdir()
        self._versions = [version]


@pytest.fixture
def queue() -> str:
    return unique_queue("rmq_ops")


# --- metrics and health -------------------------------------------------------------------------
def test_metrics_and_health_follow_an_experiment(serve_runner, services, s3_client, bucket, queue, tmp_path):
    port = free_port()
    serve_runner(*runner_options(queue, port))
    assert wait_for(lambda: http_status(port, "/readyz") == 200, 60, "the runner to be ready")
    assert http_status(port, "/healthz") == 200
    assert http_status(port, "/nothing-here") == 404

    key = f"metrics_{queue}"
    started, release = tmp_path / "started", tmp_path / "release"
    publish_script(services, s3_client, bucket, queue, key, GATED, str(started), str(release))
    wait_for(started.exists, 120, "the workload to start")
    labels = {"queue_type": "rmq", "queue_name": queue, "project": ""}
    assert metric(port, "runner_project_running", experiment=key, **labels) == 1
    assert http_status(port, "/readyz") == 200 and http_status(port, "/healthz") == 200

    release.touch()
    wait_for(lambda: metric(port, "runner_project_completed_total", **labels) == 1, 60, "the completion")
    assert metric(port, "runner_project_running", experiment=key) is None  # the series went away
    histogram = {"queue_type": "rmq", "status": "succeeded"}
    assert metric(port, "runner_experiment_duration_seconds_count", **histogram) == 1
    assert metric(port, "runner_experiment_wait_seconds_count", queue_type="rmq") == 1
    assert metric(port, "runner_queue_checked_total", queue_type="rmq", queue_name=queue) >= 1
    assert metric(port, "runner_queue_refresh_success_total") >= 1
    assert metric(port, "runner_cache_hits_total") + metric(port, "runner_cache_misses_total") >= 1
    for gauge in ("cpu_free_slots", "cpu_ram_free_bytes", "disk_free_bytes", "gpu_free_slots"):
        assert metric(port, f"runner_resource_{gauge}") is not None
    assert wait_for(succeeded(s3_client, bucket, key), 30, "the scrape document")


# --- drain by ConfigMap -------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["file", "configmap"])
def test_configmap_state_suspends_resumes_and_terminates(
    serve_runner, services, s3_client, bucket, queue, tmp_path, style
):
    port = free_port()
    state = StateFile(tmp_path, style)
    runner = serve_runner(*runner_options(queue, port, "--state-file", str(state.path)))
    assert wait_for(lambda: http_status(port, "/readyz") == 200, 60, "the runner to be ready")

    first, later = f"first_{queue}", f"later_{queue}"
    started, release = tmp_path / "started-1", tmp_path / "release-1"
    publish_script(services, s3_client, bucket, queue, first, GATED, str(started), str(release))
    wait_for(started.exists, 120, "the first workload to start")

    state.set("DrainAndSuspend")
    assert wait_for(lambda: http_status(port, "/readyz") == 503, 30, "readiness to fail while draining")
    assert http_status(port, "/healthz") == 200
    publish_script(services, s3_client, bucket, queue, later, QUICK)
    release.touch()  # the running experiment finishes...
    assert wait_for(succeeded(s3_client, bucket, first), 60, "the running experiment to finish")
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 1, 30, "the first ack")
    # ...and the runner keeps looking at the queue without taking the new request
    seen = metric(port, "runner_queue_ignored_total", queue_name=queue) or 0
    wait_for(
        lambda: (metric(port, "runner_queue_ignored_total", queue_name=queue) or 0) >= seen + 3,
        30,
        "the suspended runner to pass over the queue",
    )
    assert queue_depth(services.amqp_management_url, queue) == 1
    assert scrape_documents(s3_client, bucket, later) == []

    state.set("Running")
    assert wait_for(succeeded(s3_client, bucket, later), 120, "the waiting request to run once resumed")
    assert wait_for(lambda: http_status(port, "/readyz") == 200, 30, "readiness once resumed")

    last = f"last_{queue}"
    started, release = tmp_path / "started-2", tmp_path / "release-2"
    publish_script(services, s3_client, bucket, queue, last, GATED, str(started), str(release))
    wait_for(started.exists, 120, "the last workload to start")
    state.set("DrainAndTerminate")
    assert wait_for(lambda: http_status(port, "/readyz") == 503, 30, "readiness to fail")
    assert runner.process.poll() is None  # it waits for the running experiment
    release.touch()
    assert runner.process.wait(timeout=120) == 0
    assert final_document(s3_client, bucket, last)["studioml"]["status"] == "succeeded"
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 30, "the last ack")


def test_read_state_accepts_files_folders_and_tolerates_partial_writes(tmp_path):
    assert read_state(tmp_path / "absent") is RunnerState.RUNNING  # upstream said "Unknown"
    plain = tmp_path / "state"
    plain.write_text(" DrainAndSuspend\n")
    assert read_state(plain) is RunnerState.DRAIN_AND_SUSPEND
    plain.write_text("")
    assert read_state(plain) is None  # being written: keep the current state
    plain.write_text("Paused")
    assert read_state(plain) is None  # a typo never drains or resumes a runner
    folder = StateFile(tmp_path, "configmap")
    assert read_state(folder.path) is RunnerState.RUNNING
    folder.set("DrainAndTerminate")
    assert read_state(folder.path) is RunnerState.DRAIN_AND_TERMINATE
    empty_configmap = tmp_path / "no-state-key"
    empty_configmap.mkdir()
    assert read_state(empty_configmap) is RunnerState.RUNNING


# --- stopping ---------------------------------------------------------------------------------
def test_sigterm_saves_partial_output_and_requeues_for_another_runner(
    serve_runner, services, s3_client, bucket, queue, tmp_path
):
    grace = 15
    runner = serve_runner(*runner_options(queue, free_port(), "--grace-period", str(grace)))
    key = f"interrupted_{queue}"
    marker, started = tmp_path / "attempted", tmp_path / "started"
    publish_script(services, s3_client, bucket, queue, key, INTERRUPTIBLE, str(marker), str(started))
    wait_for(started.exists, 120, "the long workload to start")

    runner.process.terminate()
    assert runner.process.wait(timeout=grace) == 0
    output = tar_members(s3_client, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    assert "step 0" in output and "SIGTERM: stopping after a partial run" in output
    (document,) = scrape_documents(s3_client, bucket, key)
    assert document["studioml"]["status"] == "interrupted"
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 1, 30, "the requeue")
    assert dead_letters(services, queue) == []  # requeued, not dead-lettered

    serve_runner(*runner_options(queue, free_port()))
    assert wait_for(succeeded(s3_client, bucket, key), 120, "another runner to finish it")
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 30, "the ack")
    statuses = [d["studioml"]["status"] for d in scrape_documents(s3_client, bucket, key)]
    assert sorted(statuses) == ["interrupted", "succeeded"]
    output = tar_members(s3_client, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    assert "second attempt: the work is finished" in output


# --- on-demand pods -----------------------------------------------------------------------------
def test_limit_tasks_ends_the_runner_after_that_many_experiments(
    serve_runner, services, s3_client, bucket, queue
):
    keys = [f"task{n}_{queue}" for n in range(3)]
    for key in keys:
        publish_script(services, s3_client, bucket, queue, key, QUICK)
    runner = serve_runner(*runner_options(queue, free_port(), "--limit-tasks", "2"))
    assert runner.process.wait(timeout=240) == 0
    done = [key for key in keys if final_document(s3_client, bucket, key)]
    assert len(done) == 2
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 1, 30, "the two acks")
    assert any("limit_tasks" in event["msg"] for event in runner.events())


def test_limit_idle_duration_ends_an_idle_runner(serve_runner, queue):
    runner = serve_runner(*runner_options(queue, free_port(), "--limit-idle-duration", "3s"))
    assert runner.process.wait(timeout=60) == 0
    assert any("limit_idle" in event["msg"] for event in runner.events())


# --- structured logs ----------------------------------------------------------------------------
EXPERIMENT_LOGGERS = (
    "studio_runner.experiment",
    "studio_runner.artifacts",
    "studio_runner.archive",
    "studio_runner.job",
    "studio_runner.pythonenv",
    "studio_runner.requirements",
    "studio_runner.interpreters",
    "studio_runner.storage",
    "studio_runner.metadata",
    "studio_runner.cache",
    "studio_runner.checkpoints",
)


def test_every_log_line_of_an_experiment_names_it_and_its_queue(
    serve_runner, services, s3_client, bucket, queue
):
    runner = serve_runner(*runner_options(queue, free_port()))
    key = f"logs_{queue}"
    publish_script(services, s3_client, bucket, queue, key, WITH_RETVAL, retval=True)
    assert wait_for(succeeded(s3_client, bucket, key), 120, "the experiment")

    def retval_uploads() -> list[dict]:
        return [e for e in runner.events() if e["msg"].startswith("uploaded retval")]

    # the late retval refresh runs on a timer thread after the handler has returned
    wait_for(lambda: len(retval_uploads()) >= 2, 30, "the late retval refresh")
    assert len({event["thread"] for event in retval_uploads()}) == 2
    runner.stop()

    events = runner.events()
    about = [e for e in events if key in e["msg"] or e["logger"] in EXPERIMENT_LOGGERS]
    assert len(about) >= 5
    unbound = [e for e in about if e.get("experiment") != key or e.get("queue") != queue]
    assert unbound == [], "\n".join(json.dumps(e) for e in unbound)
    # the settle decision on the queue's own thread names the experiment too
    assert any(e["msg"].startswith("request from") and e.get("experiment") == key for e in events)


def test_checkpoint_threads_log_with_the_experiment_and_queue():
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    capture = Capture()
    capture.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("studio_runner.test_checkpoint")
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    ran = threading.Event()

    def action() -> None:
        logger.info("checkpoint ran")
        ran.set()

    try:
        with logs.bound(experiment="exp-1", queue="rmq_q"), Checkpointer(0.01, action):
            assert ran.wait(10)
    finally:
        logger.removeHandler(capture)
    event = json.loads(lines[0])
    assert (event["experiment"], event["queue"], event["thread"]) == ("exp-1", "rmq_q", "checkpoint")
