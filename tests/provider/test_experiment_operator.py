"""StudioExperimentOperator: the pod it would start, and local runs end to end.

Local mode runs the real ``studio-runner`` against the session's SeaweedFS, inside a real
``airflow dags test`` run; the pod tests build the pod KPO would create, with the request a
real S3 (moto) staged, and validate it against the Kubernetes schema.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pendulum
import pytest
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s
from studio_runner.request import decode_request

from airflow_provider_studio.experiment_request import default_experiment_key
from airflow_provider_studio.links.experiment import StudioArtifactsLink
from airflow_provider_studio.operators.experiment import (
    StudioExperimentFailed,
    StudioExperimentOperator,
    StudioRequestRefused,
)
from airflow_provider_studio.operators.runner_pod import kubernetes_quantity
from tests.provider.task_context import RecordingTI, moto_s3_connection, runtime_context, seaweed_conn_json
from tests.runner.results import final_document, tar_members

S3_CONN = "studio_experiment_s3"
FAKE_KEY_ID = "AKIAFAKESTUDIOKEY0001"
FAKE_SECRET = "FAKE-SECRET-studio-7d1f0c9e-never-in-a-pod"

TRAIN = """\
import json, os, sys
args = sys.argv[1:]
print("workload args:", args, flush=True)
if "--fail" in args:
    print("diverged at epoch 2", flush=True)
    sys.exit(3)
if "--sleep" in args:
    print("long run starting", flush=True)
    import time
    time.sleep(600)
fitness = float(args[args.index("--fitness") + 1])
for epoch in range(2):
    print(json.dumps({"experiment": {"epoch": epoch, "fitness": fitness * (epoch + 1) / 2}}), flush=True)
os.makedirs("../modeldir", exist_ok=True)
with open("../modeldir/weights.txt", "w") as out:
    out.write(f"fitness={fitness}")
