"""Every Secret a pod we ship or start references has a template in deploy/secrets/.

A missing Secret shows up only on the cluster, as a pod stuck in CreateContainerConfigError (or
a runner refusing sealed requests when an optional key Secret is absent). The references are
found, not listed: in the manifests' pod specs, and in the pods the operators build with their
default Secret names (each ``*_secret`` parameter of every runner operator). Each template must
exist in the namespace the pod runs in, hold the keys the pod reads, and be a valid Kubernetes
Secret (the OpenAPI schema, strict).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient

from airflow_provider_studio.get_provider_info import get_provider_info
from airflow_provider_studio.operators.experiment import StudioExperimentOperator
from airflow_provider_studio.operators.queue_runner import StudioQueueRunnerOperator
from airflow_provider_studio.operators.runner_pod import StudioRunnerPodOperator
from tests.deploy.manifests import (
    SECRETS_DIR,
    Document,
    documents,
    of_kind,
    secret_references,
)
from tests.provider.connections import set_connection

OPERATOR_NAMESPACE = "studio-experiments"
"""Where deploy/ puts the operators' pods (deploy/studio-experiments/, deploy/README.md)."""
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
IMAGE = "registry.example.com/studio/studio-runner:0.1.0"


def runner_operator_classes() -> list[type[StudioRunnerPodOperator]]:
    """Every runner operator the provider declares (its operator modules, imported)."""
    found: dict[str, type[StudioRunnerPodOperator]] = {}
    for entry in get_provider_info()["operators"]:
        for module_name in entry["python-modules"]:
            module = importlib.import_module(module_name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, StudioRunnerPodOperator) and cls is not StudioRunnerPodOperator:
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[name] for name in sorted(found)]


def default_secret_names(cls: type) -> set[str]:
    """The default of every ``*_secret`` parameter of ``cls`` and its bases."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        for parameter in inspect.signature(klass.__init__).parameters.values():
            if parameter.name.endswith("_secret") and isinstance(parameter.default, str):
                names.add(parameter.default)
    return names


@pytest.fixture
def operator_pods(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """Each runner operator's pod spec with its default Secrets, every optional part switched on
    (sealed requests; RabbitMQ and SQS queues), built as KPO would build it (a dry run)."""
    set_connection(
        monkeypatch,
        "studio_rabbitmq_default",
        {"conn_type": "studio_rabbitmq", "host": "rabbitmq.example.com", "login": "runner"},
    )
    set_connection(monkeypatch, "aws_default", {"conn_type": "aws", "extra": {"region_name": "eu-west-1"}})
    operators: dict[str, StudioRunnerPodOperator] = {
        "StudioExperimentOperator": StudioExperimentOperator(
            task_id="train",
            script="train.py",
            execution_mode="kubernetes",
            runner_image=IMAGE,
            message_keys_conn_id="studio_message_keys_default",
        ),
        "StudioQueueRunnerOperator": StudioQueueRunnerOperator(
            task_id="drain",
            queue_match="^rmq_a_.*$",
            queue_backends=("rmq", "sqs"),
            execution_mode="kubernetes",
            runner_image=IMAGE,
        ),
    }
    assert sorted(operators) == sorted(cls.__name__ for cls in runner_operator_classes()), (
        "a new runner operator: build its pod here too"
    )
    return {
        name: ApiClient().sanitize_for_serialization(op.build_pod_request_obj(None, dry_run=True))["spec"]
        for name, op in operators.items()
    }


def _template(name: str, namespace: str) -> Document:
    matches = [d for d in of_kind("Secret", namespace) if d.name == name]
    assert matches, (
        f"Secret {namespace}/{name} is referenced but has no template in deploy/secrets/: add one "
        "(stringData with REPLACE_ME placeholders)"
    )
    assert len(matches) == 1, f"{len(matches)} templates for Secret {namespace}/{name}"
    template = matches[0]
    assert template.path.parent == SECRETS_DIR, f"{template}: Secret templates live in deploy/secrets/"
    return template


def _check(name: str, namespace: str, keys: set[str], where: str) -> None:
    template = _template(name, namespace)
    missing = keys - set(template.body.get("stringData") or {})
    assert not missing, f"{where} reads keys {sorted(missing)} of Secret {name}, which {template} lacks"
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(template.body, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{template} is not a valid Kubernetes {version} Secret: {error}")


def test_every_operator_pods_secret_has_a_template(operator_pods: dict[str, dict[str, Any]]) -> None:
    referenced: set[str] = set()
    for operator, pod in operator_pods.items():
        for name, keys in secret_references(pod).items():
            referenced.add(name)
            _check(name, OPERATOR_NAMESPACE, keys, f"{operator}'s pod")
    defaults = set().union(*(default_secret_names(cls) for cls in runner_operator_classes()))
    assert {"studio-s3-credentials", "studio-rabbitmq-credentials"} <= defaults
    assert defaults <= referenced, f"default Secrets no pod here referenced: {sorted(defaults - referenced)}"


def _pod_specs() -> list[tuple[Document, dict[str, Any]]]:
    specs = []
    for document in documents():
        spec = document.body.get("spec") or {}
        pod = (spec.get("jobTemplate", {}).get("spec", spec).get("template") or {}).get("spec")
        if document.kind == "Pod":
            pod = spec
        if pod:
            specs.append((document, pod))
    return specs


def test_every_manifests_secret_has_a_template() -> None:
    specs = _pod_specs()
    assert {d.namespace for d, _ in specs} >= {"studio-runner", "studio-team-b"}
    for document, pod in specs:
        for name, keys in secret_references(pod).items():
            _check(name, document.namespace or "default", keys, str(document))


def test_secret_references_are_found_everywhere_a_pod_names_them() -> None:
    pod = {
        "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "from-env"}}]}],
        "containers": [
            {
                "name": "c",
                "env": [
                    {"name": "A", "valueFrom": {"secretKeyRef": {"name": "by-key", "key": "k"}}},
                    {
                        "name": "B",
                        "valueFrom": {"secretKeyRef": {"name": "by-key", "key": "o", "optional": True}},
                    },
                ],
            }
        ],
        "volumes": [
            {"name": "v", "secret": {"secretName": "volume", "items": [{"key": "x", "path": "x"}]}},
            {"name": "p", "projected": {"sources": [{"secret": {"name": "projected"}}]}},
        ],
    }
    assert secret_references(pod) == {
        "from-env": set(),
        "by-key": {"k"},
        "volume": {"x"},
        "projected": set(),
    }
