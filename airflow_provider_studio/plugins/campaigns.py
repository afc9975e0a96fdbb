"""An ENN campaign as the Studio view reads it: DAG runs from Airflow, results from S3.

The DAG (``dags/enn/campaign.py``) owns the layout and writes it; this module only reads it, so
the view never depends on the example DAGs being importable in the API server:

    enn/<campaign>/generation-NNN/population.json   genomes in ``train``'s map order, with parents
    enn/<campaign>/generation-NNN/table.jsonl       one row per experiment (MetadataScrapeOperator)
    enn/<campaign>/generation-NNN/summary.json      best / mean / worst fitness, failures, wall time

Every generation is one DAG run whose conf names the campaign, the generation and the bucket;
S3 is reached through the Airflow connection (the view never sees a credential). Whatever cannot
be read is reported in an ``error`` field of the item it belongs to, never as a crash of the page.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel
from studio_runner.s3_uris import parse_s3_uri

log = logging.getLogger(__name__)

FITNESS = "experiment.fitness"
TRAIN_SECONDS = "experiment.train_seconds"
TRAIN_TASK = "train"
OUTPUT_TAIL_LINES = 200
MAX_OUTPUT_BYTES = 32 * 1024 * 1024
"""An ``output.tar`` larger than this is not read for its tail (the page would stall)."""
_ABSENT = {"NoSuchKey", "NotFound", "404", "NoSuchBucket"}


class CampaignNotFound(LookupError):
    """No DAG run of this DAG belongs to the campaign (or the run is not a generation)."""


class GenerationRun(BaseModel):
    """One DAG run that trained (or trains) one generation."""

    campaign: str
    generation: int
    bucket: str
    run_id: str
    state: str | None = None


class Campaign(BaseModel):
    name: str
    bucket: str
    generations: int
    last_run_id: str
    state: str | None = None


class Generation(BaseModel):
    generation: int
    run_id: str
    state: str | None = None
    size: int | None = None
    failures: int | None = None
    best_fitness: float | None = None
    mean_fitness: float | None = None
    worst_fitness: float | None = None
    wall_seconds: float | None = None
    overhead_seconds: float | None = None
    """Wall time not spent training the slowest genome: scheduling, environments, collection."""
    error: str | None = None


class GenomeLinks(BaseModel):
    task_instance: str
    log: str
    artifacts: str | None = None
    experiment: str
    """The Studio view's experiment panel (scrape document and the ``output`` tail)."""


class GenomeRow(BaseModel):
    map_index: int
    experiment_key: str
    genome_id: str
    summary: str
    born: int | None = None
    fitness: float | None = None
    status: str
    duration_seconds: float | None = None
    parents: list[str]
    links: GenomeLinks
    error: str | None = None


class Experiment(BaseModel):
    experiment_key: str
    run_id: str
    status: str | None = None
    scrape_uri: str | None = None
    runner: dict[str, Any] | None = None
    experiment: dict[str, Any] | None = None
    studioml: dict[str, Any] | None = None
    scrape_error: str | None = None
    output_tail: list[str] = []
    output_error: str | None = None


# --- DAG runs ---------------------------------------------------------------------------------


def generation_runs(rows: list[tuple[str, Any, Any]]) -> list[GenerationRun]:
    """The DAG's runs that are ENN generations, from ``(run_id, conf, state)`` rows; others are left out."""
    found = []
    for run_id, conf, state in rows:
        if not isinstance(conf, dict):
            continue
        campaign, generation, bucket = conf.get("campaign"), conf.get("generation"), conf.get("bucket")
        if isinstance(campaign, str) and isinstance(generation, int) and isinstance(bucket, str):
            found.append(
                GenerationRun(
                    campaign=campaign,
                    generation=generation,
                    bucket=bucket,
                    run_id=run_id,
                    state=_state(state),
                )
            )
    return found


