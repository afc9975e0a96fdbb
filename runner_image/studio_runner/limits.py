"""The clocks of one attempt: its time limit (the request's lifetime, its ``max_duration`` and
a hard cap) and the period of checkpoint uploads.

Which limit binds decides the ending: running out of ``max_duration`` is a timeout, running out
of lifetime means the work is no longer wanted (upstream requeued both; we dead-letter both,
as StudioML intended and the later upstream runner did).
"""

from __future__ import annotations

from dataclasses import dataclass

from .request import Request

HARD_CAP_SECONDS = 96 * 3600.0
"""Upstream's ceiling for any attempt."""

LIFETIME_EPOCH_FLOOR = 10.0
"""``time_added`` at or below this disables lifetime checks (upstream rule for unset clocks)."""


@dataclass(frozen=True)
class TimeLimit:
    seconds: float
    cause: str  # "max_duration", "lifetime" or "cap"

    @property
    def expired(self) -> bool:
        return self.seconds <= 0


def time_limit(request: Request, *, now: float) -> TimeLimit:
    """The tightest of the three limits, measured from ``now``."""
    candidates = [TimeLimit(HARD_CAP_SECONDS, "cap")]
    lifetime = request.config.lifetime_seconds
    added = request.experiment.time_added
    if lifetime is not None and added is not None and added > LIFETIME_EPOCH_FLOOR:
        candidates.append(TimeLimit(added + lifetime - now, "lifetime"))
    duration = request.experiment.max_duration_seconds
    if duration is not None:
        candidates.append(TimeLimit(duration, "max_duration"))
    return min(candidates, key=lambda limit: limit.seconds)


CHECKPOINT_MIN_SECONDS = 120.0
CHECKPOINT_MAX_SECONDS = 12 * 3600.0
CHECKPOINT_DEFAULT_SECONDS = 600.0


def checkpoint_period(request: Request) -> float:
    """Seconds between uploads of mutable artifacts while the workload runs.

    Upstream used ``saveWorkspaceFrequency`` only strictly between 2 minutes and 12 hours and
    otherwise 600 *minutes*, so the client's usual ``"1m"`` meant no checkpoint at all. Here a
    value outside the range is clamped into it and an absent one means 10 minutes.
    """
    seconds = request.config.save_frequency_seconds
    if seconds is None:
        return CHECKPOINT_DEFAULT_SECONDS
    return min(max(seconds, CHECKPOINT_MIN_SECONDS), CHECKPOINT_MAX_SECONDS)
