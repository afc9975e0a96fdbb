"""The studio-runner as an Airflow task: its pod on GPU Kubernetes, or a child process on the worker.

:class:`StudioRunnerPodOperator` is the base of every operator that starts a ``studio-runner``
(:class:`~airflow_provider_studio.operators.experiment.StudioExperimentOperator` runs one request
with ``run``, :class:`~airflow_provider_studio.operators.queue_runner.StudioQueueRunnerOperator`
drains queues with ``serve``). It owns the run, so a new runner operator only says which
runner command to start, with which options, and how to conclude from its typed summary:

- the execution mode (``[studio] execution_mode``: ``kubernetes`` or ``local``), KPO's sync and
  deferrable paths, and the verdict on a failed pod from the summary its runner left;
- the pod's shape for the runner image: GPU limit, node selector and toleration from
  ``resources_needed``, a memory-backed ``/dev/shm``, a work ``emptyDir``, AWS keys only as
  ``secretKeyRef``, and the runner's result file read back through KPO's xcom sidecar;
- the shared environment cache (``--env-cache-uri``, on by default): a pod's ``/work`` starts
  empty, so without it every pod installs its request's whole ``pythonenv`` again; an optional
  node-local volume (``--env-cache-dir``) is consulted first;
- the local child process (:mod:`airflow_provider_studio.operators.local_runner`): its
  environment with the connection's keys and nothing of Airflow's, and stopping it on kill.
"""

from __future__ import annotations

import contextlib
import shlex
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.backcompat.backwards_compat_converters import (
    convert_env_vars,
    convert_toleration,
)
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.sdk import Context, conf
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowNotFoundException,
    AirflowSkipException,
)
from kubernetes.client import models as k8s
from studio_runner.request import Resources
from studio_runner.s3_uris import parse_qualified_s3_uri
from studio_runner.summary import RunSummary, ServeSummary
from studio_runner.units import parse_size

from airflow_provider_studio.experiment_request import CREDENTIAL_NAMES, resources_from
from airflow_provider_studio.operators.local_runner import (
    LocalRunnerProcess,
    local_command,
    read_summary,
    worker_environment,
)

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

KUBERNETES = "kubernetes"
LOCAL = "local"
EXECUTION_MODES = (KUBERNETES, LOCAL)

DEFAULT_RUNNER_IMAGE = ""
"""No default: no registry publishes the runner image. Build it (``make image``), push it to a
registry the cluster pulls from, and name it in ``[studio] runner_image`` or ``runner_image``."""
NO_RUNNER_IMAGE = (
    "no runner image for Kubernetes mode: build it with `make image` (localhost/studio-runner:<version>), "
    "push it to a registry your cluster pulls from (podman tag ... && podman push ...), then set "
    "[studio] runner_image (AIRFLOW__STUDIO__RUNNER_IMAGE) or pass runner_image= to the operator; "
    "or run locally with [studio] execution_mode = local"
)
XCOM_RESULT_FILE = "/airflow/xcom/return.json"
"""Where KPO's xcom sidecar reads the return value; the runner writes its summary there."""
WORK_MOUNT = "/work"
"""The image's HOME and writable volume: the root filesystem stays read-only."""
TMP_VOLUME = "studio-tmp"
WORK_VOLUME = "studio-work"
SHM_VOLUME = "dshm"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_NODE_SELECTOR: Mapping[str, str] = {"nvidia.com/gpu.present": "true"}
"""The label NVIDIA's GPU feature discovery (GPU operator) puts on GPU nodes."""
DEFAULT_GPU_TOLERATIONS: tuple[k8s.V1Toleration, ...] = (
    k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"),
)
DEFAULT_CREDENTIALS_SECRET = "studio-s3-credentials"
DEFAULT_CREDENTIALS_SECRET_KEYS: Mapping[str, str] = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
"""Pod environment variable → key in the Secret."""
USAGE_EXIT_CODE = 2
"""``studio-runner`` refused its options or configuration; the same task cannot do better."""
ENV_CACHE_PREFIX = "studio-env-cache"
"""Where packed virtualenvs go in the results bucket when nothing else is configured."""
ENV_CACHE_OFF = "off"
"""``env_cache_uri`` / ``[studio] env_cache_uri`` value that turns the shared cache off."""
ENV_CACHE_MOUNT = "/env-cache"
"""The node-local cache volume's mount, as in deploy/ (``ENV_CACHE_DIR``)."""
ENV_CACHE_VOLUME = "studio-env-cache"
ENV_CACHE_RUNNER_ENV = frozenset({"ENV_CACHE_URI", "ENV_CACHE_DIR"})
"""Runner options read from the environment that the operator decides: a worker's stray values
must not turn the cache on (or point it elsewhere) for a local runner."""
"""``studio-runner`` refused its options or configuration; the same task cannot do better."""


