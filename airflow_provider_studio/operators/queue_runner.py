"""Runner capacity as a task: one ``studio-runner serve`` that drains StudioML queues, then exits.

Teams that keep their StudioML scripts (``studio run --queue=rmq_…``, ``CompletionService``)
queue work themselves; what they need from Airflow is runners. This operator starts one, in a
GPU pod or on the worker (``[studio] execution_mode``), that takes requests from the queues
matching ``queue_match`` and exits once it has had nothing to do for ``limit_idle_duration`` (or
after ``limit_tasks``), as the upstream queue-scaler's Kubernetes Jobs did. Map it to start
several. The experiments are the clients': they get their results through S3 and the queue as
usual, and the task only reports what its runner handled.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException
from studio_runner.summary import ServeSummary
from studio_runner.units import parse_seconds

from airflow_provider_studio.hooks.rabbitmq import StudioRabbitMQHook
from airflow_provider_studio.operators.runner_pod import DEFAULT_CREDENTIALS_SECRET, StudioRunnerPodOperator

QUEUE_BACKENDS = ("rmq", "sqs")
"""StudioML's queue-name prefixes (``rmq_``, ``sqs_``), which are also the runner's transports."""
DEFAULT_LIMIT_IDLE_DURATION = "2m"
DEFAULT_RABBITMQ_SECRET = "studio-rabbitmq-credentials"
DEFAULT_RABBITMQ_SECRET_KEY = "password"
AMQP_PASSWORD_ENV = "AMQP_PASSWORD"
"""``studio-runner serve --amqp-password`` from the environment: the broker password, kept out of
the AMQP URL so that the URL can sit in the pod spec and the task log."""
STOP_GRACE_SECONDS = 120
"""SIGTERM to exit: the runner's 30 s for the workload, 60 s for its uploads, and some slack
before its work is given back to the queue. The pod's grace period and the local kill both wait this."""

_SERVE_OPTION_ENV = frozenset(
    {
        "AMQP_URL",
        AMQP_PASSWORD_ENV,
        "AMQP_MGT_URL",
        "QUEUE_MATCH",
        "QUEUE_MISMATCH",
        "QUEUE_ROOT",
        "SQS_CERTS",
        "SQS_ENDPOINT",
        "SQS_REGION",
        "LIMIT_TASKS",
        "LIMIT_IDLE_DURATION",
        "MAX_ATTEMPTS",
        "STATE_FILE",
        "RESULT_FILE",
        "WORKING_DIR",
        "CACHE_DIR",
        "PROM_ADDRESS",
    }
)
"""Options ``serve`` also reads from its environment that the operator sets itself: a worker's
own values (a developer's ``AMQP_URL``, say) must not redirect a local runner."""


@dataclass(frozen=True)
class _Brokers:
    """Where the runner takes work from, as read from the connections when the task runs."""

    amqp_url: str | None = None
    """Without the password, which travels separately (Secret or child environment)."""
    amqp_password: str | None = None
    management_url: str | None = None
    sqs_endpoint: str | None = None
    region: str | None = None


