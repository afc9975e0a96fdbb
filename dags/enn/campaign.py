"""An ENN campaign's state in S3: each generation's population, results table and summary.

Keeping it in the bucket (not in XCom or the DAG run) is what lets any generation be cleared and
re-run from the Airflow UI: a run reads generation ``g - 1`` from S3 and writes generation ``g``.

    enn/<campaign>/generation-003/population.json   the genomes that were trained
    enn/<campaign>/generation-003/table.jsonl       one row per experiment (their scrape documents)
    enn/<campaign>/generation-003/summary.json      best / mean fitness, failures, wall time
    enn/<campaign>/fitness.png                      best and mean fitness by generation
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from .evolution import Scored
from .genome import Genome

FITNESS_FIELD = "experiment.fitness"
TABLE_FIELDS = (FITNESS_FIELD, "experiment.genome_id", "experiment.train_seconds")


def experiment_key(campaign: str, generation: int, genome: Genome) -> str:
    """One key per genome and generation: an elite trained again gets a new experiment."""
    return f"enn-{campaign}-g{generation:03d}-{genome.genome_id}"


@dataclass
class Campaign:
    hook: S3Hook
    bucket: str
    name: str

    def prefix(self, generation: int | None = None) -> str:
        base = f"enn/{self.name}/"
        return base if generation is None else f"{base}generation-{generation:03d}/"

    def table_uri(self, generation: int) -> str:
        return f"s3://{self.bucket}/{self.prefix(generation)}table.jsonl"

    def ensure_bucket(self) -> None:
        if not self.hook.check_for_bucket(self.bucket):
            self.hook.create_bucket(bucket_name=self.bucket)

    # --- populations ---------------------------------------------------------------------------
    def save_population(self, generation: int, population: Sequence[Genome]) -> None:
        document = [json.loads(genome.to_json()) for genome in population]
        self._put_json(f"{self.prefix(generation)}population.json", document)

    def population(self, generation: int) -> list[Genome]:
        return [
            Genome.model_validate(item)
            for item in self._get_json(f"{self.prefix(generation)}population.json")
        ]

    # --- results -------------------------------------------------------------------------------
    def scored(self, generation: int) -> list[Scored]:
        """The generation's genomes with the fitness their experiments reported (None: failed)."""
        rows = {row["key"]: row for row in self.table(generation)}
        scored: list[Scored] = []
        for genome in self.population(generation):
            row = rows.get(experiment_key(self.name, generation, genome), {})
            fitness = row.get(FITNESS_FIELD) if row.get("status") == "succeeded" else None
            scored.append((genome, float(fitness) if isinstance(fitness, (int, float)) else None))
        return scored

    def collect(self, generation: int, experiments: Any) -> list[dict[str, Any]]:
        """The generation's table from its experiments' scrape documents, saved beside it.

        ``experiments`` are the train tasks' runner summaries, whose scrape documents are read
        directly (no listing). The select task does this itself: a separate collect task cost
        the generation a task hop (process start and DAG parse) for a second of S3 reads. A
        missing or unreadable document is a row with an ``error``, as a failed genome scores nothing.
        """
        from airflow_provider_studio.scrape_collection import ScrapeCollector, scrape_client, wanted_from

        wanted = wanted_from(experiments)
        with ScrapeCollector(scrape_client(self.hook), fields=TABLE_FIELDS) as collector:
            table = collector.collect(wanted, bucket=self.bucket) if wanted else None
        rows = table.rows if table is not None else []
        text = "".join(json.dumps(row, default=str) + "\n" for row in rows)
        self.hook.load_string(
            text, key=f"{self.prefix(generation)}table.jsonl", bucket_name=self.bucket, replace=True
        )
        return rows

    def table(self, generation: int) -> list[dict[str, Any]]:
        text = self.hook.read_key(f"{self.prefix(generation)}table.jsonl", bucket_name=self.bucket)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def save_summary(self, generation: int, summary: dict[str, Any]) -> None:
        self._put_json(f"{self.prefix(generation)}summary.json", summary)

    def summaries(self) -> list[dict[str, Any]]:
        """Every finished generation's summary, oldest first."""
        keys = self.hook.list_keys(bucket_name=self.bucket, prefix=self.prefix()) or []
        documents = [self._get_json(key) for key in sorted(keys) if key.endswith("/summary.json")]
        return sorted(documents, key=lambda summary: summary["generation"])

    def save_plot(self, png: bytes) -> str:
        key = f"{self.prefix()}fitness.png"
        self.hook.load_bytes(png, key=key, bucket_name=self.bucket, replace=True)
        return f"s3://{self.bucket}/{key}"

    # --- plumbing ------------------------------------------------------------------------------
    def _put_json(self, key: str, document: Any) -> None:
        self.hook.load_string(json.dumps(document, indent=1), key=key, bucket_name=self.bucket, replace=True)

    def _get_json(self, key: str) -> Any:
        return json.loads(self.hook.read_key(key, bucket_name=self.bucket))


def fitness_plot(summaries: Sequence[dict[str, Any]], campaign: str) -> bytes:
    """Best and mean fitness by generation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    generations = [s["generation"] for s in summaries]
    figure, axes = pyplot.subplots(figsize=(6.4, 4.0), dpi=110)
    axes.plot(generations, [s["best_fitness"] for s in summaries], marker="o", label="best")
    axes.plot(generations, [s["mean_fitness"] for s in summaries], marker="s", linestyle="--", label="mean")
    axes.set_xlabel("generation")
    axes.set_ylabel("validation accuracy (fitness)")
    axes.set_xticks(generations)
    axes.set_title(f"ENN campaign {campaign!r}: digits MLP")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()