def pod_arguments(subcommand: str, *options: str, result_file: str | None = XCOM_RESULT_FILE) -> list[str]:
    """``studio-runner <subcommand>`` in a runner pod: the summary where KPO's xcom sidecar reads
    it (None: no summary), folders on the work volume, and JSON events for the pod log."""
    return [
        subcommand,
        *(["--result-file", result_file] if result_file else []),
        "--working-dir",
        f"{WORK_MOUNT}/work",
        "--cache-dir",
        f"{WORK_MOUNT}/cache",
        "--log-format",
        "json",
        *options,
    ]


_DERIVABLE_POD_FIELDS = ("container_resources", "node_selector", "tolerations", "arguments")


class StudioRunnerPodOperator(KubernetesPodOperator):
    """Base for operators that start one ``studio-runner``: in a pod of ``runner_image``, or locally.

    It owns the run in both modes: the mode switch, KPO's sync and deferrable paths (a failed
    pod is judged by the summary the runner left), and the local child with its result file.
    A subclass says only which subcommand it runs (``runner_subcommand``), with which options
    (:meth:`subcommand_options`, built late, after rendering, for either mode) and how it
    concludes (:meth:`conclude`: the typed summary to the XCom value, or an exception). Every
    KubernetesPodOperator argument a caller gives explicitly wins over what is derived here.

    :param resources_needed: (templated) StudioML resources (``cpus``, ``ram``, ``hdd``, ``gpus``,
        ``gpuCount``, ``gpuMem``) that size the pod: ``nvidia.com/gpu`` = the card count, CPU
        and memory requests, and a GPU node selector and toleration when cards are asked for.
    :param aws_conn_id: AWS connection whose keys a local runner gets in its environment.
    :param execution_mode: ``"kubernetes"`` or ``"local"``; default ``[studio] execution_mode``,
        read on the worker when the task runs.
    :param runner_image: runner image; default ``[studio] runner_image``. Kubernetes mode needs
        one (there is no published default): a pod without it fails at once with what to do.
    :param runner_options: extra options for the runner command, after the operator's own.
    :param gpu_node_selector: node selector for GPU pods; default
        ``{"nvidia.com/gpu.present": "true"}``, ``{}`` for none.
    :param gpu_tolerations: tolerations for GPU pods; default ``nvidia.com/gpu`` Exists NoSchedule.
    :param aws_credentials_secret: Kubernetes Secret holding the runner's AWS keys; None when the
        pod gets them otherwise (IRSA, instance role).
    :param aws_credentials_secret_keys: pod variable → key in that Secret.
    :param shm_size: size limit of the memory-backed ``/dev/shm`` (e.g. ``"8Gi"``); default none.
    :param local_kill_grace_period: local mode: seconds between SIGTERM and SIGKILL on kill.
    :param env_cache_uri: where runners share packed virtualenvs, ``s3://host[:port]/bucket/prefix``
        (``--env-cache-uri``); default ``[studio] env_cache_uri``, else the subcommand's default
        (:meth:`default_env_cache_uri`: ``studio-env-cache/`` in the results bucket); ``"off"``
        turns the cache off. The runner uses its own S3 keys for it, in both modes.
    :param env_cache_volume: a node-local cache of packs, consulted before object storage and
        mounted at ``/env-cache`` (``--env-cache-dir``): an absolute path is a ``hostPath``
        (writable by GID 10001, refused under Pod Security ``restricted``), anything else a
        PersistentVolumeClaim's name; default ``[studio] env_cache_volume``, else none.
        Kubernetes mode only: a local runner keeps its environments in its cache folder anyway.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "resources_needed")
    runner_subcommand: ClassVar[str]
    """``run`` or ``serve``."""
    summary_type: ClassVar[type[RunSummary] | type[ServeSummary]]
    """What that subcommand writes to ``--result-file``."""
    local_reserved_env: frozenset[str] = frozenset()
    """Runner options the runner also reads from its environment, which a worker's stray values
    must not set for a local runner (the operator sets them itself)."""

    def __init__(
        self,
        *,
        resources_needed: Mapping[str, Any] | str | None = None,
        aws_conn_id: str | None = "aws_default",
        execution_mode: str | None = None,
        runner_image: str | None = None,
        runner_options: Sequence[str] = (),
        gpu_node_selector: Mapping[str, str] | None = None,
        gpu_tolerations: Sequence[k8s.V1Toleration | Mapping[str, Any]] | None = None,
        aws_credentials_secret: str | None = DEFAULT_CREDENTIALS_SECRET,
        aws_credentials_secret_keys: Mapping[str, str] | None = None,
        shm_size: str | None = None,
        local_kill_grace_period: float = 60.0,
        env_cache_uri: str | None = None,
        env_cache_volume: str | None = None,
        **kwargs: Any,
    ) -> None:
        if execution_mode is not None and execution_mode not in EXECUTION_MODES:
            raise ValueError(f"execution_mode must be one of {EXECUTION_MODES}, not {execution_mode!r}")
        self.resources_needed = resources_needed
        self.aws_conn_id = aws_conn_id
        self.execution_mode = execution_mode
        self.runner_options = list(runner_options)
        self.gpu_node_selector = gpu_node_selector
        self.gpu_tolerations = gpu_tolerations
        self.shm_size = shm_size
        self.local_kill_grace_period = local_kill_grace_period
        self.env_cache_uri = env_cache_uri
        self.env_cache_volume = env_cache_volume
        # Pod shape that depends on (possibly templated) values is filled in when the pod is
        # built, after rendering; what the caller gave explicitly is left alone.
        self._derived_pod_fields = frozenset(
            name for name in _DERIVABLE_POD_FIELDS if kwargs.get(name) is None
        )
        image = runner_image or conf.get("studio", "runner_image", fallback=DEFAULT_RUNNER_IMAGE)
        kwargs.setdefault("image", image.strip() or None)
        if execution_mode == KUBERNETES and not kwargs["image"]:
            raise ValueError(NO_RUNNER_IMAGE)
        # no ``cmds``: the image's entrypoint (tini, then studio-runner) must stay PID 1 so
        # signals reach the runner and orphaned workload processes are reaped
        kwargs.setdefault("do_xcom_push", True)
        kwargs.setdefault("container_security_context", runner_security_context())
        kwargs.setdefault("xcom_sidecar_container_security_context", runner_security_context())
        kwargs.setdefault("volumes", runner_volumes(shm_size))
        kwargs.setdefault("volume_mounts", runner_volume_mounts())
        kwargs.setdefault("secrets", credential_secrets(aws_credentials_secret, aws_credentials_secret_keys))
        super().__init__(**kwargs)
        self._hook: AwsBaseHook | None = None
        self._local_runner: LocalRunnerProcess | None = None
        self._pod_result: Any = None
        """What KPO read from the pod's result file, kept so a failed pod can be judged by it."""
        self._concluded: Any = None

    # --- what a subclass says ----------------------------------------------------------------

    def prepare_run(self, context: Context) -> None:
        """Before either mode starts the runner: settings checked, state for the options read."""

    def subcommand_options(self, *, kubernetes: bool) -> list[str]:
        """The subcommand's own options (before ``runner_options``), from rendered values."""
        return []

    def runner_region(self) -> str | None:
        """``AWS_DEFAULT_REGION`` for the runner, in the pod and locally."""
        return None

    def pod_environment(self) -> dict[str, str]:
        """Plain environment variables the pod needs beyond the region (never a secret)."""
        return {}

    def pod_annotations(self) -> dict[str, str]:
        return {}

    def default_env_cache_uri(self) -> str | None:
        """The shared environment cache when neither the argument nor ``[studio] env_cache_uri``
        names one: ``studio-env-cache/`` in the AWS connection's ``service_config.s3.bucket_name``
        bucket, addressed as the runner does; None (off) when the connection names no bucket."""
        try:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            from airflow_provider_studio.experiment_request import S3Endpoint

            hook = S3Hook(aws_conn_id=self.aws_conn_id)
            bucket = hook.service_config.get("bucket_name")
            endpoint = S3Endpoint.from_hook(hook) if bucket else None
        except Exception as error:  # no connection, or one that cannot say where S3 is
            self.log.info("no shared environment cache: AWS connection %s: %s", self.aws_conn_id, error)
            return None
        return endpoint.qualified(bucket, ENV_CACHE_PREFIX) if endpoint is not None else None

    @contextlib.contextmanager
    def local_inputs(self, env: dict[str, str]) -> Iterator[bytes | None]:
        """Adds what a local runner needs to ``env`` and yields its stdin; what it opens lasts
        until the runner has exited."""
        yield None

    def conclude(self, summary: Any, context: Context, *, cause: BaseException | None = None) -> Any:
        """The task's XCom value from the runner's typed summary, or the exception that fails it.

        ``cause`` is the failed pod's error (KPO has then pushed the summary to XCom already).
        """
        raise NotImplementedError(f"{type(self).__name__} does not say how it concludes")

    def describe_run(self) -> str:
        """What this runner was doing, for errors: ``experiment k``, ``serve for '^rmq_a$'``."""
        return f"studio-runner {self.runner_subcommand}"

    # --- running -----------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self._concluded = self._pod_result = None
        mode = self._mode()
        self.prepare_run(context)
        if mode == LOCAL:
            return self.conclude_result(self._run_locally(), context)
        try:
            result = super().execute(context)
        except AirflowSkipException:
            raise
        except AirflowException as error:
            return self._after_pod_failure(error, context)
        if result is None and self._concluded is not None:
            # deferrable, and the pod had already ended: KPO re-entered inline and returned nothing
            return self._concluded
        return self.conclude_result(result, context)

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        """The deferrable path's end: the same verdict on the summary as ``execute``."""
        self._pod_result = None
        try:
            result = super().trigger_reentry(context, event)
        except AirflowSkipException:
            raise
        except AirflowException as error:
            return self._after_pod_failure(error, context)
        return self.conclude_result(result, context)

    def extract_xcom(self, pod: k8s.V1Pod, *args: Any, **kwargs: Any) -> dict[Any, Any] | None:
        """KPO's read of the runner's summary, kept so a failed pod can still be judged by it."""
        result = super().extract_xcom(pod, *args, **kwargs)
        self._pod_result = result
        return result

    def _after_pod_failure(self, error: AirflowException, context: Context) -> Any:
        """The pod failed: with the runner's summary the verdict is the runner's, else KPO's error."""
        if self._pod_result is None:
            raise error
        return self.conclude_result(self._pod_result, context, cause=error)

    def conclude_result(self, result: Any, context: Context, *, cause: BaseException | None = None) -> Any:
        """What the runner left (the decoded ``--result-file`` / ``/airflow/xcom/return.json``)
        checked and typed, then :meth:`conclude`; no summary fails the task."""
        if result is None and not self.do_xcom_push:
            return None  # no sidecar, no summary: the pod's exit status was the verdict
        try:
            summary = self.summary_type.from_value(result)
        except ValueError as error:
            raise AirflowException(
                f"studio-runner left no result summary for {self.describe_run()} ({error}); "
                "its log above says why"
            ) from cause
        self._concluded = self.conclude(summary, context, cause=cause)
        return self._concluded

    def _mode(self) -> str:
        mode = (self.execution_mode or conf.get("studio", "execution_mode", fallback=KUBERNETES)).strip()
        if mode.lower() not in EXECUTION_MODES:
            raise AirflowFailException(
                f"[studio] execution_mode is {mode!r}; set it to one of {EXECUTION_MODES} "
                "(AIRFLOW__STUDIO__EXECUTION_MODE)"
            )
        return mode.lower()

    # --- the pod -----------------------------------------------------------------------------

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """KPO's pod, after the parts that follow from rendered values are filled in; a pod to
        start needs an image (a dry run shows the rest)."""
        if not dry_run and not (self.image or "").strip():
            raise AirflowFailException(NO_RUNNER_IMAGE)
        self._shape_pod()
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def runner_arguments(self) -> list[str]:
        """The pod's ``studio-runner`` arguments when the caller gave none, built after rendering."""
        return pod_arguments(
            self.runner_subcommand,
            *self.env_cache_options(kubernetes=True),
            *self.subcommand_options(kubernetes=True),
            *self.runner_options,
            result_file=XCOM_RESULT_FILE if self.do_xcom_push else None,
        )

    def _shape_pod(self) -> None:
        """Resources, GPU placement, (late) arguments, environment; subclasses add their own parts."""
        resources = self._resources()
        gpus = resources.cards > 0
        if "container_resources" in self._derived_pod_fields:
            self.container_resources = pod_resources(resources)
        if "node_selector" in self._derived_pod_fields:
            selector = DEFAULT_GPU_NODE_SELECTOR if self.gpu_node_selector is None else self.gpu_node_selector
            self.node_selector = dict(selector) if gpus else {}
        if "tolerations" in self._derived_pod_fields:
            tolerations = DEFAULT_GPU_TOLERATIONS if self.gpu_tolerations is None else self.gpu_tolerations
            self.tolerations = [convert_toleration(t) for t in tolerations] if gpus else []
        if "arguments" in self._derived_pod_fields:
            self.arguments = self.runner_arguments()
        env = list(convert_env_vars(self.env_vars or []))
        names = {variable.name for variable in env}
        wanted = self.pod_environment()
        region = self.runner_region()
        if region:
            wanted.setdefault("AWS_DEFAULT_REGION", region)
        env += [k8s.V1EnvVar(name=name, value=value) for name, value in wanted.items() if name not in names]
        self.env_vars = env
        self.annotations = {**(self.annotations or {}), **self.pod_annotations()}
        volume = self._env_cache_volume()
        if volume is not None:
            self._mount_env_cache(volume)

    # --- the shared environment cache --------------------------------------------------------

    def resolved_env_cache_uri(self) -> str | None:
        """The ``--env-cache-uri`` the runner gets (argument, then config, then the default);
        None when turned off. A URI the runner would refuse fails the task without retries."""
        value = self.env_cache_uri
        if value is None:
            value = conf.get("studio", "env_cache_uri", fallback="") or ""
        value = value.strip()
        if value.lower() == ENV_CACHE_OFF:
            return None
        if not value:
            return self.default_env_cache_uri()
        try:
            bucket = parse_qualified_s3_uri(value)[2]
        except ValueError as error:
            raise AirflowFailException(f"env_cache_uri: {error}") from None
        if not bucket:
            raise AirflowFailException(
                f"env_cache_uri {value!r} names no bucket: give s3://host[:port]/bucket/prefix, "
                f"or {ENV_CACHE_OFF!r} to turn the shared environment cache off"
            )
        return value

    def env_cache_options(self, *, kubernetes: bool) -> list[str]:
        """``--env-cache-uri`` (both modes) and, in a pod with a cache volume, ``--env-cache-dir``."""
        options = []
        uri = self.resolved_env_cache_uri()
        if uri:
            options += ["--env-cache-uri", uri]
        if kubernetes and self._env_cache_volume() is not None:
            options += ["--env-cache-dir", ENV_CACHE_MOUNT]
        if options:
            self.log.info(
                "virtualenvs shared through %s%s (env_cache_uri=%r turns this off)",
                f"{ENV_CACHE_MOUNT} then " if "--env-cache-dir" in options else "",
                uri or "the node-local volume only",
                ENV_CACHE_OFF,
            )
        return options

    def _env_cache_volume(self) -> k8s.V1Volume | None:
        value = self.env_cache_volume
        if value is None:
            value = conf.get("studio", "env_cache_volume", fallback="") or ""
        return env_cache_volume(value)

    def _mount_env_cache(self, volume: k8s.V1Volume) -> None:
        """The node-local pack folder at ``/env-cache``, group-writable for the runner on a PVC."""
        volumes = list(self.volumes or [])
        if all(existing.name != volume.name for existing in volumes):
            self.volumes = [*volumes, volume]
        mounts = list(self.volume_mounts or [])
        if all(mount.name != volume.name for mount in mounts):
            self.volume_mounts = [*mounts, k8s.V1VolumeMount(name=volume.name, mount_path=ENV_CACHE_MOUNT)]
        if not self.security_context:
            self.security_context = k8s.V1PodSecurityContext(fs_group=RUNNER_GID)

    def _resources(self) -> Resources:
        try:
            return resources_from(self.resources_needed)
        except ValueError as error:
            raise AirflowFailException(f"resources_needed: {error}") from None

    # --- local mode --------------------------------------------------------------------------

    def _run_locally(self) -> Any:
        """``studio-runner <subcommand>`` on this worker; what it left in its result file."""
        with tempfile.TemporaryDirectory(prefix=f"studio-{self.runner_subcommand}-") as scratch:
            result_file = Path(scratch) / "summary.json"
            command = local_command(
                self.runner_subcommand,
                result_file,
                *self.env_cache_options(kubernetes=False),
                *self.subcommand_options(kubernetes=False),
                *self.runner_options,
            )
            env = self._local_runner_environment(self.runner_region())
            self.log.info("running %s", shlex.join(command))
            with self.local_inputs(env) as stdin:
                runner = self._run_local_runner(command, env, stdin=stdin)
            result = read_summary(result_file)
        if result is None:
            code = runner.process.returncode if runner.process is not None else None
            error = AirflowFailException if code == USAGE_EXIT_CODE else AirflowException
            raise error(
                f"studio-runner {self.runner_subcommand} exited with status {code} without a result "
                f"summary; its last log lines:\n{runner.last_lines()}"
            )
        return result

    def _run_local_runner(
        self, command: Sequence[str], env: Mapping[str, str], stdin: bytes | None = None
    ) -> LocalRunnerProcess:
        """Run ``command`` on this worker until it exits (stopped if the task is killed)."""
        runner = LocalRunnerProcess(
            command, env=env, log=self.log, kill_grace_period=self.local_kill_grace_period
        )
        self._local_runner = runner
        try:
            runner.run(stdin)
        finally:
            self._local_runner = None
        return runner

    def _local_runner_environment(self, region: str | None) -> dict[str, str]:
        """The worker's environment less Airflow's settings, plus the connection's keys: the
        only place a local runner's credentials appear."""
        env = worker_environment(self.local_reserved_env | ENV_CACHE_RUNNER_ENV)
        keys = self._connection_keys()
        if keys is not None:
            for name in CREDENTIAL_NAMES:
                env.pop(name, None)
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = keys[0], keys[1]
            if keys[2]:
                env["AWS_SESSION_TOKEN"] = keys[2]
        if region:
            env["AWS_DEFAULT_REGION"] = region
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _aws_hook(self) -> AwsBaseHook:
        if self._hook is None:
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

            self._hook = AwsBaseHook(aws_conn_id=self.aws_conn_id, client_type="s3")
        return self._hook

    def _connection_keys(self) -> tuple[str, str, str | None] | None:
        """The connection's resolved keys (role assumption and all), else its login and password."""
        hook = self._aws_hook()
        try:
            credentials = hook.get_credentials()
            if credentials.access_key and credentials.secret_key:
                return credentials.access_key, credentials.secret_key, credentials.token
        except Exception as error:
            self.log.info("AWS connection %s resolved no session keys (%s)", self.aws_conn_id, error)
        if self.aws_conn_id:
            try:
                connection = hook.get_connection(self.aws_conn_id)
            except AirflowNotFoundException:
                connection = None
            if connection is not None and connection.login and connection.password:
                return connection.login, connection.password, None
        self.log.warning(
            "AWS connection %s gives no keys; the runner will use the worker's own credential chain",
            self.aws_conn_id,
        )
        return None

    def on_kill(self) -> None:
        runner = self._local_runner
        if runner is not None:
            runner.stop()
        super().on_kill()