class StudioQueueRunnerOperator(StudioRunnerPodOperator):
    """Start one ``studio-runner serve`` that drains the queues matching ``queue_match``, until idle.

    Returns (pushes as XCom) what the runner did::

        {"queue_match": "^rmq_team_a_.*$", "ended_by": "limit_idle", "handled": 3,
         "statuses": {"succeeded": 3}, "settle_failures": 0, "abandoned": 0,
         "experiments": [{"key": "...", "queue": "rmq_team_a_x", "attempt": 1, "status": "succeeded"}]}

    ``handled`` and ``statuses`` count every attempt; ``experiments`` lists the latest 100. An
    experiment that fails is the client's business (the runner retries it, then dead-letters
    it to ``<queue>_rejected``) and does not fail the task; a runner that cannot start does.

    **Kubernetes mode**: a pod of ``runner_image`` sized by ``resources_needed`` (GPU limit, node
    selector and toleration, CPU and memory requests, which also cap what the runner offers to
    experiments). The AMQP URL in its arguments carries no password: the runner reads it from
    ``AMQP_PASSWORD``, a ``secretKeyRef`` to ``rabbitmq_password_secret``; AWS keys (SQS, and
    S3 for requests without their own credentials) come from ``aws_credentials_secret`` the same
    way. SIGTERM (task killed, pod deleted) makes the runner give unfinished work back.

    **Local mode**: the same command on the worker, with the broker password and the AWS
    connection's keys in its environment only, and its log in the task log.

    :param queue_match: (templated) regular expression a queue name must match, e.g.
        ``^rmq_team_a_.*$``, or ``^rmq_team_a_gpu$`` for exactly one queue (see :func:`exactly`).
    :param queue_backends: which brokers to serve: ``"rmq"`` (RabbitMQ, through
        ``rabbitmq_conn_id``) and/or ``"sqs"`` (SQS, through ``aws_conn_id``).
    :param queue_mismatch: (templated) regular expression a queue name must not match.
    :param rabbitmq_conn_id: ``studio_rabbitmq`` connection: host, port, vhost, login, TLS and the
        management URL (runners discover queues through the management API).
    :param aws_conn_id: AWS connection: SQS region and ``endpoint_url``; its keys for a local runner.
    :param limit_idle_duration: (templated) exit after this long without work (``"2m"``,
        seconds, timedelta). 0 only together with ``limit_tasks``.
    :param limit_tasks: (templated) exit after this many experiments (0: no limit).
    :param max_attempts: (templated) attempts before a failing experiment is dead-lettered.
    :param resources_needed: (templated) the runner's own size, in StudioML terms
        (``{"cpus": 8, "ram": "32Gi", "gpus": 1, "gpuCount": 2}``); none asks for no GPU and
        starts the runner with ``--cpu-only``.
    :param rabbitmq_password_secret: Secret holding the broker password for the pod; None for a
        broker that needs none.
    :param rabbitmq_password_secret_key: key of the password in that Secret.
    :param aws_credentials_secret: Secret holding the pod's AWS keys; None for IRSA or an
        instance role. ``aws_credentials_secret_keys``: pod variable → key in that Secret.

    The remaining arguments (``execution_mode``, ``runner_image``, ``runner_options``,
    ``gpu_node_selector``, ``gpu_tolerations``, ``shm_size``, ``local_kill_grace_period``)
    are :class:`~airflow_provider_studio.operators.runner_pod.StudioRunnerPodOperator`'s, and
    every KubernetesPodOperator argument given explicitly wins. Start N runners by mapping::

        StudioQueueRunnerOperator.partial(
            task_id="drain", resources_needed={"gpus": 1}, limit_idle_duration="5m"
        ).expand(queue_match=[exactly("rmq_team_a_gpu")] * 3)
    """

    template_fields: Sequence[str] = (
        *StudioRunnerPodOperator.template_fields,
        "queue_match",
        "queue_mismatch",
        "limit_idle_duration",
        "limit_tasks",
        "max_attempts",
    )
    template_fields_renderers = {
        **StudioRunnerPodOperator.template_fields_renderers,
        "resources_needed": "json",
    }
    ui_color = "#f3e3c3"
    ui_fgcolor = "#4a3208"
    local_reserved_env = _SERVE_OPTION_ENV
    runner_subcommand = "serve"
    summary_type = ServeSummary

    def __init__(
        self,
        *,
        queue_match: str,
        queue_backends: Sequence[str] = ("rmq",),
        queue_mismatch: str | None = None,
        rabbitmq_conn_id: str = StudioRabbitMQHook.default_conn_name,
        aws_conn_id: str | None = "aws_default",
        limit_idle_duration: str | float | timedelta = DEFAULT_LIMIT_IDLE_DURATION,
        limit_tasks: int | str = 0,
        max_attempts: int | str = 3,
        resources_needed: Mapping[str, Any] | str | None = None,
        rabbitmq_password_secret: str | None = DEFAULT_RABBITMQ_SECRET,
        rabbitmq_password_secret_key: str = DEFAULT_RABBITMQ_SECRET_KEY,
        aws_credentials_secret: str | None = DEFAULT_CREDENTIALS_SECRET,
        aws_credentials_secret_keys: Mapping[str, str] | None = None,
        local_kill_grace_period: float = float(STOP_GRACE_SECONDS),
        **kwargs: Any,
    ) -> None:
        backends = [queue_backends] if isinstance(queue_backends, str) else list(queue_backends)
        unknown = sorted(set(backends) - set(QUEUE_BACKENDS))
        if not backends or unknown:
            raise ValueError(f"queue_backends must name one or more of {QUEUE_BACKENDS}, not {backends!r}")
        self.queue_match = queue_match
        self.queue_backends = tuple(dict.fromkeys(backends))
        self.queue_mismatch = queue_mismatch
        self.rabbitmq_conn_id = rabbitmq_conn_id
        self.limit_idle_duration = limit_idle_duration
        self.limit_tasks = limit_tasks
        self.max_attempts = max_attempts
        self.rabbitmq_password_secret = rabbitmq_password_secret
        self.rabbitmq_password_secret_key = rabbitmq_password_secret_key
        kwargs.setdefault("termination_grace_period", STOP_GRACE_SECONDS)
        super().__init__(
            resources_needed=resources_needed,
            aws_conn_id=aws_conn_id,
            aws_credentials_secret=aws_credentials_secret,
            aws_credentials_secret_keys=aws_credentials_secret_keys,
            local_kill_grace_period=local_kill_grace_period,
            **kwargs,
        )
        # also when the caller chose the other secrets: the pod's only way to the broker password
        serves_rabbitmq = "rmq" in self.queue_backends and rabbitmq_password_secret
        if serves_rabbitmq and not any(s.deploy_target == AMQP_PASSWORD_ENV for s in self.secrets):
            self.secrets = [  # a new list: the caller's may be shared by other tasks
                *self.secrets,
                Secret("env", AMQP_PASSWORD_ENV, rabbitmq_password_secret, rabbitmq_password_secret_key),
            ]
        self._brokers: _Brokers | None = None

    # --- running -----------------------------------------------------------------------------

    def prepare_run(self, context: Context) -> None:
        self._brokers = None
        self._serve_options(kubernetes=False)  # bad settings fail here, before a pod is started

    def describe_run(self) -> str:
        return f"studio-runner serve for {self.queue_match!r}"

    def conclude(self, summary: ServeSummary, context: Context, *, cause: BaseException | None = None) -> Any:
        """What the runner handled, with the pattern it served; its experiments' failures are
        the clients' business, not the task's."""
        summary = summary.model_copy(update={"queue_match": self.queue_match})
        counted = ", ".join(f"{count} {status}" for status, count in sorted(summary.statuses.items()))
        self.log.info(
            "studio-runner ended (%s) after %s experiment attempt(s)%s",
            summary.ended_by or "?",
            summary.handled,
            f": {counted}" if counted else "",
        )
        if summary.abandoned or summary.settle_failures:
            self.log.warning(
                "%s attempt(s) abandoned and %s not settled with the broker: the broker redelivers them",
                summary.abandoned,
                summary.settle_failures,
            )
        return summary.to_value()

    @contextlib.contextmanager
    def local_inputs(self, env: dict[str, str]) -> Iterator[bytes | None]:
        """The broker password, in the child's environment only."""
        password = self._brokers_from_connections().amqp_password
        if password is not None:
            env[AMQP_PASSWORD_ENV] = password
        yield None

    # --- the runner's command ----------------------------------------------------------------

    def subcommand_options(self, *, kubernetes: bool) -> list[str]:
        # several local runners share a worker; runner_options may still choose a port
        return [
            *([] if kubernetes else ["--prom-address", "off"]),
            *self._serve_options(kubernetes=kubernetes),
        ]

    def _serve_options(self, *, kubernetes: bool) -> list[str]:
        """What to serve and when to stop, checked; bad settings fail the task without retries."""
        match = _pattern("queue_match", self.queue_match)
        if match is None:
            raise AirflowFailException("queue_match is empty; give a pattern such as '^rmq_team_a_.*$'")
        mismatch = _pattern("queue_mismatch", self.queue_mismatch)
        idle = _seconds("limit_idle_duration", self.limit_idle_duration)
        tasks = _whole("limit_tasks", self.limit_tasks, minimum=0)
        attempts = _whole("max_attempts", self.max_attempts, minimum=1)
        if not idle and not tasks:
            raise AirflowFailException(
                "limit_idle_duration and limit_tasks are both 0: the runner would never exit; "
                f"set limit_idle_duration (e.g. {DEFAULT_LIMIT_IDLE_DURATION!r})"
            )
        options = ["--queue-match", match]
        if mismatch is not None:
            options += ["--queue-mismatch", mismatch]
        options += [
            "--limit-idle-duration",
            f"{idle:g}",
            "--limit-tasks",
            str(tasks),
            "--max-attempts",
            str(attempts),
        ]
        brokers = self._brokers_from_connections()
        if brokers.amqp_url:
            options += ["--amqp-url", brokers.amqp_url]
            if brokers.management_url:
                options += ["--amqp-mgt-url", brokers.management_url]
        if brokers.sqs_endpoint:
            options += ["--sqs-endpoint", brokers.sqs_endpoint]
            if brokers.region:
                options += ["--sqs-region", brokers.region]
        resources = self._resources()
        if not resources.cards:
            options.append("--cpu-only")  # a runner without GPUs must not wait for one
        if kubernetes:
            # what the pod was scheduled with is what the runner may promise to experiments
            if resources.cpus:
                options += ["--max-cores", str(resources.cpus)]
            if resources.ram_bytes:
                options += ["--max-mem", str(resources.ram_bytes)]
        return options

    def _brokers_from_connections(self) -> _Brokers:
        """Broker URLs and regions from the connections, read once per task run."""
        if self._brokers is not None:
            return self._brokers
        amqp_url = password = management_url = None
        if "rmq" in self.queue_backends:
            hook = StudioRabbitMQHook(self.rabbitmq_conn_id)
            settings = hook.settings()
            amqp_url = settings.amqp_url(include_password=False)
            password = settings.password or None
            management_url = hook.management_url
        region = sqs_endpoint = None
        if self.aws_conn_id or "sqs" in self.queue_backends:
            config = self._aws_hook().conn_config
            region = config.region_name
            if "sqs" in self.queue_backends:
                sqs_endpoint = config.get_service_endpoint_url("sqs")
                if not sqs_endpoint:
                    if not region:
                        raise AirflowFailException(
                            f"SQS queues need a region: set region_name in the extra of AWS connection "
                            f"{self.aws_conn_id!r} (or its endpoint_url for an SQS-compatible server)"
                        )
                    sqs_endpoint = f"https://sqs.{region}.amazonaws.com"
        self._brokers = _Brokers(amqp_url, password, management_url, sqs_endpoint, region)
        return self._brokers

    # --- the pod -----------------------------------------------------------------------------

    def runner_region(self) -> str | None:
        return self._brokers_from_connections().region

    def pod_annotations(self) -> dict[str, str]:
        return {"studioml/queue-match": str(self.queue_match)} if self.queue_match else {}


def exactly(queue: str) -> str:
    """A ``queue_match`` pattern for one queue and no other."""
    return f"^{re.escape(queue)}$"


def _pattern(name: str, value: Any) -> str | None:
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    try:
        re.compile(text)
    except re.error as error:
        raise AirflowFailException(f"{name} {text!r} is not a regular expression: {error}") from None
    return text


def _seconds(name: str, value: Any) -> float:
    try:
        seconds = parse_seconds(value if value not in (None, "") else 0)
    except ValueError as error:
        raise AirflowFailException(f"{name}: {error}") from None
    if seconds < 0:
        raise AirflowFailException(f"{name} must not be negative, not {value!r}")
    return seconds


def _whole(name: str, value: Any, *, minimum: int) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise AirflowFailException(f"{name} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise AirflowFailException(f"{name} must be {minimum} or more, not {number}")
    return number
