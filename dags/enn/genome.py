"""One ENN genome: the genes of a small feed-forward classifier, plus where it came from.

The genes are what ``workload/train_genome.py`` trains; it cannot import this module (its
workspace is uploaded alone), so it re-checks the same bounds and a test keeps the two equal.
A genome's id hashes its genes only, so two genomes with equal genes are the same experiment
whatever their lineage, and the id stays stable across JSON round trips and processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

MIN_LAYERS, MAX_LAYERS = 1, 3
MIN_UNITS, MAX_UNITS = 8, 128
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid")
LEARNING_RATE_RANGE = (1e-3, 3e-1)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
BATCH_SIZES: tuple[int, ...] = (16, 32, 64, 128)
MAX_INIT_SEED = 2**31 - 1
GENE_NAMES: tuple[str, ...] = (
    "hidden_layers",
    "activation",
    "learning_rate",
    "weight_decay",
    "batch_size",
    "init_seed",
)
SIGNIFICANT_DIGITS = 4
"""Rates are kept to 4 significant digits: ids stay readable and equal genes hash equal."""
ID_LENGTH = 12

Activation = Literal["relu", "tanh", "sigmoid"]


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    return float(f"{value:.{digits - 1}e}")


def clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def genome_id_of(genes: dict[str, Any]) -> str:
    """12 hex digits of SHA-256 over the genes' canonical JSON (the workload computes the same)."""
    canonical = json.dumps({name: genes[name] for name in GENE_NAMES}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:ID_LENGTH]


class Genome(BaseModel):
    """Immutable; ``model_dump_json()`` is what the workload's ``--genome`` takes."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    hidden_layers: tuple[int, ...] = Field(min_length=MIN_LAYERS, max_length=MAX_LAYERS)
    activation: Activation
    learning_rate: float = Field(ge=LEARNING_RATE_RANGE[0], le=LEARNING_RATE_RANGE[1])
    weight_decay: float = Field(ge=WEIGHT_DECAY_RANGE[0], le=WEIGHT_DECAY_RANGE[1])
    batch_size: int
    init_seed: int = Field(ge=0, le=MAX_INIT_SEED)
    parents: tuple[str, ...] = Field(default=(), max_length=2)
    """Ids of the genomes this one was bred from: none for a random one, one for a mutant."""
    generation: int = Field(default=0, ge=0)
    """The generation this genome was born in; elites keep theirs as they survive."""

    @field_validator("hidden_layers")
    @classmethod
    def _units_in_range(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        for units in layers:
            if not MIN_UNITS <= units <= MAX_UNITS:
                raise ValueError(f"a hidden layer has {units} units; each needs {MIN_UNITS}..{MAX_UNITS}")
        return layers

    @field_validator("learning_rate", "weight_decay")
    @classmethod
    def _rounded(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return round_significant(value)

    @field_validator("batch_size")
    @classmethod
    def _known_batch_size(cls, value: int) -> int:
        if value not in BATCH_SIZES:
            raise ValueError(f"batch_size {value} is not one of {list(BATCH_SIZES)}")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _from_json(cls, data: Any, handler: Any) -> Genome:
        """Take JSON's shapes (lists for tuples) and check a serialised ``genome_id`` against the genes."""
        claimed = None
        if isinstance(data, dict):
            data = dict(data)
            claimed = data.pop("genome_id", None)
            for name in ("hidden_layers", "parents"):
                if isinstance(data.get(name), list):
                    data[name] = tuple(data[name])
        genome = handler(data)
        if claimed is not None and claimed != genome.genome_id:
            raise ValueError(
                f"genome_id {claimed!r} does not match its genes (they hash to {genome.genome_id!r}); "
                "the genome was edited after it was created"
            )
        return genome

    @computed_field  # type: ignore[prop-decorator]
    @property
    def genome_id(self) -> str:
        return genome_id_of(self.genes())

    def genes(self) -> dict[str, Any]:
        """The heritable part, JSON-shaped; lineage is left out."""
        return {
            "hidden_layers": list(self.hidden_layers),
            "activation": self.activation,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "init_seed": self.init_seed,
        }

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Genome:
        return cls.model_validate(json.loads(text))

    def describe(self) -> str:
        """A one-line label for logs and plots."""
        layers = "x".join(str(units) for units in self.hidden_layers)
        return (
            f"{self.genome_id} [{layers} {self.activation} lr={self.learning_rate:g} "
            f"l2={self.weight_decay:g} bs={self.batch_size}]"
        )


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def random_genome(rng: random.Random, generation: int = 0) -> Genome:
    """A genome drawn from the whole search space: rates log-uniform, sizes uniform."""
    depth = rng.randint(MIN_LAYERS, MAX_LAYERS)
    return Genome(
        hidden_layers=tuple(rng.randint(MIN_UNITS, MAX_UNITS) for _ in range(depth)),
        activation=rng.choice(ACTIVATIONS),
        learning_rate=clamp(round_significant(log_uniform(rng, *LEARNING_RATE_RANGE)), *LEARNING_RATE_RANGE),
        weight_decay=clamp(round_significant(log_uniform(rng, *WEIGHT_DECAY_RANGE)), *WEIGHT_DECAY_RANGE),
        batch_size=rng.choice(BATCH_SIZES),
        init_seed=rng.randint(0, MAX_INIT_SEED),
        generation=generation,
    )