# --- pod parts -------------------------------------------------------------------------------


def pod_resources(resources: Resources) -> k8s.V1ResourceRequirements | None:
    """CPU and memory requests and the GPU limit (extended resources go in limits) for a request."""
    requests: dict[str, str] = {}
    if resources.cpus:
        requests["cpu"] = str(resources.cpus)
    if resources.ram_bytes:
        requests["memory"] = kubernetes_quantity(resources.ram_bytes)
    limits = {GPU_RESOURCE: str(resources.cards)} if resources.cards else {}
    if not requests and not limits:
        return None
    return k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None)


def kubernetes_quantity(size: int) -> str:
    """Bytes as the shortest exact Kubernetes quantity (StudioML ``"2g"`` is ``2G``, ``"2GiB"`` ``2Gi``)."""
    for suffix, factor in (
        ("Ti", 1024**4),
        ("T", 1000**4),
        ("Gi", 1024**3),
        ("G", 1000**3),
        ("Mi", 1024**2),
        ("M", 1000**2),
        ("Ki", 1024),
        ("k", 1000),
    ):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def runner_volumes(shm_size: str | None) -> list[k8s.V1Volume]:
    """A memory-backed ``/dev/shm`` (PyTorch data loaders) and a work ``emptyDir``."""
    limit = kubernetes_quantity(parse_size(shm_size)) if shm_size else None
    return [
        k8s.V1Volume(
            name=SHM_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=limit)
        ),
        k8s.V1Volume(name=WORK_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource()),
        k8s.V1Volume(name=TMP_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource()),
    ]


