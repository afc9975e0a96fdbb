"""KEDA scales the runner Deployment by queue depth: every KEDA object under deploy/ validates against
KEDA's own published CRDs (tests/deploy/crds/keda/, vendored unchanged, see the README there), and
they point at what deploy/ and the ENN DAG really hold: the Deployment, a Secret key the runner's
Secret template has, a queue the runners serve and the DAG's queue mode publishes to.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import (
    SECRETS_DIR,
    Document,
    documents,
    find,
    of_kind,
    options_configmap,
    runner_deployment,
)

CRD_DIR = Path(__file__).parent / "crds" / "keda"
ENN_DAG = Path(__file__).resolve().parents[2] / "dags" / "enn_generation.py"
Schema = dict[str, Any]


def strict(schema: Schema) -> Schema:
    """The schema with unknown fields refused, as the API server refuses them for ``kubectl apply``
    (strict field validation, kubectl's default): a structural CRD schema lists each object's fields
    but leaves unknown ones to the server instead of saying ``additionalProperties: false``."""
    closed = dict(schema)
    if "properties" in schema:
        closed["properties"] = {name: strict(field) for name, field in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            closed["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            closed[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            closed[key] = [strict(branch) for branch in schema[key]]
    return closed


@cache
def crd_schemas() -> dict[tuple[str, str], Schema]:
    """``openAPIV3Schema`` of every served version of the vendored CRDs, by (apiVersion, kind)."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def schema_of(body: dict[str, Any]) -> Schema:
    key = (body["apiVersion"], body["kind"])
    assert key in crd_schemas(), f"no vendored KEDA CRD serves {key}: add it under {CRD_DIR}"
    return crd_schemas()[key]


def keda_documents() -> list[Document]:
    return [d for d in documents() if d.body["apiVersion"].split("/")[0] == "keda.sh"]


def test_the_vendored_crds_serve_keda_v1alpha1() -> None:
    assert {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")} <= set(
        crd_schemas()
    )


def test_deploy_holds_a_scaled_object_with_its_authentication() -> None:
    assert [d.name for d in of_kind("ScaledObject")] == ["studio-runner"]
    assert [d.name for d in of_kind("TriggerAuthentication")] == ["studio-runner-rabbitmq"]
    assert {d.kind for d in keda_documents()} == {"ScaledObject", "TriggerAuthentication"}


@pytest.mark.parametrize("document", keda_documents(), ids=str)
def test_keda_documents_match_the_crd_schema(document: Document) -> None:
    jsonschema.validate(document.body, schema_of(document.body))


def test_the_schema_check_catches_what_keda_refuses() -> None:
    scaled = find("ScaledObject", "studio-runner", "studio-runner").body
    schema = schema_of(scaled)
    misspelt = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 3}}  # HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(misspelt, schema)
    (trigger,) = scaled["spec"]["triggers"]
    unquoted = {
        **scaled,
        "spec": {
            **scaled["spec"],
            "triggers": [{**trigger, "metadata": {**trigger["metadata"], "value": 2}}],
        },
    }
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        jsonschema.validate(unquoted, schema)  # trigger metadata is a map of strings
    no_target = {**scaled, "spec": {k: v for k, v in scaled["spec"].items() if k != "scaleTargetRef"}}
    with pytest.raises(jsonschema.ValidationError, match="scaleTargetRef"):
        jsonschema.validate(no_target, schema)
    auth = find("TriggerAuthentication", "studio-runner-rabbitmq", "studio-runner").body
    (reference,) = auth["spec"]["secretTargetRef"]
    wrong_type = {**auth, "spec": {"secretTargetRef": reference}}  # a list in the CRD, not one object
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'array'"):
        jsonschema.validate(wrong_type, schema_of(auth))


def test_it_scales_the_runner_deployment_by_queue_length_with_the_runners_own_secret() -> None:
    scaled = find("ScaledObject", "studio-runner", "studio-runner")
    deployment = runner_deployment("studio-runner")
    target = scaled.body["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment.name)
    (trigger,) = scaled.body["spec"]["triggers"]
    assert trigger["metadata"]["mode"] == "QueueLength" and int(trigger["metadata"]["value"]) >= 1
    assert "host" not in trigger["metadata"], "the broker URL holds a password: it comes from the Secret"
    auth = find("TriggerAuthentication", trigger["authenticationRef"]["name"], scaled.namespace or "")
    (reference,) = auth.body["spec"]["secretTargetRef"]
    assert reference["parameter"] == "host"
    templates = [
        body
        for path in SECRETS_DIR.glob("*.yaml")
        for body in yaml.safe_load_all(path.read_text())
        if body and body.get("kind") == "Secret"
    ]
    secret = next(
        t
        for t in templates
        if t["metadata"]["name"] == reference["name"] and t["metadata"]["namespace"] == auth.namespace
    )
    assert reference["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}
    assert (
        scaled.body["spec"]["cooldownPeriod"]
        > deployment.body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_the_scaled_queue_is_served_by_the_runners_and_is_the_enn_queue_mode_queue() -> None:
    (trigger,) = find("ScaledObject", "studio-runner", "studio-runner").body["spec"]["triggers"]
    queue = trigger["metadata"]["queueName"]
    options = options_configmap(runner_deployment("studio-runner")).body["data"]
    assert re.search(options["QUEUE_MATCH"], queue) and not re.search(options["QUEUE_MISMATCH"], queue)
    source = ENN_DAG.read_text()
    campaign = re.search(r'"campaign": Param\(\s*"([a-z0-9-]+)"', source).group(1)
    template = re.search(r'QUEUE = "([^"]+)"', source).group(1)
    assert template.replace("{{ params.campaign }}", campaign) == queue
