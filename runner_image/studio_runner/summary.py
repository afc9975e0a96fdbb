"""What a runner tells whoever started it: the ``--result-file`` of ``run`` and ``serve``.

The same document is the Airflow operators' XCom value, so one model here serves the runner
that writes it and the provider that reads it; a field added here reaches both. Reading keeps
only the fields a document actually had (``exclude_unset``), so a summary from an older
runner comes back as it was written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .outcome import Outcome, Status
from .request import ArtifactLocation

REASON_LIMIT = 300
"""Characters of a reason kept per ``serve`` entry, so one long traceback does not bloat XCom."""


class _Summary(BaseModel):
    model_config = ConfigDict(extra="allow")

    @classmethod
    def from_value(cls, value: Any) -> Any:
        """The summary in a decoded JSON value; ValueError saying what is wrong otherwise."""
        if not isinstance(value, dict):
            raise ValueError(f"a result summary is a JSON object, not {type(value).__name__}")
        try:
            return cls.model_validate(value)
        except ValidationError as error:
            raise ValueError(f"not a {cls.__name__}: {error}") from None

    def to_value(self) -> dict[str, Any]:
        """The JSON object as written and pushed to XCom."""
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_value(), indent=1) + "\n")


class RunSummary(_Summary):
    """One attempt, as ``studio-runner run`` reports it: ``Outcome`` in JSON terms.

    ``scrape_bucket`` and ``scrape_key`` name the scrape document in its store, so readers need
    not tell StudioML's ``s3://HOST/bucket/key`` from ``s3://bucket/key``; both are None when
    the request keeps no metadata, and ``scrape_bucket`` is None for a ``file://`` document.

    ``reused_from`` is set (by the operator, never the runner) when no run happened: the key of
    the earlier experiment with the same fingerprint (``studio_runner.memo``) whose result this
    is; its artifacts, scrape document and duration are that experiment's.
    """

    key: str = ""
    status: Status
    reason: str = ""
    exit_code: int | None = None
    artifacts: dict[str, str] = {}
    scrape_uri: str | None = None
    scrape_bucket: str | None = None
    scrape_key: str | None = None
    results_saved: bool = True
    duration_seconds: float = 0.0
    reused_from: str | None = None

    @classmethod
    def from_outcome(cls, outcome: Outcome) -> RunSummary:
        bucket = key = None
        if outcome.scrape_uri:
            # the runner's own qualified form (artifacts.scrape_uri): host, then bucket
            location = ArtifactLocation.parse(outcome.scrape_uri)
            bucket, key = location.bucket or None, location.key
        return cls(
            key=outcome.key,
            status=outcome.status,
            reason=outcome.reason,
            exit_code=outcome.exit_code,
            artifacts=outcome.artifacts,
            scrape_uri=outcome.scrape_uri,
            scrape_bucket=bucket,
            scrape_key=key,
            results_saved=outcome.results_saved,
            duration_seconds=round(outcome.duration_seconds, 3),
        )

    @property
    def succeeded(self) -> bool:
        """Ran, succeeded, and its results are safe in storage."""
        return self.status is Status.SUCCEEDED and self.results_saved


class HandledExperiment(_Summary):
    """One line of ``serve``'s summary: which experiment, from where, and how it ended."""

    key: str | None
    queue: str
    attempt: int
    status: Status
    reason: str | None = None

    @classmethod
    def of(
        cls, key: str | None, queue: str, attempt: int, status: Status, reason: str | None
    ) -> HandledExperiment:
        entry = cls(key=key, queue=queue, attempt=attempt, status=status)
        if reason:  # unset, so absent from the JSON, when there is none
            entry.reason = reason if len(reason) <= REASON_LIMIT else reason[: REASON_LIMIT - 1] + "…"
        return entry


class ServeSummary(_Summary):
    """What one ``studio-runner serve`` did before it exited; ``queue_match`` is added by the
    operator that started it."""

    queue_match: str | None = None
    ended_by: str = ""
    handled: int
    statuses: dict[str, int] = {}
    settle_failures: int = 0
    abandoned: int = 0
    lost_acks: int = 0
    experiments: list[HandledExperiment] = []
