"""Where a queued generation stands: which of its experiments succeeded, were dead-lettered, or still wait.

A generation published to a StudioML queue is finished when every experiment has reached a final
state. The runner retries a failed attempt (``Disposition.RETRY``) until its attempts run out and
then dead-letters the request to ``<queue>_rejected``, so a failed scrape document alone is not
final: only a succeeded latest attempt or a dead letter is. Scrape documents are read by key
with the one collector the provider has (:mod:`airflow_provider_studio.scrape_collection`).
No Airflow here, so the benchmark and the trigger share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from studio_runner.outcome import Status

from airflow_provider_studio.scrape_collection import ScrapeCollector, Table, Wanted

SUCCEEDED = Status.SUCCEEDED.value
DEAD_LETTERED = "dead_lettered"


def succeeded_keys(collector: ScrapeCollector, keys: Sequence[str], bucket: str) -> set[str]:
    """The keys whose latest attempt succeeded: the one "already done?" question a re-run asks.

    One listing of the bucket's scrape documents answers it for every key at once (a lookup per
    key would list the folder once per genome). At merge time this is the call to point at the
    result index of the memoization work.
    """
    table = collector.collect([Wanted(key=key) for key in keys], bucket=bucket)
    return {row["key"] for row in table.rows if row["error"] is None and row["status"] == SUCCEEDED}


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
