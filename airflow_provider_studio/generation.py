"""Where a queued generation stands: which of its experiments succeeded, were dead-lettered, or still wait.

A generation published to a StudioML queue is finished when every experiment has reached a final
state. The runner retries a failed attempt (``Disposition.RETRY``) until its attempts run out and
then dead-letters the request to ``<queue>_rejected``, so a failed scrape document alone is not
final: only a succeeded latest attempt or a dead letter is. Scrape documents are read by key
with the one collector the provider has (:mod:`airflow_provider_studio.scrape_collection`);
a succeeded row becomes the summary the result index (``studio_runner.memo``) records.
No Airflow here, so the benchmark and the trigger share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError
from studio_runner.outcome import Status
from studio_runner.request import ArtifactLocation
from studio_runner.s3_uris import parse_s3_uri
from studio_runner.summary import RunSummary

from airflow_provider_studio.experiment_request import results_prefix
from airflow_provider_studio.scrape_collection import ScrapeCollector, Table, Wanted

SUCCEEDED = Status.SUCCEEDED.value
DEAD_LETTERED = "dead_lettered"
QUEUED = "queued"
"""A row's status while only earlier runs' attempts of its key exist."""


@dataclass(frozen=True)
class EarlierRuns:
    """What earlier runs of a generation left under its keys: the keys whose latest attempt
    succeeded, and how many attempts (scrape documents) every key with any has."""

    succeeded: frozenset[str]
    attempts: Mapping[str, int]


def earlier_runs(collector: ScrapeCollector, keys: Sequence[str], bucket: str) -> EarlierRuns:
    """The "already done?" question a re-run asks by key, for every key at once.

    One listing of the bucket's scrape documents answers it (a lookup per key would list the
    folder once per genome). With the result index (``cache=True``) the index decides reuse;
    the attempt counts still tell this run's attempts from earlier ones.
    """
    table = collector.collect([Wanted(key=key) for key in keys], bucket=bucket)
    succeeded = {row["key"] for row in table.rows if row["error"] is None and row["status"] == SUCCEEDED}
    attempts = {row["key"]: int(row["attempts"]) for row in table.rows if row["attempts"]}
    return EarlierRuns(succeeded=frozenset(succeeded), attempts=attempts)


def discount_earlier_attempts(
    rows: list[dict[str, Any]], attempts_before: Mapping[str, int] | None
) -> list[dict[str, Any]]:
    """Rows of re-published keys that have no attempt newer than the earlier runs' say so, in place.

    A key published again (its fingerprint had no result, or it failed before) may still show an
    earlier run's attempt, even a succeeded one whose inputs differed: it is not this run's
    result, so it counts as waiting until a runner starts the key again. Counting attempts
    rather than comparing start times needs no agreement between the runners' clocks and ours.
    """
    for row in rows:
        before = (attempts_before or {}).get(row["key"])
        if before and (row["attempts"] or 0) <= before:
            row["status"] = QUEUED
            row["error"] = (
                f"queued again; its {before} attempt(s) so far belong to earlier runs of the generation"
            )
    return rows


def recorded_summary(row: Mapping[str, Any], client: Any) -> RunSummary | None:
    """A succeeded row as the summary the result index keeps; None for any other row.

    Queue mode has no runner summary, so the scrape document stands for it. Its artifact list
    names every result label, also empty ones the runner never uploaded, while a final
    document in the bucket means the uploads are done (the runner sends it last): the results
    kept are those under the experiment's results prefix that exist, which the index checks again
    before each reuse.
    """
    if row.get("error") is not None or row.get("status") != SUCCEEDED or row.get("reused_from"):
        return None
    key, uri = str(row["key"]), row.get("scrape_uri")
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        return None  # a document outside object storage cannot be checked before a reuse
    scrape_bucket, scrape_key = parse_s3_uri(uri)
    artifacts: dict[str, str] = {}
    for label, artifact_uri in sorted((row.get("artifacts") or {}).items()):
        try:
            location = ArtifactLocation.parse(str(artifact_uri))
        except ValueError:
            continue
        if location.scheme == "file" or not location.key.startswith(results_prefix(key)):
            continue  # inputs are named by content; only results are checked before a reuse
        if _exists(client, location.bucket, location.key):
            artifacts[label] = str(artifact_uri)
    exit_code = row.get("exit_code")
    return RunSummary(
        key=key,
        status=Status.SUCCEEDED,
        exit_code=exit_code if isinstance(exit_code, int) else None,
        artifacts=artifacts,
        scrape_uri=uri,
        scrape_bucket=scrape_bucket,
        scrape_key=scrape_key,
    )


def _exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "NotFound", "404"):
            return False
        raise
    return True


def dead_lettered_keys(bodies: Iterable[bytes], keys: Iterable[str], since: float | None = None) -> set[str]:
    """Which of ``keys`` appear among dead-lettered request bodies; other bodies are ignored.

    A dead letter carries the request as it was published, so one whose ``time_added`` is
    before ``since`` belongs to an earlier run of the generation, not to the requests it
    re-published (which would otherwise count as finished before a runner took them).
    """
    wanted = set(keys)
    found: set[str] = set()
    for body in bodies:
        try:
            experiment = json.loads(body)["experiment"]
            key = experiment["key"]
            added = float(experiment.get("time_added") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # an envelope or another client's message: not one of ours
        if key in wanted and (since is None or added >= since):
            found.add(key)
    return found


@dataclass(frozen=True)
class Standing:
    """Counts of one look at a generation; ``finished`` is succeeded plus dead-lettered."""

    total: int
    succeeded: int
    dead_lettered: int
    dead_keys: tuple[str, ...] = field(default=())

    @property
    def finished(self) -> int:
        return self.succeeded + self.dead_lettered

    @property
    def done(self) -> bool:
        return self.finished >= self.total

    def line(self) -> str:
        return (
            f"{self.finished} of {self.total} experiments finished "
            f"({self.succeeded} succeeded, {self.dead_lettered} dead-lettered, {self.total - self.finished} waiting)"
        )


def standing(table: Table, dead: set[str]) -> Standing:
    """Tally a collector pass (rows by key, ``wait=False``) and the dead-lettered keys."""
    succeeded = {row["key"] for row in table.rows if row["error"] is None and row["status"] == SUCCEEDED}
    dead_keys = tuple(sorted(dead - succeeded))  # a retried-then-succeeded key counts once, as a success
    return Standing(
        total=len(table.rows), succeeded=len(succeeded), dead_lettered=len(dead_keys), dead_keys=dead_keys
    )


def mark_dead_letters(rows: list[dict[str, Any]], dead: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of dead-lettered experiments say so in ``status`` and ``error``, in place."""
    dead = set(dead)
    for row in rows:
        if row["key"] in dead and row["status"] != SUCCEEDED:
            row["status"] = DEAD_LETTERED
            row["error"] = "the runner dead-lettered this request (its attempts ran out, or it was refused)"
    return rows


def check_ratio(min_success_ratio: float) -> float:
    """The ratio as a float in (0, 1]; refused otherwise with what is allowed."""
    ratio = float(min_success_ratio)
    if not 0 < ratio <= 1:
        raise ValueError(f"min_success_ratio must be more than 0 and at most 1, not {min_success_ratio!r}")
    return ratio
