"""A whole generation as one task: publish its experiments to a StudioML queue, defer until they end.

Dynamic task mapping gives each experiment a task instance, which reads well at tens to
hundreds and stalls the scheduler at thousands (and stops at ``max_map_length``). Here one task
queues N requests in the ``studioml`` client's wire format, runner Deployments (scaled by queue
depth) or ``StudioQueueRunnerOperator`` drain them, and the task waits in the triggerer, holding
no worker slot, until every experiment succeeded or was dead-lettered. It returns the same table
as ``MetadataScrapeOperator``, so ``select`` reads both modes alike.

A re-run publishes only the experiments without a succeeded result. With ``cache=True`` the
result index of memoized experiments (``studio_runner.memo``, shared with
``StudioExperimentOperator``) decides by fingerprint, so a new DAG run of the same genomes (elites
carried into the next generation, a re-triggered generation with new keys) reuses them too;
without it, keys are deterministic and earlier successes are found by key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException
from studio_runner.memo import Fingerprinter, FingerprintError, ResultIndex
from studio_runner.request import Request
from studio_runner.summary import RunSummary

from airflow_provider_studio.experiment_request import (
    ExperimentSpec,
    RequestBuilder,
    default_experiment_key,
)
from airflow_provider_studio.generation import (
    SUCCEEDED,
    EarlierRuns,
    check_ratio,
    discount_earlier_attempts,
    earlier_runs,
    mark_dead_letters,
    recorded_summary,
)
from airflow_provider_studio.hooks.queue import queue_backend
from airflow_provider_studio.hooks.rabbitmq import StudioRabbitMQHook
from airflow_provider_studio.scrape_collection import (
    DEFAULT_FIELDS,
    DEFAULT_MAX_WORKERS,
    ScrapeCollector,
    Wanted,
    bucket_name,
    fields_from,
    scrape_client,
    scrape_document,
)
from airflow_provider_studio.triggers.generation import StudioGenerationTrigger

SPEC_FIELDS = frozenset({"args", "pythonenv", "pip", "env", "resources_needed", "inputs", "script", "module"})
"""What one experiment of the list may set for itself, besides its ``experiment_key``."""


class StudioGenerationOperator(BaseOperator):
    """Queue a generation's experiments, wait for all of them in the triggerer, return their table.

    :param experiments: (templated) one dict per experiment: ``experiment_key`` (default
        ``<dag>_<run>_<task>_<position>``), ``args``, and optionally ``pythonenv``, ``pip``,
        ``env``, ``resources_needed``, ``inputs``, ``script`` or ``module`` overriding the
        operator's. ``breed``'s output in the ENN example is such a list.
    :param queue_name: (templated) ``rmq_…`` (RabbitMQ) or ``sqs_…`` StudioML queue.
    :param results_bucket: (templated) bucket for workspaces, results and scrape documents.
    :param min_success_ratio: the share of experiments that must succeed for the task to
        succeed (1.0: all). Below it the task fails with the counts; at or above it the table
        is returned, dead-lettered experiments as rows with status ``dead_lettered``.
    :param timeout: seconds to wait for the generation; then ``min_success_ratio`` judges
        what finished, and experiments still waiting are rows with an error.
    :param poll_interval: seconds between looks at the store and the dead letters.
    :param fields: dotted paths copied from each scrape document into its row.
    :param output_uri: (templated) optional ``s3://bucket/key.jsonl`` for the table.
    :param cache: reuse succeeded results through the result index, as
        ``StudioExperimentOperator(cache=True)`` does and with the same fingerprints (input
        content, script, args, interpreter, ``pythonenv``, ``pip``, ``env``, ``cache_version``;
        not the key, time or resources): before publishing, each request's fingerprint is looked
        up in ``memo/`` of the results bucket, only the misses are queued, and the reused
        experiments are rows of the table with ``reused_from`` (the original's key) read from
        the original's scrape document. Once the generation finished, every experiment this run
        saw succeed is recorded there; failed and dead-lettered ones never are. Off by default,
        as in mapped mode, so that both modes skip work only when asked: a workload that is not
        deterministic, or has side effects, must run each time. Without it a re-run skips the
        keys whose latest attempt succeeded.
    :param cache_version: (templated) part of the fingerprint; change it to invalidate results.

    Every table row has a ``reused_from`` column (None for an experiment that ran).
    """

    template_fields: Sequence[str] = (
        "experiments",
        "queue_name",
        "results_bucket",
        "script",
        "workspace",
        "project",
        "resources_needed",
        "pythonenv",
        "min_success_ratio",
        "output_uri",
        "cache_version",
    )
    template_fields_renderers = {"experiments": "json", "resources_needed": "json"}
    ui_color = "#e6f2d9"

    def __init__(
        self,
        *,
        experiments: Any,
        queue_name: str,
        results_bucket: str,
        script: str | None = None,
        module: str | None = None,
        workspace: str | None = None,
        pythonver: str | None = None,
        pythonenv: Sequence[str] | str | None = (),
        resources_needed: Mapping[str, Any] | str | None = None,
        max_duration: str | float | None = None,
        project: str | None = None,
        env: Mapping[str, Any] | None = None,
        aws_conn_id: str | None = "aws_default",
        rabbitmq_conn_id: str = StudioRabbitMQHook.default_conn_name,
        min_success_ratio: float | str = 1.0,
        timeout: float = 7 * 24 * 3600.0,
        poll_interval: float = 30.0,
        fields: Sequence[str] | str = DEFAULT_FIELDS,
        output_uri: str | None = None,
        cache: bool = False,
        cache_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # a template (a DAG param) is checked once rendered, in execute
        templated = isinstance(min_success_ratio, str) and "{{" in min_success_ratio
        self.min_success_ratio = min_success_ratio if templated else check_ratio(min_success_ratio)
        if float(poll_interval) <= 0:
            raise ValueError(f"poll_interval must be more than zero seconds, not {poll_interval}")
        self.experiments = experiments
        self.queue_name = queue_name
        self.results_bucket = results_bucket
        self.script = script
        self.module = module
        self.workspace = workspace
        self.pythonver = pythonver
        self.pythonenv = pythonenv
        self.resources_needed = resources_needed
        self.max_duration = max_duration
        self.project = project
        self.env = env
        self.aws_conn_id = aws_conn_id
        self.rabbitmq_conn_id = rabbitmq_conn_id
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)
        self.fields = list(fields) if not isinstance(fields, str) else fields
        self.output_uri = output_uri
        self.cache = cache
        self.cache_version = cache_version

    # --- publish, then wait --------------------------------------------------------------------
    def execute(self, context: Context) -> list[dict[str, Any]] | None:
        self.min_success_ratio = check_ratio(self.min_success_ratio)
        backend = queue_backend(self.queue_name)
        specs = self.specs(context)
        bucket = bucket_name(self.results_bucket)
        hook = S3Hook(aws_conn_id=self.aws_conn_id)
        client = scrape_client(hook, DEFAULT_MAX_WORKERS)
        builder = RequestBuilder(hook, bucket)
        published_after = time.time() - 1  # every request built below has a time_added after this
        reused: dict[str, dict[str, Any]] = {}
        fingerprints: dict[str, str] = {}
        if self.cache:
            requests = self._requests(builder, specs)
            fingerprints = self._fingerprints(client, requests)
            found = ResultIndex(client, bucket).lookup_many(
                fingerprints.values(), max_workers=DEFAULT_MAX_WORKERS
            )
            for request in requests:
                hit = found.get(fingerprints[request.key])
                if hit is not None:
                    update = {"key": request.key, "reused_from": hit.key}
                    reused[request.key] = hit.model_copy(update=update).to_value()
            publish = [request for request in requests if request.key not in reused]
            fingerprints = {request.key: fingerprints[request.key] for request in publish}
            self.log.info(
                "%d of %d reused from the result index, publishing %d",
                len(reused),
                len(specs),
                len(publish),
            )
            earlier = self._earlier_runs(client, [request.key for request in publish], bucket)
        else:
            earlier = self._earlier_runs(client, [spec.key for spec in specs], bucket)
            missing = [spec for spec in specs if spec.key not in earlier.succeeded]
            if earlier.succeeded:
                self.log.info(
                    "%d of %d experiments already succeeded (an earlier run of this generation); "
                    "publishing the other %d",
                    len(earlier.succeeded),
                    len(specs),
                    len(missing),
                )
            publish = self._requests(builder, missing)
        # the cached generation waits for what it published; the other for every key, as before
        waited = [request.key for request in publish] if self.cache else [spec.key for spec in specs]
        attempts_before = {
            request.key: earlier.attempts[request.key]
            for request in publish
            if request.key in earlier.attempts
        }
        resume = {"reused": reused, "fingerprints": fingerprints, "attempts_before": attempts_before}
        if not waited:
            self.log.info("nothing to publish: every experiment of the generation has a succeeded result")
            return self.execute_complete(context, {"status": "done", "total": 0}, **resume)
        bodies = [json.dumps(request.to_wire()).encode() for request in publish]
        if bodies:
            self._publish(backend, bodies)
        self.log.info(
            "published %d requests to %s; waiting for %d experiments",
            len(bodies),
            self.queue_name,
            len(waited),
        )
        self.defer(
            trigger=StudioGenerationTrigger(
                waited,
                bucket,
                self.queue_name,
                aws_conn_id=self.aws_conn_id,
                rabbitmq_conn_id=self.rabbitmq_conn_id,
                poll_interval=self.poll_interval,
                deadline=time.time() + self.timeout,
                published_after=published_after,
                attempts_before=attempts_before,
            ),
            method_name="execute_complete",
            # what the resumed task needs and cannot ask again (the index changes meanwhile)
            kwargs=resume,
        )

    def _earlier_runs(self, client: Any, keys: list[str], bucket: str) -> EarlierRuns:
        if not keys:
            return EarlierRuns(succeeded=frozenset(), attempts={})
        with ScrapeCollector(client, fields=()) as collector:
            return earlier_runs(collector, keys, bucket)

    def _fingerprints(self, client: Any, requests: list[Request]) -> dict[str, str]:
        """Each request's fingerprint by key; the generation is refused if one cannot be told."""
        fingerprinter = Fingerprinter(client, cache_version=self.cache_version or "")
        fingerprints: dict[str, str] = {}
        problems: list[str] = []
        for request in requests:
            try:
                fingerprints[request.key] = fingerprinter.of(request)
            except FingerprintError as error:
                problems.append(f"{request.key}: {error}")
        if problems:
            raise AirflowException(
                "the generation's results cannot be looked up (cache=True):\n  " + "\n  ".join(problems[:50])
            )
        return fingerprints

    def specs(self, context: Context) -> list[ExperimentSpec]:
        """The generation's experiments, each refused with its position before anything is queued."""
        items = list(self.experiments or [])
        if not items:
            raise AirflowException("experiments is empty: a generation needs at least one experiment")
        ti = context["ti"]
        specs: list[ExperimentSpec] = []
        problems: list[str] = []
        for position, item in enumerate(items):
            if not isinstance(item, Mapping):
                problems.append(f"experiments[{position}] is a {type(item).__name__}, not a dict")
                continue
            unknown = set(item) - SPEC_FIELDS - {"experiment_key"}
            if unknown:
                problems.append(
                    f"experiments[{position}] sets {sorted(unknown)}; allowed: {sorted(SPEC_FIELDS)}"
                )
                continue
            key = item.get("experiment_key") or default_experiment_key(
                ti.dag_id, ti.run_id, ti.task_id, position
            )
            try:
                specs.append(
                    ExperimentSpec(
                        key=key,
                        script=item.get("script", self.script),
                        module=item.get("module", self.module),
                        args=item.get("args", ()),
                        workspace=self.workspace,
                        pythonver=self.pythonver,
                        pythonenv=item.get("pythonenv", self.pythonenv),
                        pip=item.get("pip", ()),
                        resources=item.get("resources_needed", self.resources_needed),
                        max_duration=self.max_duration,
                        project=self.project,
                        inputs=item.get("inputs"),
                        env={**(self.env or {}), **(item.get("env") or {})},
                    )
                )
            except ValueError as error:
                problems.append(f"experiments[{position}] ({key}): {error}")
        seen: set[str] = set()
        duplicates = sorted({spec.key for spec in specs if spec.key in seen or seen.add(spec.key)})
        if duplicates:
            problems.append(f"experiment keys appear more than once: {duplicates[:10]}")
        if problems:
            raise AirflowException("the generation cannot be queued:\n  " + "\n  ".join(problems))
        return specs

    def _requests(self, builder: RequestBuilder, specs: list[ExperimentSpec]) -> list[Request]:
        """The requests; the workspace is packed and stored once, then named by its s3:// URI."""
        requests: list[Request] = []
        workspace: str | None = None
        for spec in specs:
            if workspace is not None:
                spec.workspace = workspace
            request = builder.build(spec)
            if workspace is None and spec.workspace is not None:
                artifact = request.experiment.artifacts["workspace"]
                workspace = f"s3://{artifact.bucket}/{artifact.key}"
            requests.append(request)
        return requests

    def _publish(self, backend: str, bodies: list[bytes]) -> None:
        if backend == "rmq":
            StudioRabbitMQHook(self.rabbitmq_conn_id).publish(self.queue_name, bodies)
            return
        from airflow.providers.amazon.aws.hooks.sqs import SqsHook

        client = SqsHook(aws_conn_id=self.aws_conn_id).get_conn()
        url = client.create_queue(QueueName=self.queue_name)["QueueUrl"]
        for start in range(0, len(bodies), 10):  # SQS sends at most 10 per batch
            batch = [
                {"Id": str(number), "MessageBody": body.decode()}
                for number, body in enumerate(bodies[start : start + 10])
            ]
            failed = client.send_message_batch(QueueUrl=url, Entries=batch).get("Failed")
            if failed:
                raise AirflowException(
                    f"SQS refused {len(failed)} requests of {self.queue_name}: {failed[:3]}"
                )

    # --- after the trigger -----------------------------------------------------------------------
    def execute_complete(
        self,
        context: Context,
        event: dict[str, Any],
        reused: Mapping[str, dict[str, Any]] | None = None,
        fingerprints: Mapping[str, str] | None = None,
        attempts_before: Mapping[str, int] | None = None,
    ) -> list[dict[str, Any]]:
        """The table; first, with ``cache``, this run's successes go into the result index."""
        self.min_success_ratio = check_ratio(self.min_success_ratio)
        if event.get("status") == "error":
            raise AirflowException(
                f"waiting for the generation in {self.queue_name} failed: {event.get('message')}"
            )
        reused = dict(reused or {})
        keys = [spec.key for spec in self.specs(context)]
        hook = S3Hook(aws_conn_id=self.aws_conn_id)
        client = scrape_client(hook, DEFAULT_MAX_WORKERS)
        bucket = bucket_name(self.results_bucket)
        with ScrapeCollector(client, fields=fields_from(self.fields)) as collector:
            table = collector.collect([self._wanted(key, reused.get(key)) for key in keys], bucket=bucket)
        rows = discount_earlier_attempts(table.rows, attempts_before)
        rows = mark_dead_letters(rows, event.get("dead_keys") or [])
        for row in rows:
            row["reused_from"] = reused[row["key"]].get("reused_from") if row["key"] in reused else None
        if fingerprints:
            self._record(rows, fingerprints, client, bucket)
        succeeded = sum(row["status"] == SUCCEEDED and row["error"] is None for row in rows)
        dead = sum(row["status"] == "dead_lettered" for row in rows)
        waiting = len(rows) - succeeded - dead
        counts = f"{succeeded} of {len(rows)} succeeded, {dead} dead-lettered, {waiting} unfinished"
        if reused:
            counts += f" ({len(reused)} reused from the result index)"
        if event.get("status") == "timeout":
            self.log.warning("the generation did not finish within %gs: %s", self.timeout, counts)
        needed = self.min_success_ratio * len(rows)
        if succeeded < needed:
            raise AirflowException(
                f"generation in {self.queue_name}: {counts}; min_success_ratio {self.min_success_ratio:g} "
                f"needs {needed:g} successes"
            )
        self.log.info(
            "generation in %s: %s (min_success_ratio %g)", self.queue_name, counts, self.min_success_ratio
        )
        if self.output_uri:
            text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
            hook.load_string(text, key=self.output_uri, replace=True)
            self.log.info("wrote %d rows to %s", len(rows), self.output_uri)
        return rows

    @staticmethod
    def _wanted(key: str, reused: dict[str, Any] | None) -> Wanted:
        """A key to look up, or a reused result, read from the original's scrape document."""
        if reused is None:
            return Wanted(key=key)
        return Wanted(key=key, scrape_uri=scrape_document(reused), summary=RunSummary.from_value(reused))

    def _record(
        self, rows: list[dict[str, Any]], fingerprints: Mapping[str, str], client: Any, bucket: str
    ) -> None:
        """Index every experiment this run saw succeed, before the ratio is judged (a failing
        generation's successes are reused by its re-run). A store that refuses loses only the
        reuse, never the result."""
        index = ResultIndex(client, bucket)
        succeeded = [
            row
            for row in rows
            if row["key"] in fingerprints and row["status"] == SUCCEEDED and row["error"] is None
        ]

        def record(row: dict[str, Any]) -> str | None:
            try:
                summary = recorded_summary(row, client)
                if summary is None:
                    return f"{row['key']}: its scrape document is not in object storage"
                index.record(fingerprints[row["key"]], summary)
            except Exception as error:  # storage errors included: the experiment itself succeeded
                return f"{row['key']}: {error!r}"
            return None

        if not succeeded:
            return
        with ThreadPoolExecutor(max_workers=min(DEFAULT_MAX_WORKERS, len(succeeded))) as pool:
            problems = [problem for problem in pool.map(record, succeeded) if problem]
        for problem in problems[:20]:
            self.log.warning("result not recorded for reuse: %s", problem)
        self.log.info(
            "recorded %d of %d succeeded experiments for reuse in s3://%s/%s",
            len(succeeded) - len(problems),
            len(succeeded),
            bucket,
            index.prefix,
        )