"""


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "workspace"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN)
    return folder


@pytest.fixture
def seaweed_conn(services, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's SeaweedFS as an Airflow AWS connection (``endpoint_url`` extra)."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{S3_CONN.upper()}", seaweed_conn_json(services))
    return S3_CONN


# --- the pod -------------------------------------------------------------------------------------


@pytest.fixture
def aws_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """AWS S3 (moto) behind a connection with recognisable fake keys; yields the bucket."""
    with moto_s3_connection(monkeypatch, S3_CONN, login=FAKE_KEY_ID, password=FAKE_SECRET) as bucket:
        yield bucket


def gpu_operator(folder: Path, bucket: str, **overrides: Any) -> StudioExperimentOperator:
    with DAG("enn_generation", schedule=None, start_date=pendulum.datetime(2026, 1, 1), params={"gpus": 2}):
        arguments: dict[str, Any] = {
            "task_id": "evaluate",
            "script": "train.py",
            "workspace": str(folder),
            "args": ["--genome", "g-{{ dag_run.conf['generation'] }}-007", "--lr", "0.01"],
            "experiment_key": "gen{{ dag_run.conf['generation'] }}-g007",
            "results_bucket": bucket,
            "aws_conn_id": S3_CONN,
            "resources_needed": {"cpus": 8, "ram": "32GiB", "gpus": 1, "gpuCount": "{{ params.gpus }}"},
            "env": {"ENN_GENERATION": "{{ dag_run.conf['generation'] }}"},
            "runner_image": "registry.example.com/studio-runner:1.2.3",
            "namespace": "ml",
            "shm_size": "16Gi",
            "execution_mode": "kubernetes",
        }
        arguments.update(overrides)
        return StudioExperimentOperator(**arguments)


def build_pod(op: StudioExperimentOperator) -> tuple[dict[str, Any], Any]:
    context = runtime_context(op)
    op.render_template_fields(context)
    op.prepare_request(context)
    pod = op.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod), context


def base_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    return container


def test_a_two_gpu_pod_is_valid_kubernetes_and_carries_no_secret(aws_s3: str, workspace: Path) -> None:
    op = gpu_operator(workspace, aws_s3)
    pod, _context = build_pod(op)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)

    container = base_container(pod)
    assert container["image"] == "registry.example.com/studio-runner:1.2.3"
    assert not container.get("command"), "no command: the image's entrypoint (tini) stays PID 1"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"]["drop"] == ["ALL"] and not security["allowPrivilegeEscalation"]
    assert container["args"][:3] == ["run", "--result-file", "/airflow/xcom/return.json"]
    assert "--s3-https" not in container["args"]  # AWS: the runner uses HTTPS for AWS hosts itself
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": "2"},
        "requests": {"cpu": "8", "memory": "32Gi"},
    }
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert "emptyDir" in volumes["studio-work"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert (
        mounts["/dev/shm"] == "dshm" and mounts["/work"] == "studio-work" and mounts["/tmp"] == "studio-tmp"
    )
    assert mounts["/airflow/xcom"] == "xcom"
    assert any(c["name"] == "airflow-xcom-sidecar" for c in spec["containers"])
    assert pod["metadata"]["namespace"] == "ml"
    assert pod["metadata"]["annotations"]["studioml/experiment-key"] == "gen12-g007"

    env = {e["name"]: e for e in container["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "studio-s3-credentials", "key": name}}
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"

    # the request in the pod is the runner's kind, rendered, and names the regional AWS host
    request = decode_request(env["REQUEST_JSON"]["value"])
    assert request.key == "gen12-g007"
    assert request.experiment.args == ["--genome", "g-12-007", "--lr", "0.01"]
    assert request.experiment.resources_needed.cards == 2
    assert request.config.env == {"ENN_GENERATION": "12"}
    assert request.experiment.artifacts["output"].qualified == (
        f"s3://s3.eu-west-1.amazonaws.com/{aws_s3}/experiments/gen12-g007/output.tar"
    )

    serialised = json.dumps(pod)
    rendered = json.dumps({field: getattr(op, field) for field in op.template_fields}, default=repr)
    for secret in (FAKE_SECRET, FAKE_KEY_ID):
        assert secret not in serialised
        assert secret not in rendered
    assert "REQUEST_JSON" in rendered and op.studio_request["experiment"]["key"] == "gen12-g007"


def test_without_gpus_the_pod_asks_for_no_gpu_node(aws_s3: str, workspace: Path) -> None:
    # as a template renders a dict without native rendering: its Python text
    op = gpu_operator(workspace, aws_s3, resources_needed="{{ {'cpus': 2, 'ram': '4g'} }}")
    pod, _ = build_pod(op)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    assert base_container(pod)["resources"] == {"requests": {"cpu": "2", "memory": "4G"}}
    assert not pod["spec"].get("nodeSelector") and not pod["spec"].get("tolerations")


def test_every_pod_argument_can_be_overridden(aws_s3: str, workspace: Path) -> None:
    op = gpu_operator(
        workspace,
        aws_s3,
        node_selector={"pool": "a100"},
        tolerations=[k8s.V1Toleration(key="dedicated", operator="Equal", value="ml", effect="NoSchedule")],
        container_resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "4", "memory": "64Gi"}),
        s3_credentials_secret="team-s3",
        s3_credentials_secret_keys={"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"},
        image_pull_policy="Always",
    )
    pod, _ = build_pod(op)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    container = base_container(pod)
    assert pod["spec"]["nodeSelector"] == {"pool": "a100"}
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    assert container["resources"] == {"limits": {"memory": "64Gi", "nvidia.com/gpu": "4"}}
    assert container["imagePullPolicy"] == "Always"
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "secret"}


def test_an_https_object_store_gets_the_runner_flag(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{S3_CONN.upper()}",
        json.dumps({"conn_type": "aws", "extra": {"endpoint_url": "https://minio.example.com:9000"}}),
    )
    op = gpu_operator(workspace, "b", workspace="s3://b/ws.tar")
    monkeypatch.setattr("airflow.providers.amazon.aws.hooks.s3.S3Hook.check_for_key", lambda *a, **k: True)
    pod, _ = build_pod(op)
    container = base_container(pod)
    assert container["args"][-1] == "--s3-https"
    request = decode_request({e["name"]: e for e in container["env"]}["REQUEST_JSON"]["value"])
    assert request.experiment.artifacts["workspace"].qualified == "s3://minio.example.com:9000/b/ws.tar"


def test_mapped_experiments_get_their_own_keys_and_links(aws_s3: str, workspace: Path, monkeypatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW__STUDIO__ARTIFACTS_LINK_TEMPLATE", "https://console.example.com/{bucket}?p={prefix}"
    )
    with DAG("enn_generation", schedule=None, start_date=pendulum.datetime(2026, 1, 1)) as dag:
        StudioExperimentOperator.partial(
            task_id="evaluate", script="train.py", workspace=str(workspace), results_bucket=aws_s3
        ).expand(args=[["--genome", "a"], ["--genome", "b"]])
    assert dag.task_dict["evaluate"].operator_extra_links  # mapped tasks keep the link
    link = StudioArtifactsLink()
    op = StudioExperimentOperator(task_id="evaluate", script="train.py", results_bucket=aws_s3)
    run_id = "manual__2026-03-01T00:00:00+00:00"

    urls = [
        link.get_link(
            op,
            ti_key=SimpleNamespace(
                dag_id="enn_generation", task_id="evaluate", run_id=run_id, map_index=index
            ),
        )
        for index in (0, 1)
    ]
    assert urls == [
        f"https://console.example.com/{aws_s3}?p=experiments/"
        f"{default_experiment_key('enn_generation', run_id, 'evaluate', index)}/"
        for index in (0, 1)
    ]


# --- pod outcomes (KPO's own pod handling stubbed at its boundary) -------------------------------


SUMMARY_FAILED = {
    "key": "gen12-g007",
    "status": "failed",
    "reason": "the workload exited with status 3",
    "exit_code": 3,
    "artifacts": {"output": "s3://h/b/experiments/gen12-g007/output.tar"},
    "scrape_uri": "s3://h/b/metadata/scrape-host-x.json",
    "results_saved": True,
    "duration_seconds": 4.2,
}


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """KPO without a cluster: a client that is never called (the official tests' patch point)."""
    monkeypatch.setattr(
        "airflow.providers.cncf.kubernetes.hooks.kubernetes.KubernetesHook._get_default_client",
        lambda *args, **kwargs: object(),
    )


def kpo_failing_after_xcom(
    monkeypatch: pytest.MonkeyPatch, path: str, summary: dict[str, Any] | None
) -> None:
    """KPO's ``path`` as it goes when the runner exits non-zero: it reads the xcom file (through
    ``extract_xcom``, whose pod exec is stubbed), then reports the failed pod."""
    text = json.dumps(summary) if summary else "__airflow_xcom_result_empty__"
    monkeypatch.setattr(
        "airflow.providers.cncf.kubernetes.utils.pod_manager.PodManager.extract_xcom",
        lambda self, pod, **kwargs: text,
    )

    def run(self: KubernetesPodOperator, *args: Any, **kwargs: Any) -> Any:
        self.extract_xcom(pod=k8s.V1Pod())
        raise AirflowException("Pod evaluate-abc returned a failure.")

    monkeypatch.setattr(KubernetesPodOperator, path, run)


@pytest.mark.parametrize("path", ["execute_sync", "trigger_reentry"])
def test_a_failed_experiment_fails_with_the_runner_reason_in_both_paths(
    aws_s3: str, workspace: Path, monkeypatch: pytest.MonkeyPatch, path: str, no_cluster: None
) -> None:
    kpo_failing_after_xcom(monkeypatch, path, SUMMARY_FAILED)
    op = gpu_operator(workspace, aws_s3, deferrable=path == "trigger_reentry")
    context = runtime_context(op)
    op.render_template_fields(context)
    with pytest.raises(
        StudioExperimentFailed, match="experiment gen12-g007 failed: the workload exited with status 3"
    ) as raised:
        if path == "execute_sync":
            op.execute(context)
        else:
            op.trigger_reentry(context, {"status": "failed", "name": "p", "namespace": "ml"})
    assert raised.value.summary == SUMMARY_FAILED
    assert not isinstance(raised.value, AirflowFailException)  # retries may help a failed workload


@pytest.mark.parametrize("path", ["execute_sync", "trigger_reentry"])
def test_tolerated_failures_return_the_summary_in_both_paths(
    aws_s3: str, workspace: Path, monkeypatch: pytest.MonkeyPatch, path: str, no_cluster: None
) -> None:
    kpo_failing_after_xcom(monkeypatch, path, SUMMARY_FAILED)
    op = gpu_operator(workspace, aws_s3, fail_on_experiment_error=False, deferrable=path == "trigger_reentry")
    context = runtime_context(op)
    op.render_template_fields(context)
    if path == "execute_sync":
        assert op.execute(context) == SUMMARY_FAILED
    else:
        assert (
            op.trigger_reentry(context, {"status": "failed", "name": "p", "namespace": "ml"})
            == SUMMARY_FAILED
        )


def test_a_pod_that_left_no_summary_fails_with_kpo_error_even_when_tolerant(
    aws_s3: str, workspace: Path, monkeypatch: pytest.MonkeyPatch, no_cluster: None
) -> None:
    kpo_failing_after_xcom(monkeypatch, "execute_sync", None)
    op = gpu_operator(workspace, aws_s3, fail_on_experiment_error=False)
    context = runtime_context(op)
    op.render_template_fields(context)
    with pytest.raises(AirflowException, match="returned a failure"):
        op.execute(context)


def test_an_invalid_request_verdict_is_not_retried(
    aws_s3: str, workspace: Path, monkeypatch: pytest.MonkeyPatch, no_cluster: None
) -> None:
    invalid = {**SUMMARY_FAILED, "status": "invalid", "reason": "python environment cannot be built"}
    kpo_failing_after_xcom(monkeypatch, "execute_sync", invalid)
    op = gpu_operator(workspace, aws_s3)
    context = runtime_context(op)
    op.render_template_fields(context)
    with pytest.raises(StudioRequestRefused, match="invalid: python environment"):
        op.execute(context)


def test_deferrable_mode_defers_to_the_kpo_trigger(
    aws_s3: str, workspace: Path, pending_pods: list[k8s.V1Pod], no_cluster: None
) -> None:
    created = pending_pods
    op = gpu_operator(workspace, aws_s3, deferrable=True)
    context = runtime_context(op)
    context["ti"] = ti = RecordingTI("enn_generation", "evaluate")
    op.render_template_fields(context)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "trigger_reentry"
    assert type(deferred.value.trigger).__name__ == "KubernetesPodTrigger"
    env = {e.name: e for e in created[0].spec.containers[0].env}
    assert decode_request(env["REQUEST_JSON"].value).key == "gen12-g007"
    assert ti.xcoms["pod_namespace"] == "ml"


def test_sizes_become_exact_kubernetes_quantities() -> None:
    assert kubernetes_quantity(16 * 1024**3) == "16Gi"
    assert kubernetes_quantity(2 * 1000**3) == "2G"
    assert kubernetes_quantity(1_500_000_000) == "1500M"
    assert kubernetes_quantity(1023) == "1023"


# --- local mode, in this process -----------------------------------------------------------------


def local_operator(workspace: Path, bucket: str, **overrides: Any) -> StudioExperimentOperator:
    arguments: dict[str, Any] = {
        "task_id": "run",
        "script": "train.py",
        "workspace": str(workspace),
        "results_bucket": bucket,
        "aws_conn_id": S3_CONN,
        "execution_mode": "local",
        "experiment_key": f"local-{uuid.uuid4().hex[:8]}",
    }
    arguments.update(overrides)
    return StudioExperimentOperator(**arguments)


def test_local_failure_fails_with_the_runner_reason_and_keeps_the_summary(
    seaweed_conn: str, bucket: str, s3_client, workspace: Path, capsys
) -> None:
    op = local_operator(workspace, bucket, args=["--fail"])
    ti = RecordingTI()
    with pytest.raises(StudioExperimentFailed, match="failed: the workload exited with status 3") as raised:
        op.execute({"ti": ti})
    summary = raised.value.summary
    assert summary["status"] == "failed" and summary["exit_code"] == 3
    assert ti.xcoms["return_value"] == summary
    output = tar_members(s3_client, bucket, f"experiments/{op.experiment_key}/output.tar")[
        "./output"
    ].decode()
    assert "diverged at epoch 2" in output
    captured = capsys.readouterr()
    assert "diverged at epoch 2" in captured.out + captured.err  # streamed into the task log


def test_local_runner_environment_holds_the_connection_keys_and_no_airflow_settings(
    seaweed_conn: str, services, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow:db-password@db/airflow")
    monkeypatch.setenv("REQUEST_JSON", '{"experiment": {"key": "stray"}}')
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stale-token")
    op = local_operator(workspace, "b")
    env = op._local_runner_environment("us-east-1")
    assert env["AWS_ACCESS_KEY_ID"] == services.s3_access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == services.s3_secret_key
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "AWS_SESSION_TOKEN" not in env and "REQUEST_JSON" not in env
    assert not [name for name in env if name.startswith("AIRFLOW")]


def test_killing_a_local_task_stops_the_runner_which_uploads_what_it_has(
    seaweed_conn: str, bucket: str, s3_client, workspace: Path, capsys
) -> None:
    op = local_operator(workspace, bucket, args=["--sleep"], local_kill_grace_period=60)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            op.execute({"ti": RecordingTI()})
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    seen = ""
    deadline = time.monotonic() + 120
    while "long run starting" not in seen:
        assert time.monotonic() < deadline and worker.is_alive(), seen[-3000:]
        time.sleep(0.2)
        captured = capsys.readouterr()
        seen += captured.out + captured.err
    op.on_kill()
    worker.join(90)
    assert not worker.is_alive()
    assert isinstance(outcome["error"], StudioExperimentFailed)
    assert outcome["error"].summary["status"] == "interrupted"
    output = tar_members(s3_client, bucket, f"experiments/{op.experiment_key}/output.tar")[
        "./output"
    ].decode()
    assert "long run starting" in output


# --- local mode, end to end through Airflow ------------------------------------------------------

DAG_FILE = """\
import json
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task
from airflow_provider_studio.operators.experiment import StudioExperimentOperator

COMMON = dict(
    script="train.py",
    workspace={workspace!r},
    results_bucket={bucket!r},
    aws_conn_id={conn!r},
    project="enn-e2e",
    lifetime="30m",
    pythonenv=[],
)

with DAG("studio_local_e2e", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
    evaluate = StudioExperimentOperator.partial(
        task_id="evaluate", map_index_template="{{{{ experiment_key }}}}", **COMMON
    ).expand(args=[["--fitness", "0.25"], ["--fitness", "0.5"], ["--fitness", "0.75"]])
    # whole kwarg sets per candidate, with the DAG author's own (templated) keys
    candidates = StudioExperimentOperator.partial(
        task_id="candidates", map_index_template="{{{{ experiment_key }}}}", **COMMON
    ).expand_kwargs(
        [
            {{"args": ["--fitness", "0.9"], "experiment_key": "{key_prefix}-{{{{ ds_nodash }}}}-a"}},
            {{"args": "--fitness 0.1", "experiment_key": "{key_prefix}-{{{{ ds_nodash }}}}-b"}},
        ]
    )
    tolerated = StudioExperimentOperator(
        task_id="diverges_tolerated", args=["--fail"], fail_on_experiment_error=False, **COMMON
    )
    strict = StudioExperimentOperator(task_id="diverges", args=["--fail"], **COMMON)

    @task(trigger_rule="all_done")
    def select(summaries, tolerated_summary):
        summaries = list(summaries)
        Path({received!r}).write_text(json.dumps({{"summaries": summaries, "tolerated": tolerated_summary}}))
        return max(summaries, key=lambda s: s["key"])["key"]

    chosen = select(evaluate.output, tolerated.output)
    [strict, candidates] >> chosen
"""


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def test_mapped_experiments_run_end_to_end_in_local_mode(
    airflow_db: Path, services, s3_client, bucket: str, workspace: Path, tmp_path: Path
) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    received = tmp_path / "received.json"
    key_prefix = f"kw{uuid.uuid4().hex[:6]}"
    (dags / "studio_local_e2e.py").write_text(
        DAG_FILE.format(
            workspace=str(workspace),
            bucket=bucket,
            conn=S3_CONN,
            received=str(received),
            key_prefix=key_prefix,
        )
    )
    env = {
        **os.environ,
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
        "AIRFLOW__STUDIO__ARTIFACTS_LINK_TEMPLATE": "{endpoint}/{bucket}/{prefix}",
        f"AIRFLOW_CONN_{S3_CONN.upper()}": seaweed_conn_json(services),
    }
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "studio_local_e2e"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    db = airflow_db / "airflow.db"
    ((run_id, run_state),) = query(db, "SELECT run_id, state FROM dag_run WHERE dag_id = 'studio_local_e2e'")
    assert run_state == "success", log[-6000:]
    states = dict(
        ((task, index), state)
        for task, index, state in query(
            db, "SELECT task_id, map_index, state FROM task_instance WHERE run_id = ?", run_id
        )
    )
    assert states == {
        ("evaluate", 0): "success",
        ("evaluate", 1): "success",
        ("evaluate", 2): "success",
        ("diverges_tolerated", -1): "success",
        ("diverges", -1): "failed",
        ("candidates", 0): "success",
        ("candidates", 1): "success",
        ("select", -1): "success",
    }

    xcoms = {
        (task, index, key): json.loads(value)
        for task, index, key, value in query(
            db, "SELECT task_id, map_index, key, value FROM xcom WHERE run_id = ?", run_id
        )
    }
    keys = [default_experiment_key("studio_local_e2e", run_id, "evaluate", i) for i in range(3)]
    rendered = dict(
        query(
            db,
            "SELECT map_index, rendered_map_index FROM task_instance WHERE task_id = 'evaluate' AND run_id = ?",
            run_id,
        )
    )
    assert rendered == dict(enumerate(keys))
    host = services.s3_endpoint.split("://", 1)[1]
    for index, (key, fitness) in enumerate(zip(keys, (0.25, 0.5, 0.75), strict=True)):
        summary = xcoms[("evaluate", index, "return_value")]
        assert summary["key"] == key and summary["status"] == "succeeded" and summary["exit_code"] == 0
        assert summary["artifacts"]["output"] == f"s3://{host}/{bucket}/experiments/{key}/output.tar"
        assert summary["artifacts"]["modeldir"] == f"s3://{host}/{bucket}/experiments/{key}/modeldir.tar"
        assert summary["scrape_uri"].startswith(f"s3://{host}/{bucket}/metadata/scrape-host-")
        assert xcoms[("evaluate", index, "_link_StudioArtifactsLink")] == (
            f"{services.s3_endpoint}/{bucket}/experiments/{key}/"
        )
        output = tar_members(s3_client, bucket, f"experiments/{key}/output.tar")["./output"].decode()
        assert f"workload args: ['--fitness', '{fitness}']" in output
        assert tar_members(s3_client, bucket, f"experiments/{key}/modeldir.tar") == {
            "./weights.txt": f"fitness={fitness}".encode()
        }
        document = final_document(s3_client, bucket, key)
        assert document is not None and document["experiment"] == {"epoch": 1, "fitness": fitness}
        assert document["studioml"]["status"] == "succeeded"
        assert f"workload args: ['--fitness', '{fitness}']" in log  # streamed into the task log
        assert json.dumps({"experiment": {"epoch": 1, "fitness": fitness}}) in log

    # expand_kwargs: the author's templated keys name the results, the index and the link
    ((logical_date,),) = query(db, "SELECT logical_date FROM dag_run WHERE run_id = ?", run_id)
    logical_day = str(logical_date)[:10].replace("-", "")
    candidate_keys = {0: f"{key_prefix}-{logical_day}-a", 1: f"{key_prefix}-{logical_day}-b"}
    rendered = dict(
        query(
            db,
            "SELECT map_index, rendered_map_index FROM task_instance WHERE task_id = 'candidates' AND run_id = ?",
            run_id,
        )
    )
    assert rendered == candidate_keys
    for index, key in candidate_keys.items():
        assert xcoms[("candidates", index, "return_value")]["key"] == key
        assert final_document(s3_client, bucket, key)["experiment"]["fitness"] == (0.9, 0.1)[index]

    received_values = json.loads(received.read_text())
    assert [s["key"] for s in received_values["summaries"]] == keys
    tolerated = received_values["tolerated"]
    assert tolerated["status"] == "failed" and tolerated["reason"] == "the workload exited with status 3"
    assert xcoms[("diverges_tolerated", -1, "return_value")] == tolerated

    strict_key = default_experiment_key("studio_local_e2e", run_id, "diverges", -1)
    assert xcoms[("diverges", -1, "return_value")]["status"] == "failed"
    assert f"experiment {strict_key} failed: the workload exited with status 3" in log
    assert "diverged at epoch 2" in log
    assert final_document(s3_client, bucket, strict_key)["studioml"]["exit_code"] == 3

    # the request that ran is under Rendered Templates, and no secret is anywhere
    fields = query(db, "SELECT rendered_fields FROM rendered_task_instance_fields WHERE run_id = ?", run_id)
    assert any('"studio_request"' in row[0] and strict_key in row[0] for row in fields)
    for secret in (services.s3_secret_key,):
        assert secret not in log
        assert all(secret not in row[0] for row in fields)
        assert (
            secret
            not in tar_members(s3_client, bucket, f"experiments/{keys[0]}/output.tar")["./output"].decode()
        )
    # the virtualenv cache persists under $AIRFLOW_HOME for the next task and run
    assert any((airflow_db / "studio-runner" / "cache").iterdir())


# --- sealed requests (message_keys_conn_id) ------------------------------------------------------

KEYS_CONN = "studio_message_keys_test"
PASSPHRASE = "operator-passphrase-0b5e9d"
WANDB_SECRET = "wandb-secret-in-config-env-51c7e2"


@pytest.fixture(scope="module")
def sealing_keys():
    from tests.security.keys import RunnerKey, new_signer

    return RunnerKey.generate(PASSPHRASE), new_signer()


@pytest.fixture
def keys_conn(sealing_keys, monkeypatch: pytest.MonkeyPatch) -> str:
    from tests.security.keys import message_keys_connection

    runner_key, signer = sealing_keys
    monkeypatch.setenv(f"AIRFLOW_CONN_{KEYS_CONN.upper()}", message_keys_connection(runner_key, signer))
    return KEYS_CONN


def test_a_sealed_request_pod_carries_only_the_envelope_and_mounts_the_runner_keys(
    aws_s3: str, workspace: Path, keys_conn: str, sealing_keys, tmp_path: Path
) -> None:
    from studio_runner.envelope import RunnerKeyring, open_message
    from studio_runner.request import is_envelope

    from tests.security.keys import openssh_private, pem_body_lines, write_signers

    runner_key, signer = sealing_keys
    op = gpu_operator(
        workspace,
        aws_s3,
        message_keys_conn_id=keys_conn,
        env={"ENN_GENERATION": "{{ dag_run.conf['generation'] }}", "WANDB_API_KEY": WANDB_SECRET},
    )
    pod, _ = build_pod(op)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)

    container = base_container(pod)
    envelope = json.loads({e["name"]: e for e in container["env"]}["REQUEST_JSON"]["value"])
    assert is_envelope(envelope)
    runner_keys = RunnerKeyring(
        runner_key.write_encrypt_dir(tmp_path / "encrypt"), write_signers(tmp_path / "signers", {"x": signer})
    )
    request = open_message(json.dumps(envelope), None, runner_keys, clear_text_allowed=False)
    assert request.key == "gen12-g007"
    assert request.config.env == {"ENN_GENERATION": "12", "WANDB_API_KEY": WANDB_SECRET}

    args = container["args"]
    assert args[args.index("--encrypt-dir") + 1] == "/etc/studio-runner/encryption"
    assert args[args.index("--request-signatures-dir") + 1] == "/etc/studio-runner/request-signers"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["studio-runner-key"]["secret"] == {
        "secretName": "studio-runner-message-key",
        "defaultMode": 0o440,
        "optional": True,
        "items": [
            {"key": "ssh-privatekey", "path": "encryption/ssh-privatekey"},
            {"key": "ssh-passphrase", "path": "passphrase/ssh-passphrase"},
        ],
    }
    assert volumes["studio-request-signers"]["secret"]["secretName"] == "studio-runner-request-signers"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["studio-runner-key"] == {
        "name": "studio-runner-key",
        "mountPath": "/etc/studio-runner/encryption",
        "readOnly": True,
    }
    assert mounts["studio-request-signers"]["readOnly"]
    assert pod["spec"]["securityContext"] == {"fsGroup": 10001}  # the 0440 key files' group

    # no key material and no clear request anywhere in the pod or the rendered fields
    serialised = json.dumps(pod)
    rendered = json.dumps({field: getattr(op, field) for field in op.template_fields}, default=repr)
    leaks = [
        PASSPHRASE,
        WANDB_SECRET,
        *pem_body_lines(runner_key.private_pem),
        *pem_body_lines(openssh_private(signer)),
    ]
    for secret in leaks:
        assert secret not in serialised, secret
    for secret in (
        PASSPHRASE,
        *pem_body_lines(runner_key.private_pem),
        *pem_body_lines(openssh_private(signer)),
    ):
        assert secret not in rendered, secret
    assert op.studio_request["config"]["env"]["WANDB_API_KEY"] == "***"  # the shown request is redacted
    assert op.studio_request["experiment"]["key"] == "gen12-g007"


def test_a_message_keys_connection_without_a_signing_key_fails_the_task(
    aws_s3: str, workspace: Path, sealing_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner_key, _signer = sealing_keys
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{KEYS_CONN.upper()}",
        json.dumps(
            {
                "conn_type": "studio_message_keys",
                "extra": {"runner_public_key": runner_key.public_pem.decode()},
            }
        ),
    )
    op = gpu_operator(workspace, aws_s3, message_keys_conn_id=KEYS_CONN)
    with pytest.raises(AirflowFailException, match="has no 'signing_private_key' extra"):
        build_pod(op)


def test_a_sealed_request_runs_locally_with_private_key_folders_removed_after(
    seaweed_conn: str,
    keys_conn: str,
    bucket: str,
    s3_client,
    workspace: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_provider_studio.operators.runner_pod import StudioRunnerPodOperator

    monkeypatch.setenv("ENCRYPT_DIR", "/nowhere/stray")  # a worker's own value must not reach the runner
    seen: dict[str, Any] = {}
    original = StudioRunnerPodOperator._run_local_runner

    def spy(self, command, env, stdin=None):
        folders = [Path(env["ENCRYPT_DIR"]), Path(env["REQUEST_SIGNATURES_DIR"])]
        root = folders[0].parent
        seen.update(command=list(command), stdin=stdin, folders=folders, root=root)
        seen["modes"] = {
            str(path.relative_to(root)): path.stat().st_mode & 0o777 for path in [root, *root.rglob("*")]
        }
        return original(self, command, env, stdin)

    monkeypatch.setattr(StudioRunnerPodOperator, "_run_local_runner", spy)
    op = local_operator(workspace, bucket, args=["--fitness", "0.5"], message_keys_conn_id=keys_conn)
    summary = op.execute({"ti": RecordingTI()})

    assert summary["status"] == "succeeded"  # the runner decrypted and verified the envelope
    output = tar_members(s3_client, bucket, f"experiments/{op.experiment_key}/output.tar")["./output"]
    assert b"workload args: ['--fitness', '0.5']" in output
    assert json.loads(seen["stdin"])["message"]["payload"]  # the runner's stdin held the envelope
    assert str(seen["root"]) not in " ".join(seen["command"])  # key paths only in its environment
    assert seen["modes"] == {
        ".": 0o700,
        "encrypt": 0o700,
        "encrypt/encryption": 0o700,
        "encrypt/encryption/ssh-privatekey": 0o600,
        "encrypt/passphrase": 0o700,
        "encrypt/passphrase/ssh-passphrase": 0o600,
        "signers": 0o700,
        "signers/airflow": 0o600,
    }
    assert not seen["root"].exists()  # removed after the run
