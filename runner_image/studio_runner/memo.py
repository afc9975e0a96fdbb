"""Memoized experiments: what determines a result (its fingerprint), and where succeeded results
are found again (the result index).

An experiment's result is determined by its inputs' content, the command, the interpreter and
the environment it is installed into; not by its key, its time or the resources it ran on.
Workspaces are content-addressed (``blobstore/<sha256>.tar``), so hashing the request's
immutable artifact digests is as good as hashing their bytes. ``cache_version`` lets a user
invalidate results when something outside the request changed (a dataset behind a URL).

The index is one JSON object per fingerprint, ``memo/<fingerprint>.json`` in the results
bucket, holding the succeeded run's summary. A single PUT makes it appear whole or not at all;
two identical experiments that both succeed both write it, and the last writer wins, which is
fine since either result is valid. Only succeeded runs whose results were saved are recorded,
and a lookup re-checks that the scrape document and the result artifacts still exist, so a
deleted result is run again rather than half-reused.

Called by the provider's experiment operator and the queue-backed generation; no Airflow here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ValidationError

from .request import ArtifactLocation, Request
from .summary import RunSummary

log = logging.getLogger(__name__)

FINGERPRINT_SCHEME = 1
"""Part of every fingerprint: a change to what is hashed gets new keys instead of wrong hits."""
INDEX_PREFIX = "memo/"
_BLOB_DIGEST = re.compile(r"(?:^|/)blobstore/(?P<sha>[0-9a-f]{64})\.tar$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})


class FingerprintError(ValueError):
    """An input's content is unknown, so the result cannot be safely identified."""


def artifact_digest(request: Request, label: str) -> str | None:
    """The content digest of an immutable artifact named by a content-addressed key, else None."""
    artifact = request.experiment.artifacts[label]
    if artifact.hash:
        return artifact.hash
    match = _BLOB_DIGEST.search(artifact.key or artifact.location.key)
    return f"sha256:{match['sha']}" if match else None


