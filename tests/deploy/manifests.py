"""The Kubernetes documents under ``deploy/``, for the manifest and image tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
SECRETS_DIR = DEPLOY_DIR / "secrets"
PLACEHOLDER = "REPLACE_ME"
CUSTOM_GROUPS = frozenset({"keda.sh"})


@dataclass(frozen=True)
class Document:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def namespace(self) -> str | None:
        return self.body["metadata"].get("namespace")

    @property
    def custom(self) -> bool:
        """A custom resource (KEDA's): Kubernetes' own schemas do not know it; tests/deploy/test_keda.py checks it."""
        return self.body["apiVersion"].split("/")[0] in CUSTOM_GROUPS

    def __str__(self) -> str:
        return f"{self.path.relative_to(DEPLOY_DIR)}#{self.index} ({self.kind} {self.name})"


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


@cache
def documents() -> tuple[Document, ...]:
    found = []
    for path in manifest_files():
        for index, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is not None:
                found.append(Document(path, index, body))
    return tuple(found)


def of_kind(kind: str, namespace: str | None = None) -> list[Document]:
    return [d for d in documents() if d.kind == kind and (namespace is None or d.namespace == namespace)]


def find(kind: str, name: str, namespace: str) -> Document:
    matches = [d for d in of_kind(kind, namespace) if d.name == name]
    assert len(matches) == 1, f"expected one {kind} {namespace}/{name} under deploy/, found {len(matches)}"
    return matches[0]


def namespaces() -> list[str]:
    return [d.name for d in of_kind("Namespace")]


def runner_deployment(namespace: str) -> Document:
    deployments = of_kind("Deployment", namespace)
    assert len(deployments) == 1, f"expected one runner Deployment in {namespace}, found {len(deployments)}"
    return deployments[0]


def runner_container(deployment: Document) -> dict[str, Any]:
    containers = deployment.body["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment}: the runner pod has one container"
    return containers[0]


def options_configmap(deployment: Document) -> Document:
    """The ConfigMap the runner container takes its options from (its one envFrom)."""
    sources = runner_container(deployment).get("envFrom") or []
    names = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
    assert len(names) == 1, f"{deployment}: one envFrom configMapRef expected, found {names}"
    return find("ConfigMap", names[0], deployment.namespace or "")


_QUANTITY = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|m)?$")
_FACTORS = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (``8``, ``500m``, ``64Gi``) as a plain number."""
    match = _QUANTITY.match(str(value))
    assert match, f"{value!r} is not a Kubernetes quantity this test understands"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def secret_references(pod_spec: dict[str, Any]) -> dict[str, set[str]]:
    """Secret name → the keys a pod spec (as a dict) needs in it: ``secretKeyRef`` variables,
    ``envFrom`` and Secret volumes (a whole-Secret reference names no key), init containers too."""
    found: dict[str, set[str]] = {}
    containers = [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]
    for container in containers:
        for variable in container.get("env") or []:
            reference = (variable.get("valueFrom") or {}).get("secretKeyRef")
            if reference:
                keys = found.setdefault(reference["name"], set())
                if not reference.get("optional"):  # an optional key may be left out of the Secret
                    keys.add(reference["key"])
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                found.setdefault(source["secretRef"]["name"], set())
    for volume in pod_spec.get("volumes") or []:
        secret = volume.get("secret")
        if secret:
            keys = found.setdefault(secret["secretName"], set())
            keys.update(item["key"] for item in secret.get("items") or [])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                keys = found.setdefault(source["secret"]["name"], set())
                keys.update(item["key"] for item in source["secret"].get("items") or [])
    return found
