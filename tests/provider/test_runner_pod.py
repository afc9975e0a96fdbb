"""StudioRunnerPodOperator, the base that owns a runner's run: its pod and its local run.

The operator here is the smallest subclass there is (one ``studio-runner run`` of a request given
whole), so what the tests see is the base's own work: the pod KPO would create, validated against
the Kubernetes schema, and a real local run of a real request against the session's SeaweedFS.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import kubernetes_validate
import pendulum
import pytest
from airflow.sdk import DAG, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import ApiClient
from studio_runner.outcome import Status
from studio_runner.summary import RunSummary

from airflow_provider_studio.operators.runner_pod import XCOM_RESULT_FILE, StudioRunnerPodOperator
from tests.runner.client_requests import client_request, upload_blob, workspace_tar

TRAIN = b'import json\nprint(json.dumps({"experiment": {"fitness": 0.5}}), flush=True)\n'


class OneRequest(StudioRunnerPodOperator):
    """``studio-runner run --request-json``: a runner operator that says only what the base asks."""

    runner_subcommand = "run"
    summary_type = RunSummary

    def __init__(self, *, request: dict[str, Any] | str, region: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.request = request
        self.region = region
        self.concluded: list[RunSummary] = []

    def subcommand_options(self, *, kubernetes: bool) -> list[str]:
        text = self.request if isinstance(self.request, str) else json.dumps(self.request)
        return ["--request-json", text, *([] if kubernetes else ["--cpu-only"])]

    def runner_region(self) -> str | None:
        return self.region

    def pod_annotations(self) -> dict[str, str]:
        return {"example/kind": "one-request"}

    def conclude(self, summary: RunSummary, context: Context, *, cause: BaseException | None = None) -> Any:
        self.concluded.append(summary)
        return summary.to_value()


def one_request(**arguments: Any) -> OneRequest:
    with DAG("runner_pod", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
        return OneRequest(task_id="one", aws_conn_id=None, **{"request": {"experiment": {}}, **arguments})


def built_pod(op: OneRequest) -> dict[str, Any]:
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(None, dry_run=True))
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    return pod


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    return base


# --- the pod -----------------------------------------------------------------------------------------


def test_the_pod_runs_the_subcommand_with_its_options_late_and_the_callers_last() -> None:
    op = one_request(
        resources_needed={"cpus": 4, "ram": "8GiB", "gpus": 1, "gpuCount": 2},
        runner_options=["--installer", "uv"],
        region="eu-west-1",
    )
    op.request = '{"experiment": {"key": "set-after-init"}}'  # as a rendered template would be
    pod = built_pod(op)
    base = container(pod)
    assert base["args"][:3] == ["run", "--result-file", XCOM_RESULT_FILE]
    assert base["args"][-4:] == ["--request-json", op.request, "--installer", "uv"]
    assert "--cpu-only" not in base["args"]  # the local options are not the pod's
    assert base["resources"] == {"limits": {"nvidia.com/gpu": "2"}, "requests": {"cpu": "4", "memory": "8Gi"}}
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {e["name"]: e.get("value") for e in base["env"]}["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert pod["metadata"]["annotations"]["example/kind"] == "one-request"
    assert any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"])


def test_without_xcom_the_runner_is_not_asked_for_a_summary() -> None:
    pod = built_pod(one_request(do_xcom_push=False))
    assert "--result-file" not in container(pod)["args"]
    assert not any(c["name"] == "airflow-xcom-sidecar" for c in pod["spec"]["containers"])


def test_explicit_pod_arguments_and_environment_win() -> None:
    from kubernetes.client import models as k8s

    op = one_request(
        arguments=["run", "--request", "/etc/request.json"],
        env_vars=[k8s.V1EnvVar(name="AWS_DEFAULT_REGION", value="us-west-2")],
        region="eu-west-1",
    )
    base = container(built_pod(op))
    assert base["args"] == ["run", "--request", "/etc/request.json"]
    assert [e["value"] for e in base["env"] if e["name"] == "AWS_DEFAULT_REGION"] == ["us-west-2"]


# --- the runner's result, as KPO's xcom sidecar hands it over ------------------------------------------


def test_a_result_file_is_typed_before_the_subclass_concludes() -> None:
    op = one_request()
    written = {"key": "k", "status": "failed", "reason": "exit 3", "exit_code": 3, "scrape_uri": None}
    assert op.conclude_result(json.loads(json.dumps(written)), {}) == written
    (summary,) = op.concluded
    assert summary.status is Status.FAILED and summary.exit_code == 3 and not summary.succeeded


@pytest.mark.parametrize("result", [None, [], {"key": "k"}, {"status": "no-such-status"}])
def test_a_missing_or_unreadable_result_fails_the_task_with_a_reason(result: Any) -> None:
    op = one_request()
    with pytest.raises(AirflowException, match="studio-runner left no result summary for studio-runner run"):
        op.conclude_result(result, {})
    assert op.concluded == []


def test_a_bad_execution_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="execution_mode"):
        one_request(execution_mode="cloud")


# --- local mode: a real runner -----------------------------------------------------------------------


def test_a_real_request_runs_locally_and_its_summary_names_the_scrape_document(
    services, s3_client, bucket: str
) -> None:
    key = f"pod-base-{uuid.uuid4().hex[:8]}"
    workspace = upload_blob(s3_client, bucket, workspace_tar({"train.py": TRAIN}))
    op = one_request(request=client_request(services, bucket, key, workspace), execution_mode="local")
    value = op.execute({})

    (summary,) = op.concluded
    assert summary.succeeded and summary.key == key and value["status"] == "succeeded"
    assert (summary.scrape_bucket, value["scrape_bucket"]) == (bucket, bucket)
    assert summary.scrape_key is not None and summary.scrape_key.startswith("metadata/scrape-host-")
    document = json.loads(s3_client.get_object(Bucket=bucket, Key=summary.scrape_key)["Body"].read())
    assert document["studioml"]["experiment"]["key"] == key


def test_an_invalid_request_still_leaves_a_summary_locally() -> None:
    op = one_request(request={"experiment": {}}, execution_mode="local")
    value = op.execute({})
    assert value["status"] == "invalid" and op.concluded[0].status is Status.INVALID


def test_a_runner_that_refuses_its_options_fails_without_retries() -> None:
    op = one_request(execution_mode="local", runner_options=["--no-such-option"])
    with pytest.raises(AirflowFailException, match="exited with status 2 without a result summary"):
        op.execute({})
