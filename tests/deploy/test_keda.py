"""KEDA scales the runner Deployment by queue depth: the ScaledObject and TriggerAuthentication under
deploy/ validate against a vendored minimal copy of KEDA's CRD schemas (tests/deploy/keda_crd_schemas.yaml,
hand-written from KEDA's documented fields, not KEDA's generated CRD), and they point at what deploy/
and the ENN DAG really hold: the Deployment, a Secret key the runner's Secret template has, a queue
the runners serve and the DAG's queue mode publishes to.
"""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import SECRETS_DIR, Document, find, of_kind, options_configmap, runner_deployment

SCHEMAS = yaml.safe_load((Path(__file__).parent / "keda_crd_schemas.yaml").read_text())
ENN_DAG = Path(__file__).resolve().parents[2] / "dags" / "enn_generation.py"


def keda_documents() -> list[Document]:
    return [*of_kind("ScaledObject"), *of_kind("TriggerAuthentication")]


def test_deploy_holds_a_scaled_object_with_its_authentication() -> None:
    assert [d.name for d in of_kind("ScaledObject")] == ["studio-runner"]
    assert [d.name for d in of_kind("TriggerAuthentication")] == ["studio-runner-rabbitmq"]


@pytest.mark.parametrize("document", keda_documents(), ids=str)
def test_keda_documents_match_the_crd_schema(document: Document) -> None:
    jsonschema.validate(document.body, SCHEMAS[document.kind])
    for trigger in document.body["spec"].get("triggers", []):
        assert trigger["type"] == "rabbitmq"
        jsonschema.validate(trigger["metadata"], SCHEMAS["RabbitMQTriggerMetadata"])


def test_the_schema_check_catches_what_keda_refuses() -> None:
    scaled = find("ScaledObject", "studio-runner", "studio-runner").body
    wrong = {**scaled, "spec": {**scaled["spec"], "maxReplicas": 3}}  # HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(wrong, SCHEMAS["ScaledObject"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"queueName": "q", "value": 2}, SCHEMAS["RabbitMQTriggerMetadata"])


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
