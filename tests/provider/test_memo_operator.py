"""StudioExperimentOperator(cache=True) in local mode on the session's SeaweedFS: identical
experiments at the same time both run, a later one reuses a result (and says so), a failed one is
never reused, and MetadataScrapeOperator reads a reused result's fitness from the original's
scrape document."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_studio.operators.experiment import StudioExperimentOperator
from airflow_provider_studio.operators.metadata import MetadataScrapeOperator
from tests.provider.task_context import RecordingTI, seaweed_conn_json
from tests.runner.results import scrape_documents

S3_CONN = "studio_memo_s3"

WORKLOAD = """\
import json, os, sys, time, uuid
args = sys.argv[1:]
if "--fail-while" in args and os.path.exists(args[args.index("--fail-while") + 1]):
    print("transient fault", flush=True)
    sys.exit(3)
if "--barrier" in args:  # wait until every party of the barrier has started
    folder, parties = args[args.index("--barrier") + 1], int(args[args.index("--parties") + 1])
    open(os.path.join(folder, uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + 300
    while len(os.listdir(folder)) < parties:
        if time.monotonic() > deadline:
            sys.exit(4)
        time.sleep(0.1)
print(json.dumps({"experiment": {"fitness": 0.75}}), flush=True)
"""


@pytest.fixture
def seaweed_conn(services, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN.upper()}", seaweed_conn_json(services))
    return S3_CONN


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "workspace"
    folder.mkdir()
    (folder / "genome.py").write_text(WORKLOAD)
    return folder


def cached_operator(
    workspace: Path, bucket: str, args: list[str], **overrides: Any
) -> StudioExperimentOperator:
    arguments: dict[str, Any] = {
        "task_id": "train",
        "script": "genome.py",
        "workspace": str(workspace),
        "args": args,
        "results_bucket": bucket,
        "aws_conn_id": S3_CONN,
        "execution_mode": "local",
        "experiment_key": f"memo-{uuid.uuid4().hex[:8]}",
        "cache": True,
    }
    arguments.update(overrides)
    return StudioExperimentOperator(**arguments)


def memo_entries(s3_client, bucket: str) -> list[dict[str, Any]]:
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix="memo/").get("Contents", [])
    return [json.loads(s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in listing]


def test_identical_experiments_at_once_both_run_and_a_later_one_reuses(
    seaweed_conn: str, bucket: str, s3_client, workspace: Path, tmp_path: Path, capsys
) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    args = ["--barrier", str(barrier), "--parties", "2"]
    operators = [cached_operator(workspace, bucket, args) for _ in range(2)]
    results: dict[int, Any] = {}

    def run(position: int) -> None:
        try:
            results[position] = operators[position].execute({"ti": RecordingTI(map_index=position)})
        except BaseException as error:  # reported by the assertion below
            results[position] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    # the barrier lets neither finish before both started, so both looked up before any recorded
    assert all(isinstance(results[i], dict) for i in range(2)), results
    keys = {op.experiment_key for op in operators}
    for position, op in enumerate(operators):
        summary = results[position]
        assert summary["status"] == "succeeded" and "reused_from" not in summary
        assert summary["key"] == op.experiment_key
        assert len(scrape_documents(s3_client, bucket, op.experiment_key)) == 1, "it really ran"
    (entry,) = memo_entries(s3_client, bucket)  # one whole entry: the last writer's
    assert entry["summary"]["key"] in keys

    capsys.readouterr()
    later = cached_operator(workspace, bucket, args)
    reused = later.execute({"ti": RecordingTI()})
    assert reused["key"] == later.experiment_key and reused["reused_from"] == entry["summary"]["key"]
    assert reused["scrape_key"] == entry["summary"]["scrape_key"] and reused["status"] == "succeeded"
    assert scrape_documents(s3_client, bucket, later.experiment_key) == [], "nothing launched"
    captured = capsys.readouterr()  # the task log
    assert (
        f"reusing the succeeded result of experiment {entry['summary']['key']}" in captured.out + captured.err
    )

    # the generation table reads a reused result's values from the original's scrape document
    (row,) = MetadataScrapeOperator(
        task_id="collect", experiments=[reused], aws_conn_id=S3_CONN, fields=["experiment.fitness"]
    ).execute({})
    assert row["key"] == later.experiment_key and row["error"] is None
    assert row["status"] == "succeeded" and row["experiment.fitness"] == 0.75

    # resources are not part of the fingerprint; the cache_version is
    assert "reused_from" in cached_operator(workspace, bucket, args, resources_needed={"cpus": 2}).execute({})
    fresh = cached_operator(workspace, bucket, args, cache_version="2", max_duration="5m")
    (barrier / "third").touch()  # the barrier is already full for a lone run
    assert "reused_from" not in fresh.execute({"ti": RecordingTI()})


def test_a_failed_experiment_is_never_reused(
    seaweed_conn: str, bucket: str, s3_client, workspace: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "fault"
    marker.touch()
    args = ["--fail-while", str(marker)]
    failed = cached_operator(workspace, bucket, args, fail_on_experiment_error=False).execute(
        {"ti": RecordingTI()}
    )
    assert failed["status"] == "failed"
    assert memo_entries(s3_client, bucket) == [], "a failure is not recorded"

    again = cached_operator(workspace, bucket, args, fail_on_experiment_error=False)
    assert again.execute({"ti": RecordingTI()})["status"] == "failed", "it ran again, and failed again"
    assert len(scrape_documents(s3_client, bucket, again.experiment_key)) == 1

    marker.unlink()  # the fault is gone: the same request now runs and succeeds
    fixed = cached_operator(workspace, bucket, args)
    summary = fixed.execute({"ti": RecordingTI()})
    assert summary["status"] == "succeeded" and "reused_from" not in summary
    (entry,) = memo_entries(s3_client, bucket)
    assert entry["summary"]["key"] == fixed.experiment_key
