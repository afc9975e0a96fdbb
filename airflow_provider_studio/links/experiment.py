"""An extra link from each experiment task to its results (``experiments/<key>/`` in the bucket).

Airflow 3 calls ``get_link`` on the worker when the task ends and stores the URL in XCom, so
everything the URL needs must be known there: the bucket and key are the operator's (rendered)
arguments, or the key is derived from the task instance exactly as the operator derives it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink, conf

from airflow_provider_studio.experiment_request import default_experiment_key, results_prefix

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={prefix}"


class StudioArtifactsLink(BaseOperatorLink):
    """The ``[studio] artifacts_link_template`` URL of this experiment's results ("Experiment artifacts").

    Placeholders: ``{bucket}``, ``{prefix}`` (``experiments/<key>/``), ``{key}`` and
    ``{endpoint}`` (the AWS connection's ``endpoint_url``, or the AWS regional S3 URL), e.g.
    ``http://filer.example.com:8888/buckets/{bucket}/{prefix}`` for a SeaweedFS filer.
    """

    name = "Experiment artifacts"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        aws_conn_id = getattr(operator, "aws_conn_id", None)
        bucket = getattr(operator, "results_bucket", None) or _connection_bucket(aws_conn_id)
        if not bucket:
            return ""
        key = getattr(operator, "experiment_key", None) or default_experiment_key(
            ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index
        )
        return artifacts_url(bucket, key, aws_conn_id)


def artifacts_url(bucket: str, key: str, aws_conn_id: str | None) -> str:
    """The ``[studio] artifacts_link_template`` URL of one experiment's results ("" if it cannot be made).

    Shared by the task's extra link and the Studio view, so both point at the same place.
    """
    template = conf.get("studio", "artifacts_link_template", fallback=DEFAULT_TEMPLATE)
    values: dict[str, Any] = {
        "bucket": bucket,
        "prefix": quote(results_prefix(key), safe="/"),
        "key": quote(key, safe=""),
        "endpoint": "",
    }
    if "{endpoint}" in template:
        values["endpoint"] = _endpoint(aws_conn_id)
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as error:
        log.warning("[studio] artifacts_link_template %r cannot be filled in: %s", template, error)
        return ""


def _connection_bucket(aws_conn_id: str | None) -> str | None:
    """The bucket named in the connection's ``service_config.s3.bucket_name`` extra, if any."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    try:
        return S3Hook(aws_conn_id=aws_conn_id).service_config.get("bucket_name")
    except Exception as error:
        log.warning("no results bucket for the artifacts link (connection %s): %s", aws_conn_id, error)
        return None


def _endpoint(aws_conn_id: str | None) -> str:
    """The store's URL for people; empty when the connection cannot be read (a link is not worth a failure)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from airflow_provider_studio.experiment_request import S3Endpoint

    try:
        return S3Endpoint.from_hook(S3Hook(aws_conn_id=aws_conn_id)).browse_url
    except Exception as error:
        log.warning("no endpoint for the artifacts link (connection %s): %s", aws_conn_id, error)
        return ""
