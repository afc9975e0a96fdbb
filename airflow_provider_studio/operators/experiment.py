"""Run one StudioML experiment with ``studio-runner run``: in a GPU pod, or on the worker itself.

Both modes run the very same runner with the very same request (built by
:mod:`airflow_provider_studio.experiment_request`), so what passes in CI in ``local`` mode is
what runs on the cluster. The runner's result summary is the task's return value; an
experiment that did not succeed fails the task with the runner's reason, unless
``fail_on_experiment_error=False`` asks for the summary instead (a fan-in step can then score
failed genomes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s
from studio_runner.memo import Fingerprinter, FingerprintError, ResultIndex
from studio_runner.outcome import Status
from studio_runner.request import Request, RequestError
from studio_runner.summary import RunSummary

from airflow_provider_studio.experiment_request import (
    ExperimentSpec,
    RequestBuilder,
    S3Endpoint,
    default_experiment_key,
    results_prefix,
)
from airflow_provider_studio.hooks.message_keys import (
    MessageKeysError,
    RequestSealingKeys,
    StudioMessageKeysHook,
)
from airflow_provider_studio.links.experiment import StudioArtifactsLink
from airflow_provider_studio.operators.runner_pod import (
    DEFAULT_CREDENTIALS_SECRET,
    DEFAULT_REQUEST_SIGNERS_SECRET,
    DEFAULT_RUNNER_KEY_SECRET,
    ENV_CACHE_PREFIX,
    RUNNER_GID,
    StudioRunnerPodOperator,
    message_key_arguments,
    message_key_mounts,
    message_key_volumes,
)

MAX_POD_REQUEST_BYTES = 127 * 1024
"""Linux refuses to start a process with one environment string over 128 KiB."""

_RUNNER_OPTION_ENV = frozenset(
    {
        "REQUEST_JSON",
        "REQUEST",
        "RESULT_FILE",
        "WORKING_DIR",
        "CACHE_DIR",
        "ENCRYPT_DIR",
        "REQUEST_SIGNATURES_DIR",
        "CLEAR_TEXT_MESSAGES",
    }
)
"""The runner reads its options from these too (``REQUEST_JSON`` even wins over ``--request``),
so a worker's stray values must not reach a local runner."""