def runner_volume_mounts() -> list[k8s.V1VolumeMount]:
    return [
        k8s.V1VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm"),
        k8s.V1VolumeMount(name=WORK_VOLUME, mount_path=WORK_MOUNT),
        k8s.V1VolumeMount(name=TMP_VOLUME, mount_path="/tmp"),
    ]


def env_cache_volume(value: str) -> k8s.V1Volume | None:
    """The node-local environment cache: an absolute path is a ``hostPath``, a name a PVC."""
    value = value.strip()
    if not value:
        return None
    if value.startswith("/"):
        source = k8s.V1HostPathVolumeSource(path=value, type="DirectoryOrCreate")
        return k8s.V1Volume(name=ENV_CACHE_VOLUME, host_path=source)
    claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=value)
    return k8s.V1Volume(name=ENV_CACHE_VOLUME, persistent_volume_claim=claim)


def runner_security_context() -> k8s.V1SecurityContext:
    """The Pod Security ``restricted`` profile, as deploy/ uses: the runner needs no privilege."""
    return k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=10001,
        run_as_group=10001,
        read_only_root_filesystem=True,
        allow_privilege_escalation=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def credential_secrets(name: str | None, keys: Mapping[str, str] | None) -> list[Secret]:
    """AWS keys as ``secretKeyRef`` environment variables; nothing when no Secret is named."""
    if not name:
        return []
    return [
        Secret("env", variable, name, key)
        for variable, key in (keys or DEFAULT_CREDENTIALS_SECRET_KEYS).items()
    ]


