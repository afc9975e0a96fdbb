"""StudioQueueRunnerOperator: the runner pod it would start, and a local runner stopped mid-experiment.

The pod tests build the pod KPO would create from rendered templates and real connection
definitions, and validate it against the Kubernetes schema; the local test drives the real
StudioML client and the real runner. The queue-driven DAG test (tests/dags) runs it end to end.
"""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path
from typing import Any

import kubernetes_validate
import pendulum
import pytest
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_provider_studio.operators.queue_runner import StudioQueueRunnerOperator, exactly
from tests.broker import queue_depth, unique_queue
from tests.polling import wait_for
from tests.provider.connections import rabbitmq_connection, set_connection
from tests.provider.task_context import RecordingTI, runtime_context, seaweed_conn_json
from tests.runner.results import tar_members

AMQP_PASSWORD = "FAKE-amqp-password/with@odd:chars"
MANAGEMENT_PASSWORD = "FAKE-management-password-8e1d"
FAKE_KEY_ID = "AKIAFAKEQUEUERUNNER01"
FAKE_SECRET = "FAKE-aws-secret-queue-runner-never-in-a-pod"
RMQ_CONN = "studio_rmq_pod"
AWS_CONN = "studio_aws_pod"


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster broker and AWS account, with secrets a pod must never show."""
    set_connection(
        monkeypatch,
        RMQ_CONN,
        {
            "conn_type": "studio_rabbitmq",
            "host": "rabbitmq.studio.svc",
            "port": 5672,
            "login": "studio-runner",
            "password": AMQP_PASSWORD,
            "schema": "experiments",
            "extra": {
                "management_url": f"http://monitor:{MANAGEMENT_PASSWORD}@rabbitmq-mgmt.studio.svc:15672"
            },
        },
    )
    set_connection(
        monkeypatch,
        AWS_CONN,
        {
            "conn_type": "aws",
            "login": FAKE_KEY_ID,
            "password": FAKE_SECRET,
            "extra": {"region_name": "eu-west-1", "endpoint_url": "http://sqs.studio.svc:9324"},
        },
    )


def queue_runner(**overrides: Any) -> StudioQueueRunnerOperator:
    with DAG(
        "studio_queue_capacity", schedule=None, start_date=pendulum.datetime(2026, 1, 1), params={"gpus": 2}
    ):
        arguments: dict[str, Any] = {
            "task_id": "drain",
            "queue_match": "^rmq_team_a_{{ dag_run.conf['generation'] }}_.*$",
            "rabbitmq_conn_id": RMQ_CONN,
            "aws_conn_id": AWS_CONN,
            "resources_needed": {"cpus": 8, "ram": "32GiB", "gpus": 1, "gpuCount": "{{ params.gpus }}"},
            "limit_idle_duration": "2m",
            "runner_image": "registry.example.com/studio-runner:1.2.3",
            "namespace": "ml",
            "shm_size": "16Gi",
            "execution_mode": "kubernetes",
        }
        arguments.update(overrides)
        return StudioQueueRunnerOperator(**arguments)


def build_pod(op: StudioQueueRunnerOperator) -> dict[str, Any]:
    context = runtime_context(op)
    op.render_template_fields(context)
    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True))


def base_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    return container


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def assert_no_secret(op: StudioQueueRunnerOperator, pod: dict[str, Any]) -> None:
    serialised = json.dumps(pod)
    rendered = json.dumps({field: getattr(op, field) for field in op.template_fields}, default=repr)
    for secret in (AMQP_PASSWORD, MANAGEMENT_PASSWORD, FAKE_SECRET, FAKE_KEY_ID):
        assert secret not in serialised
        assert secret not in rendered


# --- the pod -------------------------------------------------------------------------------------


def test_a_two_gpu_runner_pod_is_valid_kubernetes_and_carries_no_secret(connections: None) -> None:
    op = queue_runner()
    pod = build_pod(op)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    assert_no_secret(op, pod)

    container = base_container(pod)
    assert container["image"] == "registry.example.com/studio-runner:1.2.3"
    assert not container.get("command"), "no command: the image's entrypoint (tini) stays PID 1"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"]["drop"] == ["ALL"] and not security["allowPrivilegeEscalation"]
    args = container["args"]
    assert args[:3] == ["serve", "--result-file", "/airflow/xcom/return.json"]
    assert option(args, "--queue-match") == "^rmq_team_a_12_.*$"
    assert option(args, "--limit-idle-duration") == "120"
    assert option(args, "--limit-tasks") == "0"
    assert option(args, "--max-attempts") == "3"
    # the broker without its password; the management API without the credentials in its URL
    assert option(args, "--amqp-url") == "amqp://studio-runner@rabbitmq.studio.svc:5672/experiments"
    assert option(args, "--amqp-mgt-url") == "http://rabbitmq-mgmt.studio.svc:15672"
    assert "--sqs-endpoint" not in args
    # the runner promises experiments what the pod was given, and uses its GPUs
    assert option(args, "--max-cores") == "8"
    assert option(args, "--max-mem") == str(32 * 1024**3)
    assert "--cpu-only" not in args
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": "2"},
        "requests": {"cpu": "8", "memory": "32Gi"},
    }
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert spec["terminationGracePeriodSeconds"] == 120  # room to give unfinished work back
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert (
        mounts["/dev/shm"] == "dshm" and mounts["/work"] == "studio-work" and mounts["/tmp"] == "studio-tmp"
    )
    assert mounts["/airflow/xcom"] == "xcom"
    assert pod["metadata"]["annotations"]["studioml/queue-match"] == "^rmq_team_a_12_.*$"

    env = {e["name"]: e for e in container["env"]}
    assert "value" not in env["AMQP_PASSWORD"]
    assert env["AMQP_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "studio-rabbitmq-credentials", "key": "password"}
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "studio-s3-credentials", "key": name}}
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"


def test_an_sqs_cpu_runner_gets_the_sqs_endpoint_and_no_broker(connections: None) -> None:
    op = queue_runner(
        queue_match=exactly("sqs_team_b.cpu"),
        queue_backends=["sqs"],
        resources_needed={"cpus": 2, "ram": "4g"},
        limit_idle_duration=90,
        limit_tasks="{{ params.gpus * 5 }}",
        aws_credentials_secret="team-b-aws",
        aws_credentials_secret_keys={"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"},
    )
    pod = build_pod(op)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    assert_no_secret(op, pod)
    container = base_container(pod)
    args = container["args"]
    assert option(args, "--queue-match") == r"^sqs_team_b\.cpu$"
    assert option(args, "--sqs-endpoint") == "http://sqs.studio.svc:9324"
    assert option(args, "--sqs-region") == "eu-west-1"
    assert option(args, "--limit-idle-duration") == "90"
    assert option(args, "--limit-tasks") == "10"
    assert "--amqp-url" not in args and "--cpu-only" in args
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "4G"}}
    assert not pod["spec"].get("nodeSelector") and not pod["spec"].get("tolerations")
    env = {e["name"]: e for e in container["env"]}
    assert "AMQP_PASSWORD" not in env
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-b-aws",
        "key": "secret",
    }


def test_explicit_pod_arguments_win_and_the_broker_password_still_comes_from_a_secret(
    connections: None,
) -> None:
    shared = [Secret("env", "AWS_ACCESS_KEY_ID", "team-aws", "id")]  # e.g. one list for many tasks
    op = queue_runner(
        node_selector={"pool": "h100"},
        arguments=["serve", "--queue-match", "^rmq_x$", "--limit-idle-duration", "60"],
        secrets=shared,
        rabbitmq_password_secret="broker",
        rabbitmq_password_secret_key="amqp-password",
    )
    pod = build_pod(op)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    assert base_container(pod)["args"] == ["serve", "--queue-match", "^rmq_x$", "--limit-idle-duration", "60"]
    assert pod["spec"]["nodeSelector"] == {"pool": "h100"}
    env = {e["name"]: e for e in base_container(pod)["env"]}
    assert env["AMQP_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "broker", "key": "amqp-password"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "team-aws", "key": "id"}
    assert len(shared) == 1  # the caller's list is left as it was


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"limit_idle_duration": 0}, "would never exit"),
        ({"queue_match": "^rmq_(unclosed$"}, "not a regular expression"),
        ({"queue_match": ""}, "queue_match is empty"),
        ({"limit_idle_duration": "soon"}, "limit_idle_duration"),
        ({"max_attempts": 0}, "max_attempts must be 1 or more"),
        ({"resources_needed": {"gpus": "many"}}, "resources_needed"),
    ],
)
def test_bad_settings_fail_the_task_without_retries(
    connections: None, overrides: dict[str, Any], complaint: str
) -> None:
    op = queue_runner(**overrides)
    context = runtime_context(op)
    op.render_template_fields(context)
    with pytest.raises(AirflowFailException, match=complaint):
        op.execute(context)


def test_unknown_backends_are_refused_when_the_dag_is_parsed() -> None:
    with pytest.raises(ValueError, match="queue_backends"):
        StudioQueueRunnerOperator(task_id="drain", queue_match="^rmq_a$", queue_backends=["kafka"])


def test_runners_map_over_a_computed_list() -> None:
    with DAG("capacity", schedule=None, start_date=pendulum.datetime(2026, 1, 1)) as dag:
        StudioQueueRunnerOperator.partial(task_id="drain", limit_idle_duration="5m").expand_kwargs(
            [
                {"queue_match": exactly("rmq_a")},
                {"queue_match": exactly("rmq_a"), "resources_needed": {"gpus": 1}},
            ]
        )
        StudioQueueRunnerOperator.partial(task_id="drain_b", queue_backends=["sqs"]).expand(
            queue_match=[exactly("sqs_b")] * 3
        )
    assert {"drain", "drain_b"} <= set(dag.task_dict)
    assert type(dag.task_dict["drain"]).__name__ == "MappedOperator"


def test_a_deferrable_runner_pod_waits_in_the_triggerer_and_returns_the_runner_summary(
    connections: None, monkeypatch: pytest.MonkeyPatch, pending_pods: list[k8s.V1Pod]
) -> None:
    monkeypatch.setattr(
        "airflow.providers.cncf.kubernetes.hooks.kubernetes.KubernetesHook._get_default_client",
        lambda *args, **kwargs: object(),
    )
    created = pending_pods
    op = queue_runner(deferrable=True)
    context = runtime_context(op)
    context["ti"] = RecordingTI("studio_queue_capacity", "drain")
    op.render_template_fields(context)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "trigger_reentry"
    assert type(deferred.value.trigger).__name__ == "KubernetesPodTrigger"
    assert created[0].spec.containers[0].args[0] == "serve"

    # the pod ended: KPO hands over what the runner wrote to the xcom file
    written = {"ended_by": "limit_idle", "handled": 2, "statuses": {"succeeded": 2}, "experiments": []}
    monkeypatch.setattr(KubernetesPodOperator, "trigger_reentry", lambda self, context, event: written)
    summary = op.trigger_reentry(context, {"status": "success", "name": "drain-x", "namespace": "ml"})
    assert summary == {"queue_match": "^rmq_team_a_12_.*$", **written}


# --- local mode: a real runner, stopped while it works ----------------------------------------------

SLEEPER = textwrap.dedent(
    """\
    import time
    print("long experiment starting", flush=True)
    time.sleep(600)
    """
)


def test_killing_a_local_runner_gives_its_experiment_back_to_the_queue(
    services,
    s3_client,
    studio_client,
    runner_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_STUDIO_RMQ_LOCAL", json.dumps(rabbitmq_connection(services)))
    monkeypatch.setenv("AIRFLOW_CONN_STUDIO_AWS_LOCAL", seaweed_conn_json(services))
    monkeypatch.setenv("AIRFLOW__STUDIO__LOCAL_CACHE_DIR", str(runner_cache))
    monkeypatch.setenv("AIRFLOW__STUDIO__LOCAL_WORKING_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("AMQP_URL", "amqp://stray:stray@127.0.0.1:1/%2f")  # a developer's own setting
    queue = unique_queue("rmq_qrkill")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "train.py").write_text(SLEEPER)
    key = f"sleeper_{queue}"
    studio_client.run(workspace, queue, "train.py", key=key)

    op = StudioQueueRunnerOperator(
        task_id="drain",
        queue_match=exactly(queue),
        rabbitmq_conn_id="studio_rmq_local",
        aws_conn_id="studio_aws_local",
        execution_mode="local",
        limit_idle_duration="5m",
        local_kill_grace_period=90,
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = op.execute({"ti": RecordingTI("capacity", "drain")})
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    consoles = tmp_path / "work" / "experiments"

    def workload_started() -> bool:
        assert worker.is_alive(), outcome
        return any("long experiment starting" in f.read_text() for f in consoles.glob("*/output/output"))

    wait_for(workload_started, 300, "the workload to start", interval=0.5)
    op.on_kill()
    worker.join(120)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["ended_by"] == "stopped" and summary["queue_match"] == exactly(queue)
    assert summary["statuses"] == {"interrupted": 1}
    assert [entry["key"] for entry in summary["experiments"]] == [key]
    # the experiment is back in its queue for the next runner, with what it had printed saved
    assert wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 1, 30, "the requeue")
    output = tar_members(s3_client, studio_client.bucket, f"experiments/{key}/output.tar")
    assert "long experiment starting" in output["./output"].decode()
