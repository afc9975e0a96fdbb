"""Queue-driven runner capacity: when StudioML clients queue experiments, start runners that drain them.

Experimenters keep their own scripts (``studio run --queue=rmq_…``, ``CompletionService``) and
queue work themselves. This DAG is the standing watcher that gives that work runners, as the
upstream queue-scaler did with Kubernetes Jobs:

1. ``wait_for_experiments`` (deferrable: it waits in the triggerer, holding no worker slot)
   fires once ``params.queue`` holds ``params.min_messages`` requests. It consumes nothing and
   reports the depth and what the first requests ask for.
2. ``plan_runners`` turns that into a number of runners (the rule below).
3. ``drain`` starts them: a mapped ``StudioQueueRunnerOperator``, one ``studio-runner serve`` each
   (a pod, or a process on the worker in ``local`` mode), serving exactly ``params.queue`` with
   ``params.gpus_per_runner`` GPUs and exiting once the queue has given it nothing for
   ``params.idle_duration``.
4. ``summarise`` counts the experiments the runners handled, by status.

**How many runners.** One per ``experiments_per_runner`` queued requests, rounded up. For GPU
runners, no more than the queued work's GPUs can keep busy: the backlog's cards (the mean over
the peeked requests times the depth) over ``gpus_per_runner``, rounded up. At least one runner
when anything is queued, and never more than ``max_runners``. So 7 requests at 2 per runner
start 4 runners; if each asks for 1 GPU and runners have 4, only 2.

**Schedule.** ``@continuous`` with ``max_active_runs=1`` (which ``@continuous`` requires): a run is
one burst of work (wait, drain, summarise) and the next run starts waiting as soon as it ends.
While nothing is queued a run costs one deferred sensor in the triggerer. One run at a time
means a backlog is never counted twice, so at most ``max_runners`` runners serve the queue;
work arriving while they drain is theirs. Scheduled runs use the defaults below (set them for
your deployment); a manual run from the trigger form (another queue, say) starts when the
current run ends, which while idle is at most ``SENSOR_TIMEOUT``, after which the sensor is
skipped and a fresh run waits again.

Parsing this file does no I/O: connections and the queue are read only when tasks run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import DAG, Param, TriggerRule, task
from airflow.sdk.exceptions import AirflowException

from airflow_provider_studio.hooks.queue import queue_backend
from airflow_provider_studio.operators.queue_runner import StudioQueueRunnerOperator, exactly
from airflow_provider_studio.sensors.queue import StudioQueueSensor

RABBITMQ_CONN_ID = "studio_rabbitmq_default"
AWS_CONN_ID = "aws_default"
POLL_SECONDS = 15.0
SENSOR_TIMEOUT = timedelta(hours=6)

log = logging.getLogger(__name__)


def runner_count(
    depth: int,
    resources: Mapping[str, int],
    *,
    experiments_per_runner: int,
    max_runners: int,
    gpus_per_runner: int,
) -> int:
    """How many runners a backlog of ``depth`` requests gets (the rule in the module docstring)."""
    if depth <= 0:
        return 0
    wanted = math.ceil(depth / experiments_per_runner)
    peeked = int(resources.get("requests") or 0)
    if gpus_per_runner > 0 and peeked:
        backlog_cards = int(resources.get("cards") or 0) / peeked * depth
        wanted = min(wanted, math.ceil(backlog_cards / gpus_per_runner))
    return max(1, min(wanted, max_runners))


with DAG(
    dag_id="studio_queue_capacity",
    description="Start StudioML runners for experiments queued by clients; they exit when the queue is idle",
    schedule="@continuous",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["studioml", "capacity"],
    doc_md=__doc__,
    params={
        "queue": Param(
            "rmq_studio_experiments",
            type="string",
            pattern=r"^(rmq|sqs)_[A-Za-z0-9_.\-]+$",
            title="Queue",
            description="StudioML queue to watch and drain: rmq_… (RabbitMQ) or sqs_… (SQS).",
        ),
        "min_messages": Param(
            1, type="integer", minimum=1, title="Min messages", description="Requests to wait for."
        ),
        "experiments_per_runner": Param(
            2,
            type="integer",
            minimum=1,
            title="Experiments per runner",
            description="One runner per this many queued requests (rounded up).",
        ),
        "max_runners": Param(
            4, type="integer", minimum=1, maximum=64, title="Max runners", description="Upper bound."
        ),
        "gpus_per_runner": Param(
            1,
            type="integer",
            minimum=0,
            maximum=16,
            title="GPUs per runner",
            description="0 starts CPU-only runners.",
        ),
        "cpus_per_runner": Param(4, type="integer", minimum=1, title="CPUs per runner"),
        "memory_per_runner": Param(
            "16Gi", type="string", title="Memory per runner", description="e.g. 16Gi, 64g."
        ),
        "idle_duration": Param(
            "2m",
            type="string",
            pattern=r"^([0-9.]+(ns|us|ms|s|m|h)?)+$",
            title="Idle duration",
            description="A runner exits after this long without work (90s, 2m, 1h).",
        ),
    },
):
    waiting = StudioQueueSensor(
        task_id="wait_for_experiments",
        queue_name="{{ params.queue }}",
        min_messages="{{ params.min_messages }}",
        rabbitmq_conn_id=RABBITMQ_CONN_ID,
        aws_conn_id=AWS_CONN_ID,
        missing_queue="wait",  # a client creates its queue when it first submits
        poll_interval=POLL_SECONDS,
        timeout=SENSOR_TIMEOUT.total_seconds(),
        soft_fail=True,
        deferrable=True,
    )

    @task
    def plan_runners(found: dict[str, Any], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One set of runner arguments per runner to start."""
        assert params is not None
        queue = found["queue"]
        resources = found.get("resources") or {}
        gpus = int(params["gpus_per_runner"])
        count = runner_count(
            int(found["depth"]),
            resources,
            experiments_per_runner=int(params["experiments_per_runner"]),
            max_runners=int(params["max_runners"]),
            gpus_per_runner=gpus,
        )
        if resources.get("cards") and not gpus:
            log.warning(
                "the queued requests ask for GPUs but gpus_per_runner is 0: CPU runners will not take them"
            )
        size: dict[str, Any] = {"cpus": int(params["cpus_per_runner"]), "ram": params["memory_per_runner"]}
        if gpus:
            size |= {"gpus": 1, "gpuCount": gpus}
        log.info("%s request(s) in %s (%s): starting %d runner(s)", found["depth"], queue, resources, count)
        runner = {
            "queue_match": exactly(queue),
            "queue_backends": [queue_backend(queue)],
            "resources_needed": size,
        }
        return [dict(runner) for _ in range(count)]

    plan = plan_runners(waiting.output)

    drained = StudioQueueRunnerOperator.partial(
        task_id="drain",
        rabbitmq_conn_id=RABBITMQ_CONN_ID,
        aws_conn_id=AWS_CONN_ID,
        limit_idle_duration="{{ params.idle_duration }}",
        deferrable=True,  # Kubernetes mode: the triggerer watches the runner pods, no worker slot is held
    ).expand_kwargs(plan)

    @task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
    def summarise(
        planned: Sequence[dict[str, Any]],
        reports: Sequence[dict[str, Any] | None],
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Attempts by status, and experiments by the status of their last attempt (from the runners'
        lists, which keep each runner's latest 100); fails if a runner failed, after logging the rest."""
        assert params is not None
        done = [report for report in reports[:] if report]  # one read; a failed runner left none
        attempts: dict[str, int] = {}
        latest: dict[str, dict[str, Any]] = {}  # per experiment, its last attempt on any runner
        for report in done:
            for status, count in (report.get("statuses") or {}).items():
                attempts[status] = attempts.get(status, 0) + int(count)
            for entry in report.get("experiments") or []:
                key = entry.get("key")
                if key and entry.get("attempt", 0) >= latest.get(key, {}).get("attempt", 0):
                    latest[key] = entry
        experiments: dict[str, int] = {}
        for entry in latest.values():
            experiments[entry["status"]] = experiments.get(entry["status"], 0) + 1
        summary = {
            "queue": params["queue"],
            "runners": len(planned),
            "runners_reported": len(done),
            "ended_by": sorted({str(report.get("ended_by")) for report in done}),
            "attempts": attempts,
            "experiments": experiments,
            "keys": sorted(latest),
        }
        log.info("summary: %s", summary)
        if len(done) < len(planned):
            raise AirflowException(
                f"{len(planned) - len(done)} of {len(planned)} runner(s) failed; see the drain task logs"
            )
        return summary

    summarise(plan, drained.output)