def campaigns_of(runs: list[GenerationRun]) -> list[Campaign]:
    """One entry per campaign, the most recent first (the one with the newest last run id)."""
    grouped: dict[str, list[GenerationRun]] = {}
    for run in runs:
        grouped.setdefault(run.campaign, []).append(run)
    result = []
    for name, members in grouped.items():
        last = max(members, key=lambda run: run.generation)
        result.append(
            Campaign(
                name=name,
                bucket=last.bucket,
                generations=len({run.generation for run in members}),
                last_run_id=last.run_id,
                state=last.state,
            )
        )
    return sorted(result, key=lambda campaign: campaign.last_run_id, reverse=True)


def _state(state: Any) -> str | None:
    return None if state is None else str(getattr(state, "value", state))


# --- S3 ---------------------------------------------------------------------------------------


@dataclass
class CampaignStore:
    """Reads one campaign's documents with an ``S3Hook`` (the connection the DAG uses)."""

    hook: Any
    bucket: str
    name: str

    def prefix(self, generation: int) -> str:
        return f"enn/{self.name}/generation-{generation:03d}/"

    def generations(self, runs: list[GenerationRun]) -> list[Generation]:
        """One row per generation run, oldest first; their summaries are fetched in parallel."""
        latest: dict[int, GenerationRun] = {}
        for run in runs:
            latest[run.generation] = run
        ordered = [latest[g] for g in sorted(latest)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(self.generation, ordered))

    def generation(self, run: GenerationRun) -> Generation:
        row = Generation(generation=run.generation, run_id=run.run_id, state=run.state)
        try:
            summary = self._json(f"{self.prefix(run.generation)}summary.json")
        except DocumentError as error:
            row.error = str(error)
            return row
        if summary is None:  # still training (or it failed before select): the size is known
            population = self._json_or_none(f"{self.prefix(run.generation)}population.json")
            row.size = len(population) if isinstance(population, list) else None
            return row
        row.size = summary.get("experiments", summary.get("count"))
        row.failures = summary.get("failures")
        row.best_fitness = summary.get("best_fitness")
        row.mean_fitness = summary.get("mean_fitness")
        row.worst_fitness = summary.get("worst_fitness")
        row.wall_seconds = summary.get("wall_seconds")
        slowest = max((_number(r.get(TRAIN_SECONDS)) or 0.0 for r in self._table_or_empty(run)), default=0.0)
        if row.wall_seconds is not None and slowest:
            row.overhead_seconds = round(max(0.0, row.wall_seconds - slowest), 1)
        return row

    def genomes(self, run: GenerationRun) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """The generation's genomes in map order, and its table rows by experiment key."""
        population = self._json(f"{self.prefix(run.generation)}population.json")
        if population is None:
            raise CampaignNotFound(
                f"generation {run.generation} of campaign {self.name!r} has no population yet "
                f"(s3://{self.bucket}/{self.prefix(run.generation)}population.json); breed has not run"
            )
        if not isinstance(population, list):
            raise DocumentError(
                f"s3://{self.bucket}/{self.prefix(run.generation)}population.json is not a list"
            )
        return population, {row.get("key"): row for row in self._table_or_empty(run)}

    def table_row(self, run: GenerationRun, key: str) -> dict[str, Any] | None:
        return next((row for row in self._table_or_empty(run) if row.get("key") == key), None)

    def experiment(self, run: GenerationRun, key: str) -> Experiment:
        """The experiment's scrape document blocks and the tail of its ``output`` log."""
        row = self.table_row(run, key) or {}
        view = Experiment(experiment_key=key, run_id=run.run_id, status=row.get("status"))
        view.scrape_uri = row.get("scrape_uri")
        if not view.scrape_uri:
            view.scrape_error = "no scrape document recorded for this experiment yet (collect has not run)"
        else:
            try:
                bucket, object_key = parse_s3_uri(view.scrape_uri)
                document = self._document(bucket, object_key)
                if not isinstance(document, dict):
                    raise DocumentError(f"{view.scrape_uri} is not a JSON object")
            except (ValueError, DocumentError) as error:
                view.scrape_error = f"corrupt scrape document: {error}"
            else:
                view.runner = _block(document, "runner")
                view.experiment = _block(document, "experiment")
                studioml = _block(document, "studioml")
                if studioml is not None:
                    studioml = {k: v for k, v in studioml.items() if k != "log"}  # the tail shows it
                view.studioml = studioml
        try:
            view.output_tail = self.output_tail(key)
        except DocumentError as error:
            view.output_error = str(error)
        return view

    def output_tail(self, key: str, lines: int = OUTPUT_TAIL_LINES) -> list[str]:
        """The last lines of ``experiments/<key>/output.tar``'s console log."""
        object_key = f"experiments/{key}/output.tar"
        try:
            head = self.hook.head_object(key=object_key, bucket_name=self.bucket)
        except (ClientError, BotoCoreError) as error:
            raise DocumentError(f"s3://{self.bucket}/{object_key}: {_reason(error)}") from None
        if head is None:
            raise DocumentError(f"no output yet (s3://{self.bucket}/{object_key} does not exist)")
        if head.get("ContentLength", 0) > MAX_OUTPUT_BYTES:
            raise DocumentError(
                f"s3://{self.bucket}/{object_key} is {head['ContentLength']} bytes; open it from the artifacts link"
            )
        body = self._bytes(self.bucket, object_key)
        try:
            with tarfile.open(fileobj=io.BytesIO(body or b"")) as archive:
                member = next((m for m in archive.getmembers() if m.isfile()), None)
                data = archive.extractfile(member).read() if member else b""  # type: ignore[union-attr]
        except tarfile.TarError as error:
            raise DocumentError(f"s3://{self.bucket}/{object_key} is not a tar archive: {error}") from None
        return data.decode(errors="replace").splitlines()[-lines:]

    # --- plumbing ----------------------------------------------------------------------------
    def _table_or_empty(self, run: GenerationRun) -> list[dict[str, Any]]:
        key = f"{self.prefix(run.generation)}table.jsonl"
        text = self._bytes(self.bucket, key)
        rows = []
        for number, line in enumerate((text or b"").decode(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                log.warning("s3://%s/%s line %d is not JSON; left out", self.bucket, key, number)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def _json_or_none(self, key: str) -> Any:
        try:
            return self._json(key)
        except DocumentError:
            return None

    def _json(self, key: str) -> Any:
        return self._document(self.bucket, key)

    def _document(self, bucket: str, key: str) -> Any:
        body = self._bytes(bucket, key)
        if body is None:
            return None
        try:
            return json.loads(body)
        except ValueError as error:
            raise DocumentError(f"s3://{bucket}/{key} is not valid JSON ({error})") from None

    def _bytes(self, bucket: str, key: str) -> bytes | None:
        """The object's content; None when it does not exist (yet)."""
        try:
            return self.hook.get_key(key, bucket_name=bucket).get()["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _ABSENT:
                return None
            raise DocumentError(f"s3://{bucket}/{key}: {_reason(error)}") from None
        except BotoCoreError as error:
            raise DocumentError(f"s3://{bucket}/{key}: {_reason(error)}") from None


class DocumentError(RuntimeError):
    """A document exists but cannot be read or parsed; the message names it."""


def genome_summary(genome: dict[str, Any]) -> str:
    """``[64, 32] relu lr=0.01 wd=1e-05 batch 32``: the genes a person compares at a glance."""
    layers = genome.get("hidden_layers") or []
    return (
        f"{list(layers)} {genome.get('activation', '?')} lr={genome.get('learning_rate', '?')} "
        f"wd={genome.get('weight_decay', '?')} batch {genome.get('batch_size', '?')}"
    )


def _block(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = document.get(name)
    return value if isinstance(value, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _reason(error: Exception) -> str:
    """What S3 said, without request ids or signatures."""
    if isinstance(error, ClientError):
        detail = error.response.get("Error", {})
        return f"{detail.get('Code', 'error')}: {detail.get('Message', '')}".strip(": ")
    return type(error).__name__
