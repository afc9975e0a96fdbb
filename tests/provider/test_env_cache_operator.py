"""The shared environment cache from the operators: on by default, a node-local volume on request.

Pods are built as they would run (request staged in S3, validated against the Kubernetes schema);
the local runs are real ``studio-runner run`` children against the session's SeaweedFS, each with
an empty working and cache folder, as a fresh pod has.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pendulum
import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import ApiClient

from airflow_provider_studio.operators.experiment import StudioExperimentOperator
from airflow_provider_studio.operators.queue_runner import StudioQueueRunnerOperator
from tests.provider.task_context import RecordingTI, moto_s3_connection, runtime_context, seaweed_conn_json

pytestmark = pytest.mark.timeout(600)

S3_CONN = "studio_env_cache_s3"
IMAGE = "registry.example.com/studio-runner:1.2.3"
REQUIREMENT = "tabulate==0.10.0"
"""Small and pure Python: the build is quick, the restore is what is looked at."""
WORKLOAD = """\
import tabulate
print("workload with tabulate", tabulate.__version__, flush=True)
"""
UNREACHABLE_INDEX = {
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "PIP_NO_INDEX": "1",
    "UV_INDEX_URL": "http://127.0.0.1:9/simple",
    "UV_OFFLINE": "1",
}
"""A second runner with these can only succeed by restoring the pack (a build would fail)."""


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "workspace"
    folder.mkdir()
    (folder / "train.py").write_text(WORKLOAD)
    return folder


@pytest.fixture
def aws_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """AWS S3 (moto) behind a connection; yields the results bucket."""
    with moto_s3_connection(monkeypatch, S3_CONN, login="AKIAFAKE", password="FAKE") as bucket:
        yield bucket


def pod_operator(folder: Path, bucket: str, **overrides: Any) -> StudioExperimentOperator:
    with DAG("enn_generation", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
        arguments: dict[str, Any] = {
            "task_id": "evaluate",
            "script": "train.py",
            "workspace": str(folder),
            "pythonenv": [REQUIREMENT],
            "experiment_key": "gen-g007",
            "results_bucket": bucket,
            "aws_conn_id": S3_CONN,
            "resources_needed": {"cpus": 2, "gpus": 1},
            "runner_image": IMAGE,
            "execution_mode": "kubernetes",
        }
        arguments.update(overrides)
        return StudioExperimentOperator(**arguments)


def build_pod(op: StudioExperimentOperator) -> dict[str, Any]:
    context = runtime_context(op)
    op.render_template_fields(context)
    op.prepare_request(context)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True))
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    return pod


def runner_args(pod: dict[str, Any]) -> list[str]:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    return container["args"]


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_a_pod_shares_environments_through_the_results_bucket_by_default(
    aws_s3: str, workspace: Path
) -> None:
    pod = build_pod(pod_operator(workspace, aws_s3))
    args = runner_args(pod)
    assert option(args, "--env-cache-uri") == f"s3://s3.eu-west-1.amazonaws.com/{aws_s3}/studio-env-cache"
    assert "--env-cache-dir" not in args
    assert "studio-env-cache" not in {volume["name"] for volume in pod["spec"]["volumes"]}


@pytest.mark.parametrize(
    ("volume", "source"),
    [
        (
            "/var/cache/studio-runner/envs",
            {"hostPath": {"path": "/var/cache/studio-runner/envs", "type": "DirectoryOrCreate"}},
        ),
        ("studio-runner-env-cache", {"persistentVolumeClaim": {"claimName": "studio-runner-env-cache"}}),
    ],
)
def test_a_node_local_cache_volume_is_mounted_where_the_runner_looks_first(
    aws_s3: str, workspace: Path, volume: str, source: dict[str, Any]
) -> None:
    pod = build_pod(pod_operator(workspace, aws_s3, env_cache_volume=volume))
    args = runner_args(pod)
    assert option(args, "--env-cache-dir") == "/env-cache"
    assert (
        option(
            args,
            "--env-cache-uri",
        )
        == f"s3://s3.eu-west-1.amazonaws.com/{aws_s3}/studio-env-cache"
    )
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {key: value for key, value in volumes["studio-env-cache"].items() if key != "name"} == source
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/env-cache"] == "studio-env-cache" and mounts["/work"] == "studio-work"
    assert pod["spec"]["securityContext"]["fsGroup"] == 10001  # a PVC becomes writable for the runner


def test_configuration_names_the_cache_or_turns_it_off(
    aws_s3: str, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__STUDIO__ENV_CACHE_URI", "s3://minio.cache.svc:9000/envs/team-a")
    monkeypatch.setenv("AIRFLOW__STUDIO__ENV_CACHE_VOLUME", "node-envs")
    args = runner_args(build_pod(pod_operator(workspace, aws_s3)))
    assert option(args, "--env-cache-uri") == "s3://minio.cache.svc:9000/envs/team-a"
    assert option(args, "--env-cache-dir") == "/env-cache"

    args = runner_args(build_pod(pod_operator(workspace, aws_s3, env_cache_uri="off", env_cache_volume="")))
    assert "--env-cache-uri" not in args and "--env-cache-dir" not in args

    monkeypatch.setenv("AIRFLOW__STUDIO__ENV_CACHE_URI", "OFF")
    args = runner_args(build_pod(pod_operator(workspace, aws_s3)))
    assert "--env-cache-uri" not in args and option(args, "--env-cache-dir") == "/env-cache"


def test_a_cache_uri_without_a_bucket_fails_the_task_without_retries(aws_s3: str, workspace: Path) -> None:
    with pytest.raises(AirflowFailException, match="names no bucket"):
        build_pod(pod_operator(workspace, aws_s3, env_cache_uri="s3://minio.cache.svc:9000"))
    with pytest.raises(AirflowFailException, match="unsupported artifact URI scheme"):
        build_pod(pod_operator(workspace, aws_s3, env_cache_uri="ftp://host/bucket/envs"))


def test_a_queue_runner_pod_uses_the_connection_bucket_and_the_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{S3_CONN.upper()}",
        json.dumps(
            {
                "conn_type": "aws",
                "extra": {
                    "region_name": "eu-west-1",
                    "endpoint_url": "http://seaweedfs.studio.svc:8333",
                    "service_config": {"s3": {"bucket_name": "studio-results"}},
                },
            }
        ),
    )
    with DAG("studio_queue_capacity", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
        op = StudioQueueRunnerOperator(
            task_id="drain",
            queue_match="^sqs_team_b_.*$",
            queue_backends=["sqs"],
            aws_conn_id=S3_CONN,
            resources_needed={"cpus": 2},
            runner_image=IMAGE,
            execution_mode="kubernetes",
            env_cache_volume="/var/cache/studio-runner/envs",
        )
    context = runtime_context(op)
    op.render_template_fields(context)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True))
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    args = runner_args(pod)
    assert args[0] == "serve"
    assert option(args, "--env-cache-uri") == "s3://seaweedfs.studio.svc:8333/studio-results/studio-env-cache"
    assert option(args, "--env-cache-dir") == "/env-cache"


# --- local mode: two fresh "pods" ------------------------------------------------------------------


def test_a_second_fresh_local_run_restores_the_environment_the_first_built(
    services,
    bucket: str,
    s3_client,
    workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN.upper()}", seaweed_conn_json(services))
    monkeypatch.setenv("ENV_CACHE_URI", "s3://127.0.0.1:9/stray/envs")  # a worker's stray value is ignored
    logs = []
    for run in ("first", "second"):
        monkeypatch.setenv("AIRFLOW__STUDIO__LOCAL_WORKING_DIR", str(tmp_path / run / "work"))
        monkeypatch.setenv("AIRFLOW__STUDIO__LOCAL_CACHE_DIR", str(tmp_path / run / "cache"))
        if run == "second":
            for name, value in UNREACHABLE_INDEX.items():
                monkeypatch.setenv(name, value)
        op = StudioExperimentOperator(
            task_id="run",
            script="train.py",
            workspace=str(workspace),
            pythonenv=[REQUIREMENT],
            results_bucket=bucket,
            aws_conn_id=S3_CONN,
            execution_mode="local",
            experiment_key=f"envcache-{run}-{uuid.uuid4().hex[:8]}",
        )
        summary = op.execute({"ti": RecordingTI()})
        assert summary["status"] == "succeeded", summary
        captured = capsys.readouterr()
        logs.append(captured.out + captured.err)

    first, second = logs
    assert "workload with tabulate 0.10.0" in first and "workload with tabulate 0.10.0" in second
    assert "restored from cache" not in first
    assert "restored from cache in" in second, second[-3000:]
    stored = s3_client.list_objects_v2(Bucket=bucket, Prefix="studio-env-cache/").get("Contents", [])
    assert [entry["Key"].endswith(".tar.zst") for entry in stored] == [True]