# --- message keys (encrypted and signed requests) ---------------------------------------------

DEFAULT_RUNNER_KEY_SECRET = "studio-runner-message-key"
"""As in deploy/: ``ssh-privatekey`` (the runner's RSA key) and ``ssh-passphrase``."""
DEFAULT_REQUEST_SIGNERS_SECRET = "studio-runner-request-signers"
"""As in deploy/: one ``ssh-ed25519`` public key per file, named with a queue-name prefix."""
ENCRYPT_MOUNT = "/etc/studio-runner/encryption"
SIGNERS_MOUNT = "/etc/studio-runner/request-signers"
RUNNER_KEY_VOLUME = "studio-runner-key"
SIGNERS_VOLUME = "studio-request-signers"
RUNNER_GID = 10001
"""The runner's group (``runner_security_context``); as fsGroup it may read the 0440 key files."""


def message_key_volumes(runner_key_secret: str, request_signers_secret: str) -> list[k8s.V1Volume]:
    """The runner's decryption key (laid out for ``--encrypt-dir``) and the trusted signers, read-only
    0440 files. ``optional`` as in deploy/: a missing Secret makes the runner refuse the request with
    its reason (no usable key), where a failed mount would leave the pod pending."""
    return [
        k8s.V1Volume(
            name=RUNNER_KEY_VOLUME,
            secret=k8s.V1SecretVolumeSource(
                secret_name=runner_key_secret,
                default_mode=0o440,
                optional=True,
                items=[
                    k8s.V1KeyToPath(key="ssh-privatekey", path="encryption/ssh-privatekey"),
                    k8s.V1KeyToPath(key="ssh-passphrase", path="passphrase/ssh-passphrase"),
                ],
            ),
        ),
        k8s.V1Volume(
            name=SIGNERS_VOLUME,
            secret=k8s.V1SecretVolumeSource(
                secret_name=request_signers_secret, default_mode=0o440, optional=True
            ),
        ),
    ]


def message_key_mounts() -> list[k8s.V1VolumeMount]:
    return [
        k8s.V1VolumeMount(name=RUNNER_KEY_VOLUME, mount_path=ENCRYPT_MOUNT, read_only=True),
        k8s.V1VolumeMount(name=SIGNERS_VOLUME, mount_path=SIGNERS_MOUNT, read_only=True),
    ]


def message_key_arguments() -> list[str]:
    return ["--encrypt-dir", ENCRYPT_MOUNT, "--request-signatures-dir", SIGNERS_MOUNT]
