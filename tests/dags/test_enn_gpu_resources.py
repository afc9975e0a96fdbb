"""``gpus_per_experiment`` ("GPU cards") reaches every link as a card count: the ENN DAG's
rendered StudioML request asks for that many cards (``gpuCount``; ``gpus`` is slots per card),
and the runner pod KubernetesPodOperator would create asks Kubernetes for as many ``nvidia.com/gpu``.

The train task is the DAG file's own (parsed by a DagBag), unmapped and rendered with the Task
SDK's context; ``prepare_request`` stages its workspace in the session's SeaweedFS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from kubernetes.client import ApiClient
from studio_runner.request import decode_request

from tests.task_context import runtime_context

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "enn_generation.py"


@pytest.fixture(scope="module")
def enn_dag():
    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["enn_generation"]


@pytest.fixture
def seaweed_default(services, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG's ``aws_default`` connection, pointed at the session's SeaweedFS."""
    aws = {
        "conn_type": "aws",
        "login": services.s3_access_key,
        "password": services.s3_secret_key,
        "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
    }
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(aws))


def rendered_train(enn_dag, bucket: str, cards: int):
    """The first genome's train task, rendered for a run with ``gpus_per_experiment=cards``:
    its StudioML request and the pod it would start."""
    train = enn_dag.get_task("train")
    op = train.unmap(
        {
            "experiment_key": f"gpu{cards}-gen000-g000",
            "args": ["--genome", "{}", "--epochs", "1", "--seed", "0"],
            "pythonenv": ["numpy"],
        }
    )
    op.execution_mode = "kubernetes"
    context = runtime_context(
        op, conf={"campaign": "gpu", "bucket": bucket, "gpus_per_experiment": cards}, map_index=0
    )
    op.render_template_fields(context)
    request = op.prepare_request(context)
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True))
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return request, decode_request(env["REQUEST_JSON"]), container, pod["spec"]


def test_two_gpu_cards_per_experiment_give_two_cards_in_the_request_and_the_pod(
    enn_dag, seaweed_default, bucket
) -> None:
    request, in_pod, container, spec = rendered_train(enn_dag, bucket, cards=2)

    for wanted in (request.experiment.resources_needed, in_pod.experiment.resources_needed):
        assert wanted.gpu_count == 2, "gpuCount carries the cards"
        assert wanted.gpus == 1, "gpus is slots per card: any card will do"
        assert wanted.cards == 2
    wire = json.loads(in_pod.model_dump_json(by_alias=True))["experiment"]["resources_needed"]
    assert (wire["gpuCount"], wire["gpus"]) == (2, 1)

    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_no_gpu_cards_means_no_gpu_anywhere(enn_dag, seaweed_default, bucket) -> None:
    request, in_pod, container, spec = rendered_train(enn_dag, bucket, cards=0)

    for wanted in (request.experiment.resources_needed, in_pod.experiment.resources_needed):
        assert (wanted.gpu_count, wanted.gpus, wanted.cards) == (0, 0, 0)
    assert "nvidia.com/gpu" not in (container.get("resources") or {}).get("limits", {})
    assert not spec.get("nodeSelector") and not spec.get("tolerations")
