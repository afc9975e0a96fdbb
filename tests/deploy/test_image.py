"""The runner image, built with podman, running the pods we ship: the operator's and deploy/'s.

The image is built on the local Debian base (``devtools.image``: debootstrapped once, then kept
in ``/var/cache/studio-runner-image`` and podman's storage), so only the first session on a
machine pays for the base; unchanged layers come from podman's cache.

Pod specs become podman containers here (``PodContainer``): command and args, env and envFrom
(Secret references resolved to the test's values), emptyDir/ConfigMap/Secret volumes laid out as
the kubelet lays them out, and the securityContext (user, read-only root, capabilities,
no-new-privileges). Two pods run, in both images (the default and ``--python 3.10``):

* ``StudioExperimentOperator``'s own pod (``build_pod_request_obj(dry_run=True)``), one experiment
  with exactly its command, arguments, environment and securityContext (a read-only root, UID
  10001, emptyDirs on /work and /tmp), and tini as PID 1. Its summary, read from the xcom volume
  as KPO's sidecar reads it, is what the operator's ``execute`` returns to XCom.
* ``deploy/studio-runner``'s Deployment as written, serving a RabbitMQ queue, with the few
  overrides this host forces (listed in ``HOST_OVERRIDES``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from studio_runner.envelope import seal

from devtools import image, pythons
from tests.broker import publish_like_client, unique_queue
from tests.deploy.manifests import find, quantity, runner_container, runner_deployment
from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar
from tests.runner.results import final_document, tar_members

RUNNER_UID = 10001
CONN_ID = "studio_image_s3"
RESULTS_TIMEOUT = 240

TRAIN = """\
import json, os, sys
print("arguments:", sys.argv[1:])
with open("/proc/1/cmdline", "rb") as cmdline:
    pid1 = [os.path.basename(part.decode()) for part in cmdline.read().split(b"\\0") if part]
seen = {
    "uid": os.getuid(),
    "gid": os.getgid(),
    "pid1": pid1,
    "root_read_only": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
}
print(json.dumps({"experiment": {"container": seen}}))
for epoch in range(3):
    print(json.dumps({"experiment": {"epoch": epoch, "fitness": 0.25 * (epoch + 1)}}))
os.makedirs("../modeldir", exist_ok=True)
with open("../modeldir/weights.txt", "w") as out:
    out.write("trained")
"""


@pytest.fixture(scope="session", params=[None, pythons.OLDEST], ids=["default", f"python{pythons.OLDEST}"])
def runner_image(request: pytest.FixtureRequest) -> str:
    """The image ID, built on the default base (Debian trixie) and on the oldest supported Python
    (``--python 3.10``: bookworm + a 3.10.13 tree, the CUDA images' Python); bases come from the
    machine-wide cache, unchanged layers from podman's."""
    try:
        return image.build_image(python=request.param)
    except image.ImageBuildError as error:
        pytest.fail(str(error))


def _inspect(image_id: str) -> dict[str, Any]:
    result = subprocess.run(
        image.podman("image", "inspect", image_id), capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)[0]


def test_image_metadata(runner_image: str) -> None:
    config = _inspect(runner_image)["Config"]
    assert config["User"] == f"{RUNNER_UID}:{RUNNER_UID}"
    assert config["Entrypoint"] == ["tini", "--", "studio-runner"]
    assert config["Cmd"] == ["serve"]
    assert "9090/tcp" in config["ExposedPorts"]
    assert "/work" in config["Volumes"]
    env = dict(item.split("=", 1) for item in config["Env"])
    for name in ("HOME", "WORKING_DIR", "CACHE_DIR", "XDG_CACHE_HOME"):
        assert env[name].startswith("/work"), f"{name} must be on the /work volume"
    assert not [name for name in env if any(word in name for word in ("SECRET", "PASSWORD", "TOKEN", "KEY"))]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == image.runner_version()
    assert labels["org.opencontainers.image.source"] == image.SOURCE_URL
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


# --- the operator's pod -------------------------------------------------------------------------
@dataclass
class OperatorRun:
    """One experiment run in the image from the operator's pod, and what it left behind."""

    key: str
    bucket: str
    returncode: int
    log_tail: str
    summary: dict[str, Any] | None
    document: dict[str, Any] | None
    operator: Any
    """The StudioExperimentOperator whose pod ran."""
    pod: dict[str, Any]
    scratch: Path
    """Where the pod's volumes live on this machine (the xcom emptyDir among them)."""
    connection: dict[str, Any]


@pytest.fixture(scope="module")
def operator_run(
    runner_image: str, services, s3_client, tmp_path_factory: pytest.TempPathFactory
) -> OperatorRun:
    """``StudioExperimentOperator``'s pod, run once in the image against the session's servers."""
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=bucket)
    return run_operator_pod(
        runner_image, services, s3_client, tmp_path_factory.mktemp("operator-pod"), bucket
    )


