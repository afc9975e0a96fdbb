"""Prometheus metrics: the upstream runner's names (spec §7.2) plus two experiment histograms.

Each runner owns a ``CollectorRegistry`` rather than the library's global one, so several
runners (or services in one test process) never collide over metric names.

Labels differ from upstream where upstream's were unbounded. Upstream put the experiment key
on ``runner_project_completed`` and the blob hash on the cache counters: counter series never
go away, so every experiment (ENN generations submit thousands) or workspace added a series
for the life of the pod and of the Prometheus TSDB. Here only ``runner_project_running``
carries the experiment key, and its series is removed when the experiment ends, so it holds at
most one series per queue; counters and histograms are labelled by queue and transport.
``queue_type`` is the real transport kind (``rmq``, ``sqs``, ``local``), where upstream always
wrote ``rmq``. The Python client exposes counters as ``<name>_total`` samples of the upstream
family names (with ``<name>_created`` beside them unless ``PROMETHEUS_DISABLE_CREATED_SERIES=True``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .cache import DownloadCache
from .limits import LIFETIME_EPOCH_FLOOR
from .resources import ResourcePool

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 345600)
"""Seconds, from quick CompletionService tasks up to the 96 h hard cap of an attempt."""
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
"""Seconds a request waited in its queue, up to the usual multi-day experiment lifetimes."""

_QUEUE = ("host", "queue_type", "queue_name")
_PROJECT = (*_QUEUE, "project")


class RunnerMetrics:
    """Every metric of one runner process, and the hooks the service and the handler call."""

    def __init__(self, host: str | None = None) -> None:
        self.host = host or socket.gethostname()
        self.registry = CollectorRegistry()
        registry = self.registry
        self._refresh_success = Counter(
            "runner_queue_refresh_success",
            "Successful listings of a queue server's queues",
            ["host", "project"],
            registry=registry,
        )
        self._refresh_fail = Counter(
            "runner_queue_refresh_fail",
            "Failed listings of a queue server's queues",
            ["host", "project"],
            registry=registry,
        )
        self._checked = Counter(
            "runner_queue_checked", "Polls of a queue for a message", _QUEUE, registry=registry
        )
        self._ignored = Counter(
            "runner_queue_ignored",
            "Polls of a queue skipped because the runner state is not Running (draining or stopping)",
            _QUEUE,
            registry=registry,
        )
        self._running = Gauge(
            "runner_project_running",
            "Experiments running now (the series goes away when the experiment ends)",
            [*_PROJECT, "experiment"],
            registry=registry,
        )
        self._completed = Counter(
            "runner_project_completed",
            "Experiment attempts that ended, whatever their status",
            _PROJECT,
            registry=registry,
        )
        self._duration = Histogram(
            "runner_experiment_duration_seconds",
            "Wall time of one message's handling, from receipt to the results stored",
            ["queue_type", "status"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._wait = Histogram(
            "runner_experiment_wait_seconds",
            "Time from the request's time_added to the start of this attempt",
            ["queue_type"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )

    # --- sources read at scrape time ------------------------------------------------------------
    def watch_resources(self, pool: ResourcePool) -> None:
        """Free-resource gauges, read from the pool on every scrape (so never staler than the scrape)."""
        self.registry.register(_ResourceCollector(self.host, pool))

    def watch_cache(self, cache: DownloadCache) -> None:
        self.registry.register(_CacheCollector(self.host, cache))

    # --- queue hooks (the service) --------------------------------------------------------------
    def queues_listed(self, server: str, ok: bool) -> None:
        """``server`` is the transport's credential-free description (upstream's "project")."""
        (self._refresh_success if ok else self._refresh_fail).labels(self.host, server).inc()

    def queue_checked(self, queue_type: str, queue: str) -> None:
        self._checked.labels(self.host, queue_type, queue).inc()

    def queue_ignored(self, queue_type: str, queue: str) -> None:
        self._ignored.labels(self.host, queue_type, queue).inc()

    # --- experiment hooks (the serve handler) ---------------------------------------------------
    def experiment_started(
        self, queue_type: str, queue: str, project: str, experiment: str, time_added: float | None
    ) -> RunningExperiment:
        if time_added is not None and time_added > LIFETIME_EPOCH_FLOOR:  # else the client set no clock
            waited = time.time() - time_added
            if waited >= 0:
                self._wait.labels(queue_type).observe(waited)
        return RunningExperiment(self, (self.host, queue_type, queue, project), experiment)

    def message_handled(self, queue_type: str, status: str, seconds: float) -> None:
        """Every handled message, experiments and undecodable ones alike (the service times them)."""
        self._duration.labels(queue_type, status).observe(max(0.0, seconds))


class RunningExperiment:
    """The running gauge's series for one attempt, removed when the block ends; the attempt counts as completed."""

    def __init__(self, metrics: RunnerMetrics, labels: tuple[str, str, str, str], experiment: str) -> None:
        self._running = metrics._running
        self._completed = metrics._completed
        self._labels = labels
        self._experiment = experiment
        self._lock = threading.Lock()
        self._ended = False
        self._running.labels(*labels, experiment).set(1)

    def __enter__(self) -> RunningExperiment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.ended()

    def ended(self) -> None:
        """Idempotent: the series goes and the completion counts once."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        with contextlib.suppress(KeyError):
            self._running.remove(*self._labels, self._experiment)
        self._completed.labels(*self._labels).inc()


class _ResourceCollector:
    """``runner_resource_*`` gauges (upstream refreshed them every 10 s; a scrape-time read is cheaper and current)."""

    def __init__(self, host: str, pool: ResourcePool) -> None:
        self._host = host
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        snapshot = self._pool.snapshot()
        for name, text, value in (
            ("runner_resource_cpu_free_slots", "CPU cores free for experiments", snapshot.cores_free),
            ("runner_resource_cpu_ram_free_bytes", "RAM free for experiments", snapshot.ram_free),
            ("runner_resource_disk_free_bytes", "Disk budget free for experiments", snapshot.disk_free),
            ("runner_resource_gpu_free_slots", "GPU slots free for experiments", snapshot.gpu_slots_free),
        ):
            family = GaugeMetricFamily(name, text, labels=["host"])
            family.add_metric([self._host], value)
            yield family


class _CacheCollector:
    """``runner_cache_hits``/``misses`` from the download cache's own counts (no per-blob ``hash`` label)."""

    def __init__(self, host: str, cache: DownloadCache) -> None:
        self._host = host
        self._cache = cache

    def collect(self) -> Iterable[Metric]:
        for name, text, value in (
            ("runner_cache_hits", "Artifact downloads served from the download cache", self._cache.hits),
            ("runner_cache_misses", "Artifact downloads that went to the object store", self._cache.misses),
        ):
            family = CounterMetricFamily(name, text, labels=["host"])
            family.add_metric([self._host], value)
            yield family
