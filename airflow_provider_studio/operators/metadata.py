"""Collect StudioML scrape documents (``<bucket>/metadata/scrape-host-*.json``) into one small table.

The fan-in step of an experiment generation: after the mapped experiment tasks, one task turns
their scrape documents into rows (status, exit code, artifacts, picked fields such as fitness)
that a ``select`` task can rank, and optionally into one JSON Lines object for downstream ETL.
The S3 work lives in :mod:`airflow_provider_studio.scrape_collection`; this module adds Airflow.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException
from studio_runner.s3_uris import parse_s3_uri

from airflow_provider_studio.scrape_collection import (
    DEFAULT_FIELDS,
    DEFAULT_MAX_WORKERS,
    ScrapeCollector,
    Table,
    Wanted,
    bucket_name,
    fields_from,
    scrape_client,
    wanted_from,
)


class MetadataScrapeOperator(BaseOperator):
    """Tabulate the scrape documents of StudioML experiments; returns the rows (to XCom).

    :param experiments: (templated) what to collect, one row each, in this order. Either
        experiment keys, looked up in ``bucket`` (the latest attempt of each key wins, by the
        start second in its file name, then by ``studioml.start_time``); or the XCom of mapped
        ``StudioExperimentOperator`` tasks, i.e. studio-runner summaries whose scrape document
        (``scrape_bucket``, ``scrape_key``) is read directly, without listing; or a mix of both.
    :param bucket: (templated) bucket whose root ``metadata/`` folder the runners write to.
        Needed when any experiment is given by key (or by a summary without ``scrape_uri``).
    :param aws_conn_id: Airflow AWS connection for S3. For SeaweedFS or MinIO, put the server's
        address in the connection extra ``endpoint_url``.
    :param fields: (templated) dotted paths into each document to copy into its row, e.g.
        ``experiment.fitness``; a missing path gives ``None``.
    :param wait_for_completion: poll until every experiment's document is complete (has
        ``studioml.stop_time`` or a final ``studioml.status``) instead of reporting what is
        there now; an incomplete document is otherwise reported with status ``running``.
    :param timeout: seconds to wait for completion before reporting what is still missing.
    :param poll_interval: seconds between looks while waiting.
    :param allow_missing: report missing, unreadable or (after waiting) incomplete documents as
        rows whose ``error`` says why, instead of failing the task.
    :param output_uri: (templated) optional ``s3://bucket/key.jsonl``; the whole table is
        written there as one JSON Lines object, a row per line.
    :param max_workers: documents fetched concurrently (also the size of the S3 connection pool).

    Each row is ``{"key", "status", "exit_code", "attempts", "scrape_uri", "artifacts",
    <field>..., "error"}``. Without ``allow_missing`` the task fails after looking at every
    experiment, with one line per problem.
    """

    template_fields: Sequence[str] = ("experiments", "bucket", "fields", "output_uri")
    template_fields_renderers = {"experiments": "json", "fields": "json"}
    ui_color = "#cfe8f3"
    ui_fgcolor = "#0b3954"

    def __init__(
        self,
        *,
        experiments: Any,
        bucket: str | None = None,
        aws_conn_id: str | None = "aws_default",
        fields: Sequence[str] | str = DEFAULT_FIELDS,
        wait_for_completion: bool = False,
        timeout: float = 3600.0,
        poll_interval: float = 30.0,
        allow_missing: bool = False,
        output_uri: str | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if timeout < 0:
            raise ValueError(f"timeout must be zero or more seconds, not {timeout}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be more than zero seconds, not {poll_interval}")
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a whole number of at least 1, not {max_workers!r}")
        self.experiments = experiments
        self.bucket = bucket
        self.aws_conn_id = aws_conn_id
        self.fields = list(fields) if not isinstance(fields, str) else fields
        self.wait_for_completion = wait_for_completion
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.allow_missing = allow_missing
        self.output_uri = output_uri
        self.max_workers = max_workers

    def execute(self, context: Context) -> list[dict[str, Any]]:
        wanted = wanted_from(self.experiments)
        fields = fields_from(self.fields)
        if self.output_uri:
            parse_s3_uri(self.output_uri)  # refuse a bad address before the work, not after
        hook = S3Hook(aws_conn_id=self.aws_conn_id)
        if wanted:
            rows = self._collect(hook, wanted, fields).rows
        else:
            self.log.warning("no experiments to collect (empty list, or no mapped task returned a result)")
            rows = []
        if self.output_uri:
            self._write_jsonl(hook, rows)
        return rows

    def _collect(self, hook: S3Hook, wanted: list[Wanted], fields: tuple[str, ...]) -> Table:
        client = scrape_client(hook, self.max_workers)
        bucket = bucket_name(self.bucket) if self.bucket else None
        with ScrapeCollector(client, fields=fields, max_workers=self.max_workers) as collector:
            table = collector.collect(
                wanted,
                bucket=bucket,
                wait=self.wait_for_completion,
                timeout=self.timeout,
                poll_interval=self.poll_interval,
            )
        running = sum(row["error"] is None and row["status"] == "running" for row in table.rows)
        self.log.info(
            "%d experiments: %d still running, %d problems; %d scrape files listed, %d read, %d passes, %.2fs",
            len(table.rows),
            running,
            len(table.problems),
            table.listed,
            table.fetched,
            table.passes,
            table.seconds,
        )
        for problem in table.problems:
            self.log.warning("%s: %s", problem.key or "(no key)", problem.reason)
        if table.problems and not self.allow_missing:
            raise AirflowException(
                table.failure_message()
                + "\nSet allow_missing=True to report these as rows with an error instead."
            )
        return table

    def _write_jsonl(self, hook: S3Hook, rows: list[dict[str, Any]]) -> None:
        """One object, one row per line: what Athena/Hive JSON tables and ``jq -c`` read."""
        assert self.output_uri is not None
        text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        hook.load_string(text, key=self.output_uri, replace=True)
        self.log.info("wrote %d rows to %s", len(rows), self.output_uri)
