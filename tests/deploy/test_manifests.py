"""The Kubernetes manifests under deploy/: valid for the API server, and as strict as we promise.

Schemas: ``kubernetes_validate`` in strict mode (unknown fields are errors), against the newest
Kubernetes it knows and an older release still common on managed clusters. Policy: the pod
security settings, probes, drain timing, networking and Secrets a platform review checks,
read where possible from the runner's own code (its options, grace period, state file format).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from studio_runner import cli
from studio_runner.drain import read_state
from studio_runner.service import RunnerState, Service
from studio_runner.units import parse_seconds, parse_size

from tests.deploy.manifests import (
    DEPLOY_DIR,
    PLACEHOLDER,
    SECRETS_DIR,
    Document,
    documents,
    find,
    manifest_files,
    namespaces,
    of_kind,
    options_configmap,
    quantity,
    runner_container,
    runner_deployment,
)

KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
RUNNER_UID = 10001
METRICS_PORT = 9090
STOP_MARGIN_SECONDS = 20
"""Beyond the runner's own worst case: closing broker connections, interpreter exit, tini."""
ENV_NOT_OPTIONS = frozenset({"AWS_DEFAULT_REGION", "UV_INDEX_URL", "PIP_INDEX_URL"})
"""Options-ConfigMap keys that are not runner options but are read from its environment
(boto3's region; the package index uv and pip install experiments' requirements from)."""
NAMESPACED = frozenset(
    {
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ResourceQuota",
        "ScaledObject",
        "TriggerAuthentication",
    }
)
CREDENTIAL_SHAPES = (
    re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@"),  # a URL with a password
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # an AWS access key id
    re.compile(r"aws_secret_access_key\s*=\s*(?!REPLACE_ME)\S+"),
)


def _doc_id(document: Document) -> str:
    return f"{document.path.relative_to(DEPLOY_DIR)}#{document.index}"