def run_operator_pod(runner_image: str, services, s3_client, scratch: Path, bucket: str) -> OperatorRun:
    """One fresh pod of ``StudioExperimentOperator`` (new key, empty volumes) run to its end."""
    from kubernetes.client import ApiClient

    from airflow_provider_studio.operators.experiment import StudioExperimentOperator
    from airflow_provider_studio.operators.runner_pod import DEFAULT_CREDENTIALS_SECRET, XCOM_RESULT_FILE

    workspace = scratch / "workspace"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN)
    key = f"image_{uuid.uuid4().hex[:12]}"
    connection = {
        "conn_type": "aws",
        "login": services.s3_access_key,
        "password": services.s3_secret_key,
        "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(connection))
        operator = StudioExperimentOperator(
            task_id="image_experiment",
            script="train.py",
            args=["arg1", "--flag=2"],
            workspace=str(workspace),
            experiment_key=key,
            results_bucket=bucket,
            aws_conn_id=CONN_ID,
            resources_needed={"cpus": 1, "ram": "1g", "hdd": "1g", "gpus": 0},
            max_duration="10m",
            runner_image=f"{image.IMAGE_NAME}:{image.runner_version()}",
        )
        operator.prepare_request({})
        pod = ApiClient().sanitize_for_serialization(operator.build_pod_request_obj(dry_run=True))
    secrets = {
        DEFAULT_CREDENTIALS_SECRET: {
            "AWS_ACCESS_KEY_ID": services.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": services.s3_secret_key,
        }
    }
    container = PodContainer(pod["spec"], "base", scratch, secrets=secrets)
    name = f"studio-operator-test-{uuid.uuid4().hex[:8]}"
    # the pod spec itself asks for a read-only root, UID 10001 and emptyDirs on /work and /tmp
    argv, env = container.podman_run(runner_image, extra=("--name", name))
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(image.podman("rm", "--force", "--time", "5", name), capture_output=True)
    tail = (result.stdout + result.stderr)[-6000:]
    result_file = container.volume_file(XCOM_RESULT_FILE)
    summary = json.loads(result_file.read_text()) if result_file.exists() else None
    return OperatorRun(
        key,
        bucket,
        result.returncode,
        tail,
        summary,
        final_document(s3_client, bucket, key),
        operator,
        pod,
        scratch,
        connection,
    )


def test_the_operator_pod_runs_an_experiment(operator_run: OperatorRun, s3_client) -> None:
    run = operator_run
    assert run.returncode == 0, f"the runner's pod failed (exit {run.returncode}):\n{run.log_tail}"
    summary = run.summary
    assert summary is not None, f"no result file in /airflow/xcom:\n{run.log_tail}"
    assert (summary["key"], summary["status"], summary["results_saved"]) == (run.key, "succeeded", True), (
        summary
    )
    document = run.document
    assert document is not None, f"no scrape document for {run.key} in {run.bucket}"
    assert document["studioml"]["status"] == "succeeded"
    _, _, location = summary["scrape_uri"].partition("://")
    _host, scrape_bucket, scrape_key = location.split("/", 2)
    assert scrape_bucket == run.bucket and scrape_key.startswith("metadata/scrape-host-"), summary[
        "scrape_uri"
    ]
    scraped = json.loads(s3_client.get_object(Bucket=scrape_bucket, Key=scrape_key)["Body"].read())
    assert scraped == document
    _check_core_results(s3_client, run.bucket, run.key, document)


def test_a_second_operator_pod_restores_the_first_pods_environment_in_the_image(
    operator_run: OperatorRun, runner_image: str, services, s3_client, tmp_path: Path
) -> None:
    """The environment cache on by default: the next fresh pod unpacks the pack the first stored
    (with the image's GNU tar, unprivileged, on a read-only root) instead of installing."""
    second = run_operator_pod(runner_image, services, s3_client, tmp_path, operator_run.bucket)
    assert second.returncode == 0, f"the second pod failed (exit {second.returncode}):\n{second.log_tail}"
    assert "restored from cache" in second.log_tail, second.log_tail
    assert second.summary is not None and second.summary["status"] == "succeeded", second.summary
    _check_core_results(s3_client, second.bucket, second.key, second.document or {})
    gnu_tar = subprocess.run(
        image.podman("run", "--rm", *image.RUN_LIMITS, "--entrypoint", "tar", runner_image, "--version"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "GNU tar" in gnu_tar.stdout, f"the image's tar is not GNU tar:\n{gnu_tar.stdout}{gnu_tar.stderr}"


def test_the_operator_pods_experiment_runs_unprivileged_on_a_read_only_root(
    operator_run: OperatorRun,
) -> None:
    seen = _seen(operator_run.document, operator_run.log_tail)
    assert (seen["uid"], seen["gid"]) == (RUNNER_UID, RUNNER_UID)
    assert seen["root_read_only"] is True


def test_tini_is_pid_1_in_the_operator_pod(operator_run: OperatorRun) -> None:
    """tini forwards SIGTERM to the runner and reaps orphans; a pod `command` would replace it."""
    pid1 = _seen(operator_run.document, operator_run.log_tail)["pid1"]
    assert pid1[:3] == ["tini", "--", "studio-runner"], (
        f"PID 1 in the operator's pod runs {pid1}, not tini: the pod's `command` replaces the image's "
        "ENTRYPOINT (tini -- studio-runner). The operator must leave `cmds` unset (or start them "
        "with 'tini', '--')."
    )


def test_the_operator_returns_the_summary_kpos_xcom_sidecar_reads(
    operator_run: OperatorRun, runner_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod contract KPO relies on: the runner's summary in ``/airflow/xcom/return.json`` of the
    pod's xcom volume, read by the sidecar as ``PodManager.extract_xcom_json`` does (a shell in the
    ``airflow-xcom-sidecar`` container, ``cat`` of the file), then KPO's ``extract_xcom`` (json)
    and the operator's own ``execute``, whose return value is the task's XCom."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.utils.pod_manager import EMPTY_XCOM_RESULT
    from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults

    run = operator_run
    assert run.returncode == 0, f"the runner's pod failed (exit {run.returncode}):\n{run.log_tail}"
    spec = run.pod["spec"]
    sidecar = next(c for c in spec["containers"] if c["name"] == PodDefaults.SIDECAR_CONTAINER_NAME)
    base = next(c for c in spec["containers"] if c["name"] == "base")
    xcom_volume = {m["name"] for m in base["volumeMounts"] if m["mountPath"] == PodDefaults.XCOM_MOUNT_PATH}
    assert xcom_volume == {m["name"] for m in sidecar["volumeMounts"]}, (
        "the runner writes where the sidecar reads"
    )
    command = (  # as PodManager.extract_xcom_json execs it in the sidecar
        f"if [ -s {PodDefaults.XCOM_MOUNT_PATH}/return.json ]; "
        f"then cat {PodDefaults.XCOM_MOUNT_PATH}/return.json; "
        f"else echo {EMPTY_XCOM_RESULT}; fi"
    )
    reader = {**sidecar, "command": ["/bin/sh", "-c", command]}  # the sidecar's image (alpine) is not here
    container = PodContainer({**spec, "containers": [reader]}, reader["name"], run.scratch)
    argv, env = container.podman_run(runner_image)
    read = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    assert read.stdout.rstrip() != EMPTY_XCOM_RESULT, "the runner left no /airflow/xcom/return.json"

    class SidecarRead:
        """The pod manager's part of KPO's xcom read: what the exec into the sidecar printed."""

        def extract_xcom(self, pod: Any, **kwargs: Any) -> str:
            return read.stdout

    operator = run.operator
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(run.connection))
    monkeypatch.setitem(operator.__dict__, "pod_manager", SidecarRead())
    # KPO's cluster part (create, wait, clean up) happened above under podman; what it hands back
    # is its own extract_xcom of the finished pod
    monkeypatch.setattr(
        KubernetesPodOperator, "execute_sync", lambda self, context: self.extract_xcom(pod=None)
    )
    returned = operator.execute({})
    assert returned == json.loads(read.stdout) == run.summary
    assert (returned["key"], returned["status"], returned["results_saved"]) == (run.key, "succeeded", True)
    assert set(returned["artifacts"]) >= {"output", "modeldir"}, returned


def _check_core_results(s3, bucket: str, key: str, document: dict[str, Any]) -> None:
    experiment = document["experiment"]
    assert (experiment["epoch"], experiment["fitness"]) == (2, 0.75)
    output = tar_members(s3, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    assert "arguments: ['arg1', '--flag=2']" in output
    assert tar_members(s3, bucket, f"experiments/{key}/modeldir.tar") == {"./weights.txt": b"trained"}


def _seen(document: dict[str, Any] | None, log: str) -> dict[str, Any]:
    """What the workload saw of its container, from its scrape document."""
    assert document is not None, f"the experiment did not run:\n{log}"
    return document["experiment"]["container"]


# --- deploy/'s Deployment -----------------------------------------------------------------------
HOST_OVERRIDES = {
    # This machine is smaller than a GPU node; the runner refuses limits above the hardware.
    "MAX_CORES": "0",
    "MAX_MEM": "0",
    "MAX_DISK": "0",
}
"""Changes to the shipped Deployment that running it here forces (plus PROM_ADDRESS, below)."""


def test_the_deployment_serves_a_queue_in_the_image(
    runner_image: str, services, s3_client, bucket: str, tmp_path: Path
) -> None:
    """The shipped pod spec: probes answer, a signed and encrypted request runs, drain and SIGTERM work."""
    namespace = "studio-runner"
    deployment = runner_deployment(namespace)
    pod = deployment.body["spec"]["template"]["spec"]
    container_name = runner_container(deployment)["name"]
    keys = MessageKeyFiles.generate(signer_prefix="rmq_")
    s3_files = {
        "credentials": (
            f"[default]\naws_access_key_id = {services.s3_access_key}\n"
            f"aws_secret_access_key = {services.s3_secret_key}\n"
        ),
        "config": f"[default]\nregion = {services.region}\n",
    }
    secrets = {
        "studio-runner-amqp": {"AMQP_URL": services.amqp_url, "AMQP_MGT_URL": services.amqp_management_url},
        "studio-runner-s3": s3_files,
        **keys.secrets,
    }
    configmaps = {
        name: find("ConfigMap", name, namespace).body["data"]
        for name in ("studio-runner-options", "studio-runner-state")
    }
    port = _free_port()
    container = PodContainer(pod, container_name, tmp_path, secrets=secrets, configmaps=configmaps)
    name = f"studio-deploy-test-{uuid.uuid4().hex[:8]}"
    argv, env = container.podman_run(
        runner_image,
        extra=("--name", name),
        detach=True,
        overrides={
            **HOST_OVERRIDES,
            "PROM_ADDRESS": f"127.0.0.1:{port}",  # host network: a free port
            # the shipped cache location is AWS's; here the session's SeaweedFS stands in
            "ENV_CACHE_URI": f"s3://{urllib.parse.urlsplit(services.s3_endpoint).netloc}/{bucket}/envs",
        },
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        started = subprocess.run(argv, env=env, capture_output=True, text=True)
        assert started.returncode == 0, (
            f"podman could not start the Deployment's container:\n{started.stderr}"
        )
        wait_for(
            lambda: _running(name) and _status(f"{base_url}/readyz") == 200, 120, "/readyz to answer 200"
        )
        assert _status(f"{base_url}/healthz") == 200
        assert "runner_" in urllib.request.urlopen(f"{base_url}/metrics", timeout=5).read().decode()

        key = f"deploy_{uuid.uuid4().hex[:12]}"
        workspace = upload_blob(s3_client, bucket, workspace_tar({"train.py": TRAIN.encode()}))
        request = client_request(services, bucket, key, workspace, args=("arg1", "--flag=2"))
        for artifact in request["experiment"]["artifacts"].values():
            del artifact["credentials"]  # the runner's own S3 identity: the mounted credentials file
        envelope = seal(json.dumps(request), keys.public_key_pem, keys.signer)
        publish_like_client(services.amqp_url, unique_queue("rmq_deploy"), [json.dumps(envelope).encode()])
        document = wait_for(
            lambda: _running(name) and final_document(s3_client, bucket, key),
            RESULTS_TIMEOUT,
            "the scrape document",
        )
        assert document["studioml"]["status"] == "succeeded", document["studioml"]
        _check_core_results(s3_client, bucket, key, document)
        seen = document["experiment"]["container"]
        assert (seen["uid"], seen["gid"], seen["root_read_only"]) == (RUNNER_UID, RUNNER_UID, True)
        assert seen["pid1"][:4] == ["tini", "--", "studio-runner", "serve"], seen["pid1"]

        state = container.volume_dir("state") / "STATE"
        (state.parent / ".STATE.new").write_text("DrainAndSuspend")
        os.replace(state.parent / ".STATE.new", state)
        wait_for(lambda: _status(f"{base_url}/readyz") == 503, 60, "/readyz to fail while draining")
        assert _status(f"{base_url}/healthz") == 200, "a draining runner is alive"

        grace = pod["terminationGracePeriodSeconds"]
        subprocess.run(image.podman("stop", "--time", str(grace), name), capture_output=True, check=True)
        assert _exit_code(name) == 0, f"SIGTERM through tini should end the runner cleanly:\n{_logs(name)}"
    except BaseException as error:
        raise AssertionError(f"{error}\n--- runner log ---\n{_logs(name)}") from error
    finally:
        subprocess.run(image.podman("rm", "--force", "--time", "5", name), capture_output=True)


@dataclass
class MessageKeyFiles:
    """A runner key pair, a trusted request signer and a response key, as the Secrets hold them."""

    public_key_pem: bytes
    signer: ed25519.Ed25519PrivateKey
    secrets: dict[str, dict[str, str]]

    @classmethod
    def generate(cls, signer_prefix: str) -> MessageKeyFiles:
        passphrase = b"studio-test-passphrase"
        runner_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = runner_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(passphrase),
        )
        public_pem = runner_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )
        signer = ed25519.Ed25519PrivateKey.generate()
        signer_line = signer.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        response_pem = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        )
        secrets = {
            "studio-runner-message-key": {
                "ssh-privatekey": private_pem.decode(),
                "ssh-publickey": public_pem.decode(),
                "ssh-passphrase": passphrase.decode(),
            },
            "studio-runner-request-signers": {signer_prefix: signer_line.decode() + " test@studio\n"},
            "studio-runner-response-keys": {signer_prefix: response_pem.decode()},
        }
        return cls(public_pem, signer, secrets)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _running(name: str) -> bool:
    """True while the container runs; an exited runner fails the wait at once, with its log."""
    state = subprocess.run(
        image.podman("inspect", "--format", "{{.State.Status}}", name), capture_output=True, text=True
    ).stdout.strip()
    if state != "running":
        raise AssertionError(f"the runner container is {state or 'gone'} (exit {_exit_code(name)})")
    return True


def _exit_code(name: str) -> int | None:
    result = subprocess.run(
        image.podman("inspect", "--format", "{{.State.ExitCode}}", name), capture_output=True, text=True
    )
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None


def _logs(name: str) -> str:
    result = subprocess.run(image.podman("logs", name), capture_output=True, text=True)
    return (result.stdout + result.stderr)[-6000:]


# --- pod spec -> podman -------------------------------------------------------------------------
class PodContainer:
    """One container of a pod spec (a dict, as in a manifest), as podman arguments.

    emptyDir volumes become fresh host folders (mode 0777, as the kubelet makes them) or tmpfs
    for ``medium: Memory``; ConfigMap and Secret volumes become folders of files with their
    ``defaultMode``, owned by root and the pod's fsGroup (a missing optional Secret: an empty
    folder, as the kubelet mounts it). Variable values travel in podman's environment
    (``--env NAME``), never on its command line.
    """

    def __init__(
        self,
        pod_spec: dict[str, Any],
        name: str,
        scratch: Path,
        *,
        secrets: dict[str, dict[str, str]] | None = None,
        configmaps: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.pod = pod_spec
        self.container = next(c for c in pod_spec["containers"] if c["name"] == name)
        self.scratch = scratch
        self.secrets = secrets or {}
        self.configmaps = configmaps or {}
        self.mounts: dict[str, Path] = {}
        self._volume_dirs: dict[str, Path] = {}

    def volume_file(self, path: str) -> Path:
        """Where a file the container wrote into one of its volumes lies on this machine."""
        for mount_path, host in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if path.startswith(mount_path.rstrip("/") + "/"):
                return host / path[len(mount_path.rstrip("/")) + 1 :]
        raise AssertionError(f"{path} is on no volume of the pod ({sorted(self.mounts)})")

    def volume_dir(self, volume: str) -> Path:
        return self._volume_dirs[volume]

    def empty_dir(self, name: str) -> Path:
        """A fresh folder, world-writable as the kubelet makes an emptyDir."""
        host = self.scratch / "volumes" / name
        host.mkdir(parents=True, exist_ok=True)
        host.chmod(0o777)
        return host

    def podman_run(
        self,
        image_id: str,
        *,
        extra: tuple[str, ...] = (),
        overrides: dict[str, str] | None = None,
        detach: bool = False,
    ) -> tuple[list[str], dict[str, str]]:
        """``podman run`` arguments and the environment to start them with."""
        container = self.container
        # detached: kept after it exits, so the test can read its exit status (and removes it)
        argv = image.podman("run", "--detach" if detach else "--rm", *image.RUN_LIMITS)
        argv += [*self._security(), *extra]
        values = self._environment()
        values.update(overrides or {})
        env = dict(os.environ)
        for variable, value in values.items():
            env[variable] = value
            argv += ["--env", variable]
        volumes = {volume["name"]: volume for volume in self.pod.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            argv += self._mount(volumes[mount["name"]], mount["mountPath"], mount.get("readOnly", False))
        if container.get("command"):
            argv += ["--entrypoint", json.dumps(container["command"])]
        argv += [image_id, *(container.get("args") or [])]
        return argv, env

    def _environment(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for source in self.container.get("envFrom") or []:
            if "configMapRef" in source:
                values.update(self.configmaps[source["configMapRef"]["name"]])
            elif "secretRef" in source:
                values.update(self.secrets[source["secretRef"]["name"]])
        for variable in self.container.get("env") or []:  # env wins over envFrom, as in Kubernetes
            if "value" in variable or "valueFrom" not in variable:
                values[variable["name"]] = variable.get("value", "")
                continue
            reference = variable["valueFrom"].get("secretKeyRef")
            assert reference is not None, f"{variable['name']}: only value and secretKeyRef are simulated"
            value = self.secrets.get(reference["name"], {}).get(reference["key"])
            if value is None:
                assert reference.get("optional"), (
                    f"{variable['name']}: no {reference} among the test's Secrets"
                )
                continue
            values[variable["name"]] = value
        return values

    def _security(self) -> list[str]:
        pod = self.pod.get("securityContext") or {}
        own = self.container.get("securityContext") or {}
        merged = {**pod, **own}
        args: list[str] = []
        if merged.get("runAsUser") is not None:
            group = merged.get("runAsGroup")
            args += ["--user", f"{merged['runAsUser']}" + (f":{group}" if group is not None else "")]
        if pod.get("fsGroup") is not None:
            args += ["--group-add", str(pod["fsGroup"])]
        if own.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes adds no tmpfs on /tmp
        if own.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for capability in (own.get("capabilities") or {}).get("drop") or []:
            args += ["--cap-drop", capability]
        return args

    def _mount(self, volume: dict[str, Any], mount_path: str, read_only: bool) -> list[str]:
        name = volume["name"]
        suffix = ":ro" if read_only else ""
        if "emptyDir" in volume:
            empty_dir = volume["emptyDir"] or {}
            if empty_dir.get("medium") == "Memory":
                limit = empty_dir.get("sizeLimit")
                size = f",tmpfs-size={int(quantity(limit))}" if limit else ""  # the kernel's units
                return ["--mount", f"type=tmpfs,destination={mount_path},tmpfs-mode=1777{size}"]
            host = self.empty_dir(name)
        elif "configMap" in volume:
            source = volume["configMap"]
            host = self._files(name, self.configmaps[source["name"]], source)
        elif "secret" in volume:
            source = volume["secret"]
            data = self.secrets.get(source["secretName"])
            assert data is not None or source.get("optional"), (
                f"volume {name}: no Secret {source['secretName']}"
            )
            host = self._files(name, data or {}, source)
        else:
            raise AssertionError(f"volume {name}: only emptyDir, configMap and secret are simulated")
        self.mounts[mount_path] = host
        self._volume_dirs[name] = host
        return ["--volume", f"{host}:{mount_path}{suffix}"]

    def _files(self, name: str, data: dict[str, str], source: dict[str, Any]) -> Path:
        host = self.scratch / "volumes" / name
        host.mkdir(parents=True, exist_ok=True)
        group = (self.pod.get("securityContext") or {}).get("fsGroup", 0)
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            if item["key"] not in data:
                continue
            target = host / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]])
            target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
            with contextlib.suppress(PermissionError):
                os.chown(target, 0, group)
        return host