class StudioExperimentFailed(AirflowException):
    """The runner ran the experiment and it did not succeed; ``summary`` is the runner's summary."""

    def __init__(self, message: str, summary: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = dict(summary or {})


class StudioRequestRefused(StudioExperimentFailed, AirflowFailException):
    """The runner refused the request as unrunnable; retrying the same request cannot help."""


class StudioExperimentOperator(StudioRunnerPodOperator):
    """Run a StudioML experiment (script or module, args, workspace) with ``studio-runner run``.

    The request is built at run time on the worker: a local ``workspace`` folder is packed and
    stored as ``blobstore/<sha256>.tar`` in ``results_bucket`` (once per content), and results
    go to ``experiments/<experiment_key>/`` there. No credential ever enters the request, the
    pod spec or a rendered field.

    **Kubernetes mode** (``[studio] execution_mode = kubernetes``, the default): a pod of
    ``runner_image`` runs ``studio-runner run`` with the request in ``REQUEST_JSON`` and writes
    its summary to ``/airflow/xcom/return.json``, which KPO's xcom sidecar returns. GPUs come
    from ``resources_needed``: ``nvidia.com/gpu`` = the card count, CPU and memory requests,
    a GPU node selector and toleration. S3 keys reach the pod only as ``secretKeyRef``s to
    ``s3_credentials_secret``. Every KubernetesPodOperator argument can still be given and then
    wins (``deferrable=True``, ``namespace``, ``affinity``, ``volumes`` ...).

    **Local mode** (``execution_mode="local"`` or ``AIRFLOW__STUDIO__EXECUTION_MODE=local``):
    the same command runs on the worker, with the request on stdin and the AWS connection's
    keys in its environment only; the experiment's console streams into the task log. The
    runner's virtualenv cache lives in ``[studio] local_cache_dir`` (default
    ``$AIRFLOW_HOME/studio-runner/cache``), so it is built once per requirements set.

    :param script: (templated) file in the workspace to run.
    :param module: (templated) or a module to run with ``python -m``.
    :param args: (templated) arguments, each shell-quoted as ``studio run`` does; a string is
        split like a shell would. Map over it: ``.partial(...).expand(args=[[...], [...]])``.
    :param workspace: (templated) local folder, ``s3://bucket/key.tar``, or None (empty).
    :param inputs: (templated) more immutable inputs, label → ``s3://bucket/key`` or local path.
    :param experiment_key: (templated) the StudioML experiment key; default
        ``<dag_id>_<run_id>_<task_id>[_<map_index>]`` made safe for S3 (no ``/``). Retries
        reuse it, so results land in one place.
    :param results_bucket: (templated) bucket for blobs and results; default the connection's
        ``service_config.s3.bucket_name`` extra.
    :param aws_conn_id: AWS connection for S3. For SeaweedFS or MinIO, set its
        ``endpoint_url`` extra; runners then address ``s3://host:port/bucket/key``.
    :param pythonver: (templated) workload Python ``major.minor``; default the worker's.
    :param pythonenv: (templated) requirement lines for the workload's virtualenv.
    :param pip: (templated) extra packages (``config.pip``).
    :param resources_needed: (templated) StudioML resources: ``cpus``, ``ram``, ``hdd``,
        ``gpus``, ``gpuCount``, ``gpuMem``. (Not ``resources``: that name is BaseOperator's.)
    :param max_duration: (templated) per-attempt limit (``"2h"``, seconds, timedelta).
    :param lifetime: (templated) ``experimentLifetime``: give up on the work after this long.
    :param project: (templated) StudioML project.
    :param env: (templated) the workload's environment (``config.env``), not the pod's.
    :param fail_on_experiment_error: False returns the summary of an experiment that did not
        succeed instead of failing the task. A runner that left no summary (pod never ran,
        runner crashed) still fails the task.
    :param s3_credentials_secret: Kubernetes Secret holding the runner's S3 keys; None when the
        pod gets them otherwise (IRSA, instance role).
    :param s3_credentials_secret_keys: pod variable → key in that Secret; default
        ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` under the same names.
    :param message_keys_conn_id: a ``studio_message_keys`` connection: the request is then
        encrypted for the runner's RSA key and signed with the connection's Ed25519 key, so
        ``REQUEST_JSON`` in the pod spec holds only the envelope and the rendered
        ``studio_request`` is redacted. The pod mounts ``runner_key_secret`` and
        ``request_signers_secret`` for the runner (``--encrypt-dir``,
        ``--request-signatures-dir``); a local runner gets the connection's
        ``runner_private_key`` in a private folder that is removed after the run. Not templated:
        key material never passes through a rendered field.
    :param cache: reuse a succeeded result instead of running: before launching anything the
        request's fingerprint (``studio_runner.memo.fingerprint``: input content, script, args,
        interpreter, ``pythonenv``, ``pip``, ``env``, ``cache_version``; not the key, time or
        resources) is looked up in ``memo/<fingerprint>.json`` of the results bucket; a hit
        returns that run's summary with ``reused_from`` set to its experiment key. A succeeded
        run records itself there; a failed, cancelled or timed-out one never does. Off by
        default: only deterministic workloads without side effects should be skipped.
    :param cache_version: (templated) part of the fingerprint; change it to invalidate results
        when something the request does not name changed (code fetched at run time, a dataset).
    :param runner_key_secret: Kubernetes Secret with the runner's ``ssh-privatekey`` and
        ``ssh-passphrase`` (deploy/'s ``studio-runner-message-key``).
    :param request_signers_secret: Kubernetes Secret with the trusted signers' ``ssh-ed25519``
        public keys, one per file (deploy/'s ``studio-runner-request-signers``).

    The remaining arguments (``execution_mode``, ``runner_image``, ``runner_options`` such as
    ``["--installer", "uv"]``, ``gpu_node_selector``, ``gpu_tolerations``, ``shm_size``,
    ``local_kill_grace_period``, ``env_cache_uri``, ``env_cache_volume``) are
    :class:`~airflow_provider_studio.operators.runner_pod.StudioRunnerPodOperator`'s.

    Mapped experiments read best with ``map_index_template``; the operator puts the key in the
    context as ``experiment_key``::

        StudioExperimentOperator.partial(
            task_id="evaluate",
            script="train.py",
            workspace="/opt/airflow/dags/enn/workspace",
            results_bucket="studio-results",
            resources_needed={"cpus": 4, "ram": "16g", "gpus": 1},
            map_index_template="{{ experiment_key }}",   # or "genome {{ task.args[1] }}"
            fail_on_experiment_error=False,
        ).expand(args=[["--genome", "g-001"], ["--genome", "g-002"]])
    """

    template_fields: Sequence[str] = (
        *KubernetesPodOperator.template_fields,
        "experiment_key",
        "script",
        "module",
        "args",
        "workspace",
        "inputs",
        "pythonver",
        "pythonenv",
        "pip",
        "resources_needed",
        "max_duration",
        "lifetime",
        "project",
        "env",
        "results_bucket",
        "cache_version",
        "studio_request",
    )
    template_fields_renderers = {
        **KubernetesPodOperator.template_fields_renderers,
        "studio_request": "json",
        "env": "json",
        "resources_needed": "json",
        "args": "json",
        "inputs": "json",
    }
    operator_extra_links = (StudioArtifactsLink(),)
    overwrite_rtif_after_execution = True
    """Rendered fields are re-sent at task end, so they show the request that actually ran."""
    ui_color = "#d9ecd0"
    ui_fgcolor = "#1f3b12"
    local_reserved_env = _RUNNER_OPTION_ENV
    runner_subcommand = "run"
    summary_type = RunSummary

    def __init__(
        self,
        *,
        script: str | None = None,
        module: str | None = None,
        args: Sequence[Any] | str | None = None,
        workspace: str | os.PathLike[str] | None = None,
        inputs: Mapping[str, str] | None = None,
        experiment_key: str | None = None,
        results_bucket: str | None = None,
        pythonver: str | None = None,
        pythonenv: Sequence[str] | None = None,
        pip: Sequence[str] | None = None,
        max_duration: str | float | None = None,
        lifetime: str | float | None = None,
        project: str | None = None,
        env: Mapping[str, Any] | None = None,
        fail_on_experiment_error: bool = True,
        s3_credentials_secret: str | None = DEFAULT_CREDENTIALS_SECRET,
        s3_credentials_secret_keys: Mapping[str, str] | None = None,
        message_keys_conn_id: str | None = None,
        runner_key_secret: str = DEFAULT_RUNNER_KEY_SECRET,
        request_signers_secret: str = DEFAULT_REQUEST_SIGNERS_SECRET,
        cache: bool = False,
        cache_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.script = script
        self.module = module
        self.args = args
        self.workspace = os.fspath(workspace) if isinstance(workspace, os.PathLike) else workspace
        self.inputs = {k: os.fspath(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs
        self.experiment_key = experiment_key
        self.results_bucket = results_bucket
        self.pythonver = pythonver
        self.pythonenv = pythonenv
        self.pip = pip
        self.max_duration = max_duration
        self.lifetime = lifetime
        self.project = project
        self.env = env
        self.fail_on_experiment_error = fail_on_experiment_error
        self.cache = cache
        self.cache_version = cache_version
        self.studio_request: dict[str, Any] | None = None
        """The request that ran (set when the task runs; shown under Rendered Templates)."""

        super().__init__(
            aws_credentials_secret=s3_credentials_secret,
            aws_credentials_secret_keys=s3_credentials_secret_keys,
            **kwargs,
        )
        self._s3_endpoint: S3Endpoint | None = None
        self.message_keys_conn_id = message_keys_conn_id
        self.runner_key_secret = runner_key_secret
        self.request_signers_secret = request_signers_secret
        self._message_keys: RequestSealingKeys | None = None
        self._request_json: str | None = None
        """What the runner is given: the request's JSON, or its sealed envelope."""
        self._request: Request | None = None
        self._fingerprint: str | None = None

    # --- the request -------------------------------------------------------------------------

    def prepare_request(self, context: Context) -> Request:
        """Build the request (uploading the workspace if the store lacks it) and remember it.

        Called by ``execute``; call it yourself before ``build_pod_request_obj`` to see the pod
        exactly as it would run. A request that cannot run fails the task without retries.
        """
        key = self._experiment_key(context)
        self._hook = hook = S3Hook(aws_conn_id=self.aws_conn_id)
        bucket = self.results_bucket or hook.service_config.get("bucket_name")
        if not bucket:
            raise AirflowFailException(
                "no results bucket: pass results_bucket, or set service_config.s3.bucket_name in the "
                f"extra of AWS connection {self.aws_conn_id!r}"
            )
        try:
            spec = ExperimentSpec(
                key=key,
                script=self.script,
                module=self.module,
                args=self.args,
                workspace=self.workspace,
                pythonver=self.pythonver,
                pythonenv=self.pythonenv,
                pip=self.pip,
                resources=self.resources_needed,
                max_duration=self.max_duration,
                lifetime=self.lifetime,
                project=self.project,
                inputs=self.inputs,
                env=self.env,
            )
            builder = RequestBuilder(hook, bucket)
            request = builder.build(spec)
        except (ValueError, RequestError) as error:  # pydantic's ValidationError is a ValueError
            raise AirflowFailException(f"experiment {key}: {error}") from None
        self._s3_endpoint = builder.endpoint
        self.experiment_key = key
        self.results_bucket = bucket
        self.studio_request = request.to_wire()
        self._request_json = request.to_json()
        if self.message_keys_conn_id:
            keys = self._keys()
            self._request_json = keys.seal(self._request_json)
            # Rendered fields live in Airflow's database and UI: no readable secrets there either.
            self.studio_request = request.redacted()
            self.log.info(
                "experiment %s: request encrypted for the runner key of %s and signed by %s",
                key,
                self.message_keys_conn_id,
                keys.signer_fingerprint,
            )
        self.log.info(
            "experiment %s: results in s3://%s/%s at %s",
            key,
            bucket,
            results_prefix(key),
            builder.endpoint.browse_url,
        )
        return request

    def _experiment_key(self, context: Context) -> str:
        """The key, also put in the context so ``map_index_template="{{ experiment_key }}"`` works."""
        key = self.experiment_key
        if not key:
            ti = context.get("ti")
            if ti is not None:
                key = default_experiment_key(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))
            else:
                key = default_experiment_key(
                    self.dag_id, str(context.get("run_id") or "manual"), self.task_id
                )
        context["experiment_key"] = key  # type: ignore[typeddict-unknown-key]
        return key

    # --- running -----------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self._request = self._fingerprint = None
        if self.cache:
            reused = self._reuse(context)
            if reused is not None:
                return reused
        return super().execute(context)

    def prepare_run(self, context: Context) -> None:
        if self._request is None:  # not built already by the cache lookup
            self._request = self.prepare_request(context)

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        self._experiment_key(context)  # a fresh operator: the key (and the context's) again
        return super().trigger_reentry(context, event)

    # --- memoization -------------------------------------------------------------------------

    def _reuse(self, context: Context) -> dict[str, Any] | None:
        """The XCom value of a succeeded run with this request's fingerprint, None to run it."""
        self._request = request = self.prepare_request(context)
        fp = self._fingerprint = self._fingerprint_of(request)
        found = self._result_index().lookup(fp)
        if found is None:
            self.log.info(
                "experiment %s: no succeeded result for fingerprint %s; running it", request.key, fp
            )
            return None
        summary = found.model_copy(update={"key": request.key, "reused_from": found.key})
        self.log.info(
            "experiment %s: reusing the succeeded result of experiment %s (fingerprint %s, cache=True); "
            "nothing launched. Its scrape document: %s",
            request.key,
            found.key,
            fp,
            found.scrape_uri,
        )
        return summary.to_value()

    def _fingerprint_of(self, request: Request) -> str:
        """The request's fingerprint (the one home: ``studio_runner.memo.Fingerprinter``)."""
        try:
            return Fingerprinter(self._hook.get_conn(), cache_version=self.cache_version or "").of(request)
        except FingerprintError as error:
            raise AirflowFailException(f"experiment {request.key}: {error}") from None

    def _result_index(self) -> ResultIndex:
        assert self.results_bucket, "prepare_request() sets the bucket"
        return ResultIndex(self._hook.get_conn(), self.results_bucket)

    def _record(self, summary: RunSummary, context: Context) -> None:
        """Index a succeeded run; a store that refuses loses only the reuse, never the result."""
        try:
            if self._fingerprint is None:  # deferred: a fresh operator rebuilds the same request
                self._request = self.prepare_request(context)
                self._fingerprint = self._fingerprint_of(self._request)
            key = self._result_index().record(self._fingerprint, summary)
        except Exception as error:  # storage errors included: the run itself succeeded
            self.log.warning("experiment %s: result not recorded for reuse: %r", summary.key, error)
            return
        self.log.info(
            "experiment %s: result recorded for reuse as s3://%s/%s", summary.key, self.results_bucket, key
        )

    def describe_run(self) -> str:
        return f"experiment {self.experiment_key}"

    def conclude(self, summary: RunSummary, context: Context, *, cause: BaseException | None = None) -> Any:
        """The summary when the experiment succeeded (or failures are tolerated); else the
        runner's reason fails the task, without retries for a refused request."""
        value = summary.to_value()
        key = summary.key or self.experiment_key
        if summary.succeeded:
            self.log.info(
                "experiment %s succeeded in %ss; results: %s",
                key,
                summary.duration_seconds,
                ", ".join(sorted(summary.artifacts)) or "none",
            )
            if self.cache:
                self._record(summary, context)
            return value
        reason = summary.reason or f"exit code {summary.exit_code}"
        message = f"experiment {key} {summary.status.value}: {reason}"
        if not self.fail_on_experiment_error:
            self.log.warning("%s; returning its summary (fail_on_experiment_error=False)", message)
            return value
        if cause is None and context.get("ti") is not None:
            # as KPO does on a failed pod: the summary stays readable in XCom
            context["ti"].xcom_push(key="return_value", value=value)
        error_class = StudioRequestRefused if summary.status is Status.INVALID else StudioExperimentFailed
        raise error_class(message, value) from cause

    # --- the pod -----------------------------------------------------------------------------

    def subcommand_options(self, *, kubernetes: bool) -> list[str]:
        endpoint = self._s3_endpoint
        options = ["--s3-https"] if endpoint is not None and endpoint.https else []
        if kubernetes:  # the request is in REQUEST_JSON
            return [*options, *(message_key_arguments() if self.message_keys_conn_id else [])]
        # no GPU asked for: no GPU probe (and its warning) on a CPU worker
        cpu_only = [] if self._resources().cards else ["--cpu-only"]
        return ["--request", "-", *options, *cpu_only]

    def runner_region(self) -> str | None:
        return self._s3_endpoint.region if self._s3_endpoint is not None else None

    def pod_environment(self) -> dict[str, str]:
        """The request (or its sealed envelope) in ``REQUEST_JSON``."""
        if self._request_json is None:
            return {}
        size = len(self._request_json.encode())
        if size > MAX_POD_REQUEST_BYTES:
            raise AirflowFailException(
                f"the request is {size} bytes, more than one environment variable can hold "
                f"({MAX_POD_REQUEST_BYTES}); shorten pythonenv, env or args"
            )
        return {"REQUEST_JSON": self._request_json}

    def default_env_cache_uri(self) -> str | None:
        """``studio-env-cache/`` in the results bucket, on the store the request names."""
        if self._s3_endpoint is None or not self.results_bucket:
            return super().default_env_cache_uri()
        return self._s3_endpoint.qualified(self.results_bucket, ENV_CACHE_PREFIX)

    def pod_annotations(self) -> dict[str, str]:
        return {"studioml/experiment-key": self.experiment_key} if self.experiment_key else {}

    def _shape_pod(self) -> None:
        """The common runner pod, plus the runner's key and signers for a sealed request."""
        super()._shape_pod()
        if self.message_keys_conn_id:
            self._mount_message_keys()

    def _mount_message_keys(self) -> None:
        """The runner's decryption key and trusted signers, from Secrets, for a sealed request."""
        volumes = list(self.volumes or [])
        names = {volume.name for volume in volumes}
        new_volumes = message_key_volumes(self.runner_key_secret, self.request_signers_secret)
        self.volumes = volumes + [volume for volume in new_volumes if volume.name not in names]
        mounts = list(self.volume_mounts or [])
        names = {mount.name for mount in mounts}
        self.volume_mounts = mounts + [mount for mount in message_key_mounts() if mount.name not in names]
        if not self.security_context:
            # the Secret's 0440 files belong to this group, as in deploy/
            self.security_context = k8s.V1PodSecurityContext(fs_group=RUNNER_GID)

    def _keys(self) -> RequestSealingKeys:
        if self._message_keys is None:
            try:
                self._message_keys = StudioMessageKeysHook(self.message_keys_conn_id).get_keys()
            except MessageKeysError as error:
                raise AirflowFailException(str(error)) from None
        return self._message_keys

    # --- local mode --------------------------------------------------------------------------

    @contextlib.contextmanager
    def local_inputs(self, env: dict[str, str]) -> Iterator[bytes | None]:
        """The request on stdin; for a sealed one, the runner's key in private folders."""
        with contextlib.ExitStack() as stack:
            if self.message_keys_conn_id:
                try:
                    encrypt_dir, signers_dir = stack.enter_context(self._keys().local_runner_folders())
                except MessageKeysError as error:
                    raise AirflowFailException(str(error)) from None
                # in the environment, not the command line: the runner hides its environment
                # from workloads, while any process can read its command line
                env["ENCRYPT_DIR"], env["REQUEST_SIGNATURES_DIR"] = str(encrypt_dir), str(signers_dir)
            assert self._request_json is not None, "prepare_request() sets the request"
            yield self._request_json.encode()