def fingerprint(
    request: Request, *, cache_version: str = "", digests: Mapping[str, str] | None = None
) -> str:
    """A hex SHA-256 of what determines ``request``'s result.

    Hashed: the immutable artifacts' content digests (``digests`` supplies those whose key does
    not name their content, e.g. an S3 object's ETag), filename and args, ``pythonver``,
    ``pythonenv`` and ``pip``, the workload's ``env``, and ``cache_version``. Not hashed: the
    key, ``time_added``, resources, durations, project and the mutable result artifacts.
    """
    digests = dict(digests or {})
    inputs: dict[str, str] = {}
    for label, artifact in sorted(request.experiment.artifacts.items()):
        if artifact.mutable:
            continue  # results: named after the key, written by the run
        digest = digests.get(label) or artifact_digest(request, label)
        if not digest:
            raise FingerprintError(
                f"artifact {label!r} ({artifact.qualified or artifact.key}) is not content-addressed; "
                "give its digest (e.g. its ETag) so its result can be reused"
            )
        inputs[label] = f"{digest}|unpack={artifact.unpack}"
    experiment, config = request.experiment, request.config
    document = {
        "scheme": FINGERPRINT_SCHEME,
        "inputs": inputs,
        "filename": experiment.filename,
        "args": list(experiment.args),
        "pythonver": experiment.pythonver,
        "pythonenv": list(experiment.pythonenv),
        "pip": list(config.pip),
        "env": dict(sorted(config.env.items())),
        "cache_version": str(cache_version or ""),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Fingerprinter:
    """Fingerprints of requests whose inputs are in one store, for every caller alike.

    An input whose key does not name its content (an ``s3://`` object given by the user) is
    identified by its ETag, asked once per object however many requests of a generation share
    it. ``client`` is a boto3 S3 client (an Airflow ``S3Hook().get_conn()``).
    """

    def __init__(self, client: Any, *, cache_version: str = "") -> None:
        self.client = client
        self.cache_version = str(cache_version or "")
        self._etags: dict[tuple[str, str], str] = {}

    def of(self, request: Request) -> str:
        """``request``'s fingerprint; FingerprintError when an input's content cannot be told."""
        digests: dict[str, str] = {}
        for label, artifact in request.experiment.artifacts.items():
            if artifact.mutable or artifact_digest(request, label):
                continue
            digests[label] = f"etag:{self._etag(label, artifact.bucket, artifact.key, artifact.qualified)}"
        return fingerprint(request, cache_version=self.cache_version, digests=digests)

    def _etag(self, label: str, bucket: str, key: str, qualified: str) -> str:
        known = self._etags.get((bucket, key))
        if known is not None:
            return known
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as error:  # botocore's ClientError, without importing botocore here
            if _error_code(error) in _MISSING:
                raise FingerprintError(f"input {label} {qualified or key} is gone") from None
            raise
        etag = str(head.get("ETag") or "").strip('"')
        if not etag:
            raise FingerprintError(f"input {label} {qualified or key} has no ETag to identify its content")
        self._etags[(bucket, key)] = etag
        return etag


class IndexEntry(BaseModel):
    """One ``memo/<fingerprint>.json``: the succeeded run whose result stands for the fingerprint."""

    fingerprint: str
    summary: RunSummary
    recorded_at: float


class ResultIndex:
    """Succeeded results by fingerprint in ``bucket``, through a boto3 S3 client.

    The client is the caller's (an Airflow ``S3Hook().get_conn()`` or a runner's own), so the
    index reaches storage exactly as the results did.
    """

    def __init__(self, client: Any, bucket: str, *, prefix: str = INDEX_PREFIX) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def key_of(self, fp: str) -> str:
        if not _FINGERPRINT.match(fp):
            raise ValueError(f"{fp!r} is not a fingerprint (64 lowercase hex digits)")
        return f"{self.prefix}{fp}.json"

    def lookup(self, fp: str) -> RunSummary | None:
        """The recorded succeeded summary for ``fp`` whose results are all still stored, else None.

        An unreadable entry or one whose results were deleted counts as no entry (and says why in
        the log): the experiment then runs again and its success replaces the entry.
        """
        key = self.key_of(fp)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as error:  # botocore's ClientError, without importing botocore here
            if _error_code(error) in _MISSING:
                return None
            raise
        try:
            entry = IndexEntry.model_validate_json(body)
        except ValidationError as error:
            log.warning("memo entry s3://%s/%s is unreadable, ignored: %s", self.bucket, key, error)
            return None
        summary = entry.summary
        if entry.fingerprint != fp or not summary.succeeded:
            log.warning("memo entry s3://%s/%s is not a succeeded run of %s, ignored", self.bucket, key, fp)
            return None
        missing = self._missing_results(summary)
        if missing:
            log.info(
                "memo entry for %s names experiment %s, whose %s no longer exists; it runs again",
                fp,
                summary.key,
                missing,
            )
            return None
        return summary

    def lookup_many(self, fps: Iterable[str], *, max_workers: int = 32) -> dict[str, RunSummary]:
        """The fingerprints among ``fps`` with a reusable result, each looked up once.

        A generation asks for thousands; a lookup is a GET plus a HEAD per stored result, so
        they run on a thread pool (give the client a connection per worker). Asking per
        fingerprint costs what the generation costs, where listing ``memo/`` would cost what
        every campaign ever recorded costs, and lookups would still have to check the results.
        """
        unique = list(dict.fromkeys(fps))
        if not unique:
            return {}
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(unique)))) as pool:
            found = dict(zip(unique, pool.map(self.lookup, unique), strict=True))
        return {fp: summary for fp, summary in found.items() if summary is not None}

    def record(self, fp: str, summary: RunSummary) -> str:
        """Store ``summary`` as the result of ``fp``; returns the entry's key.

        Refuses anything but a succeeded run with saved results, and a reused summary (its
        original is already recorded).
        """
        if not summary.succeeded:
            raise ValueError(
                f"experiment {summary.key} {summary.status.value}: only succeeded runs with saved results "
                "are recorded"
            )
        if summary.reused_from:
            raise ValueError(f"experiment {summary.key} reused {summary.reused_from}; record the original")
        key = self.key_of(fp)
        entry = IndexEntry(fingerprint=fp, summary=summary, recorded_at=round(time.time(), 3))
        body = entry.model_dump_json(exclude_unset=False).encode()
        # one PUT: readers see the old entry or the new one, never a part
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")
        return key

    def _missing_results(self, summary: RunSummary) -> str | None:
        """The first of the summary's stored objects that is gone, None when all exist."""
        objects: list[tuple[str, str, str]] = []
        if summary.scrape_key:
            if not summary.scrape_bucket:
                return f"scrape document file://{summary.scrape_key} (not in object storage)"
            objects.append(("scrape document", summary.scrape_bucket, summary.scrape_key))
        for label, uri in sorted(summary.artifacts.items()):
            try:
                location = ArtifactLocation.parse(uri)
            except ValueError:
                return f"artifact {label} at {uri!r} (not a storage location)"
            if location.scheme == "file":
                return f"artifact {label} at {uri} (not in object storage)"
            objects.append((f"artifact {label}", location.bucket, location.key))
        for what, bucket, key in objects:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
            except Exception as error:
                if _error_code(error) in _MISSING:
                    return f"{what} s3://{bucket}/{key}"
                raise
        return None


def _error_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None