# --- schema -------------------------------------------------------------------------------------
def test_deploy_holds_manifests() -> None:
    assert len(manifest_files()) >= 10, "deploy/ should hold the runner manifests"
    assert set(namespaces()) >= {"studio-runner", "studio-team-b"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("document", [d for d in documents() if not d.custom], ids=_doc_id)
def test_every_document_is_valid_kubernetes(document: Document, version: str) -> None:
    try:
        kubernetes_validate.validate(document.body, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{document} is not a valid Kubernetes {version} object: {error}")


def test_every_namespaced_document_names_a_namespace_defined_here() -> None:
    defined = set(namespaces())
    for document in documents():
        if document.kind in NAMESPACED:
            assert document.namespace in defined, (
                f"{document}: namespace {document.namespace!r} not in deploy/"
            )
        else:
            assert document.kind == "Namespace", f"{document}: unexpected cluster-scoped {document.kind}"


def test_no_rbac_is_granted() -> None:
    """The runner reads drain state from a mounted file: it needs no Kubernetes API access."""
    granted = [
        d for d in documents() if d.kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
    ]
    assert granted == []


# --- the runner pods ----------------------------------------------------------------------------
@pytest.fixture(params=["studio-runner", "studio-team-b"])
def namespace(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def deployment(namespace: str) -> Document:
    return runner_deployment(namespace)


def _pod(deployment: Document) -> dict[str, Any]:
    return deployment.body["spec"]["template"]["spec"]


def test_pod_security(deployment: Document) -> None:
    pod = _pod(deployment)
    pod_context = pod["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert (pod_context["runAsUser"], pod_context["runAsGroup"], pod_context["fsGroup"]) == (RUNNER_UID,) * 3
    assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
    context = runner_container(deployment)["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == RUNNER_UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context.get("seccompProfile", pod_context["seccompProfile"]) == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork", False) is False and pod.get("hostPID", False) is False
    assert pod.get("hostIPC", False) is False
    assert not [v for v in pod["volumes"] if "hostPath" in v], "no hostPath volumes"


def test_service_account_has_no_token(deployment: Document) -> None:
    pod = _pod(deployment)
    assert pod["automountServiceAccountToken"] is False
    account = find("ServiceAccount", pod["serviceAccountName"], deployment.namespace or "")
    assert account.body["automountServiceAccountToken"] is False


def test_image_entrypoint_is_kept_and_the_image_is_pinned(deployment: Document) -> None:
    container = runner_container(deployment)
    assert "command" not in container, "a `command` would replace the image's tini ENTRYPOINT"
    assert container["args"][0] == "serve"
    image = container["image"]
    assert "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"))


def test_the_runner_accepts_the_pods_arguments_and_options(
    deployment: Document, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``studio-runner`` parses the container's args with its environment (ConfigMap + env)."""
    options = options_configmap(deployment).body["data"]
    serve = _serve_option_names()
    unknown = sorted(set(options) - serve - ENV_NOT_OPTIONS)
    assert not unknown, f"{options_configmap(deployment)}: not studio-runner serve options: {unknown}"
    for name in serve:
        monkeypatch.delenv(name, raising=False)
    for name, value in options.items():
        monkeypatch.setenv(name, value)
    for variable in runner_container(deployment)["env"]:
        monkeypatch.setenv(variable["name"], variable.get("value", "placeholder-from-a-secret"))
    try:
        args = cli.build_parser().parse_args(runner_container(deployment)["args"])
    except SystemExit as error:
        pytest.fail(f"studio-runner refuses the pod's arguments or options: {error.code}")
    assert args.command == "serve"
    assert args.state_file is not None
    assert args.prom_address.rsplit(":", 1)[1] == str(METRICS_PORT), "probes and Service use port 9090"


def _serve_option_names() -> set[str]:
    """Environment names of every ``studio-runner serve`` option, from the runner's own parser."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    serve = commands.choices["serve"]  # type: ignore[attr-defined]
    return {
        option.lstrip("-").upper().replace("-", "_")
        for action in serve._actions
        for option in action.option_strings
        if option.startswith("--") and not option.startswith("--no-") and option != "--help"
    }


def test_probes_use_the_metrics_port(deployment: Document) -> None:
    container = runner_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("metrics") == METRICS_PORT
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        check = container[probe]["httpGet"]
        port = ports.get(check["port"], check["port"])
        assert (check["path"], port) == (path, METRICS_PORT), f"{deployment}: {probe}"


def test_termination_grace_covers_the_runners_drain(deployment: Document) -> None:
    """SIGTERM: workload grace + final upload, then settle the message, then join queue workers."""
    grace = parse_seconds(options_configmap(deployment).body["data"].get("GRACE_PERIOD", "30"))
    settle = inspect.signature(Service).parameters["settle_timeout"].default
    runner_worst = grace + cli.FINAL_UPLOAD_SECONDS + 2 * settle
    period = _pod(deployment)["terminationGracePeriodSeconds"]
    assert period >= runner_worst + STOP_MARGIN_SECONDS, (
        f"{deployment}: terminationGracePeriodSeconds {period} < runner's worst case {runner_worst:.0f} s "
        f"+ {STOP_MARGIN_SECONDS} s margin"
    )


def test_gpu_resources_and_tolerations(deployment: Document) -> None:
    container = runner_container(deployment)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    tolerations = _pod(deployment)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_writable_paths_are_volumes(deployment: Document) -> None:
    """With a read-only root, /work (HOME, experiments, caches), /tmp and /dev/shm are volumes."""
    pod = _pod(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in runner_container(deployment)["volumeMounts"]}
    assert "emptyDir" in mounts["/work"] or "persistentVolumeClaim" in mounts["/work"]
    assert "emptyDir" in mounts["/tmp"]
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    env = {v["name"]: v.get("value") for v in runner_container(deployment)["env"]}
    for name in ("WORKING_DIR", "CACHE_DIR"):
        assert env[name].startswith("/work/"), f"{name} must be on the /work volume"


def test_option_folders_are_the_pods_secret_mounts(deployment: Document) -> None:
    options = options_configmap(deployment).body["data"]
    volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]
        for m in runner_container(deployment)["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    for name in ("ENCRYPT_DIR", "REQUEST_SIGNATURES_DIR", "RESPONSE_SIGNATURES_DIR", "SQS_CERTS"):
        if name in options:
            assert options[name] in secret_mounts, f"{name}={options[name]} is no Secret mount"
    env = {v["name"]: v.get("value") for v in runner_container(deployment)["env"]}
    aws = env["AWS_SHARED_CREDENTIALS_FILE"].rsplit("/", 1)
    assert aws[0] in secret_mounts and env["AWS_CONFIG_FILE"].rsplit("/", 1)[0] == aws[0]
    for mount in secret_mounts.values():
        assert mount.get("defaultMode") == 0o440, "Secret files: owner and fsGroup may read, nobody else"


def test_state_configmap_is_a_folder_mount_passed_as_state_file(deployment: Document, tmp_path: Path) -> None:
    container = runner_container(deployment)
    args = container["args"]
    state_path = args[args.index("--state-file") + 1]
    volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == state_path)
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    configmap = find("ConfigMap", volumes[mount["name"]]["configMap"]["name"], deployment.namespace or "")
    assert configmap.body["data"] == {"STATE": "Running"}
    for key, value in configmap.body["data"].items():  # as the kubelet projects it
        (tmp_path / key).write_text(value)
    assert read_state(tmp_path) is RunnerState.RUNNING


def test_experiment_resources_fit_the_pod(deployment: Document) -> None:
    """The runner offers the node's hardware unless told: MAX_* must match the pod's share."""
    options = options_configmap(deployment).body["data"]
    resources = runner_container(deployment)["resources"]
    volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
    shm = quantity(volumes["dshm"]["emptyDir"]["sizeLimit"])
    work = quantity(volumes["work"]["emptyDir"]["sizeLimit"])
    assert int(options["MAX_CORES"]) == quantity(resources["requests"]["cpu"])
    assert parse_size(options["MAX_MEM"]) + shm < quantity(resources["limits"]["memory"])
    assert parse_size(options["MAX_DISK"]) + parse_size(options["CACHE_SIZE"]) < work
    assert quantity(resources["limits"]["ephemeral-storage"]) >= work + quantity(
        volumes["tmp"]["emptyDir"]["sizeLimit"]
    )


def test_selectors_match_the_pods(deployment: Document) -> None:
    labels = deployment.body["spec"]["template"]["metadata"]["labels"]
    selected = deployment.body["spec"]["selector"]["matchLabels"]
    assert selected.items() <= labels.items()
    namespace = deployment.namespace or ""
    budgets = [d for d in of_kind("PodDisruptionBudget", namespace)]
    assert len(budgets) == 1 and budgets[0].body["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budgets[0].body["spec"]["maxUnavailable"] == 1
    for service in of_kind("Service", namespace):
        assert service.body["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service.body["spec"]["ports"]} == {"metrics"}


# --- networking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("namespace", ["studio-runner", "studio-team-b"])
def test_network_policies(namespace: str) -> None:
    policies = of_kind("NetworkPolicy", namespace)
    deny = [p for p in policies if p.body["spec"]["podSelector"] == {}]
    assert len(deny) == 1, f"{namespace}: one default-deny policy"
    assert set(deny[0].body["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny[0].body["spec"] and "egress" not in deny[0].body["spec"]
    labels = runner_deployment(namespace).body["spec"]["template"]["metadata"]["labels"]
    runner = [
        p
        for p in policies
        if p.body["spec"]["podSelector"]
        and p.body["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(runner) == 1, f"{namespace}: one policy for the runner pods"
    spec = runner[0].body["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = spec["ingress"]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert ingress["ports"] == [{"protocol": "TCP", "port": METRICS_PORT}]
    egress_ports = set()
    for rule in spec["egress"]:
        assert rule.get("to"), f"{runner[0]}: an egress rule without `to` allows every destination"
        assert rule.get("ports"), f"{runner[0]}: an egress rule without ports allows every port"
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0")
        egress_ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 5672)} <= egress_ports


# --- tenants ------------------------------------------------------------------------------------
def test_queues_are_split_between_the_shared_runner_and_team_b() -> None:
    def takes(namespace: str, queue: str) -> bool:
        options = options_configmap(runner_deployment(namespace)).body["data"]
        mismatch = options.get("QUEUE_MISMATCH")
        return bool(re.search(options["QUEUE_MATCH"], queue)) and not (
            mismatch and re.search(mismatch, queue)
        )

    assert takes("studio-team-b", "rmq_team_b_genomes")
    assert not takes("studio-runner", "rmq_team_b_genomes")
    assert takes("studio-runner", "rmq_enn_generation")
    assert not takes("studio-team-b", "rmq_enn_generation")
    assert (
        options_configmap(runner_deployment("studio-team-b")).body["data"]["QUEUE_MATCH"] == "^rmq_team_b_.*$"
    )


def test_each_namespace_has_its_own_identity() -> None:
    for namespace in ("studio-runner", "studio-team-b"):
        pod = _pod(runner_deployment(namespace))
        assert find("ServiceAccount", pod["serviceAccountName"], namespace)
        for name in _secret_names(runner_deployment(namespace)):
            template = find("Secret", name, namespace)
            assert template.path.parent == SECRETS_DIR


# --- secrets ------------------------------------------------------------------------------------
def _secret_names(deployment: Document) -> set[str]:
    pod = _pod(deployment)
    names = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    for variable in runner_container(deployment)["env"]:
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            names.add(reference["name"])
    return names


def test_every_secret_the_pods_use_has_a_template_with_their_keys(deployment: Document) -> None:
    pod = _pod(deployment)
    namespace = deployment.namespace or ""
    for volume in pod["volumes"]:
        if "secret" in volume:
            keys = set(find("Secret", volume["secret"]["secretName"], namespace).body["stringData"])
            assert {item["key"] for item in volume["secret"].get("items", [])} <= keys
    for variable in runner_container(deployment)["env"]:
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference and not reference.get("optional"):
            assert reference["key"] in find("Secret", reference["name"], namespace).body["stringData"]


def test_secrets_are_placeholders_kept_apart() -> None:
    for secret in of_kind("Secret"):
        assert secret.path.parent == SECRETS_DIR, (
            f"{secret}: Secrets live in deploy/secrets/ (never applied as is)"
        )
        assert secret.path.name.endswith(".example.yaml")
        assert "data" not in secret.body, f"{secret}: base64 `data` hides what is committed; use stringData"
        for key, value in secret.body["stringData"].items():
            assert PLACEHOLDER in value, f"{secret}: {key} is not a {PLACEHOLDER} placeholder"


def test_no_credentials_anywhere_under_deploy() -> None:
    for path in manifest_files() + sorted(DEPLOY_DIR.rglob("*.md")):
        text = path.read_text()
        for shape in CREDENTIAL_SHAPES:
            for match in shape.finditer(text):
                assert PLACEHOLDER in match.group(0), (
                    f"{path.relative_to(DEPLOY_DIR)}: looks like a credential: {match.group(0)[:40]}..."
                )
    for configmap in of_kind("ConfigMap"):
        for key in configmap.body.get("data", {}):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|AMQP_URL|ACCESS_KEY", key), f"{configmap}: {key}"
