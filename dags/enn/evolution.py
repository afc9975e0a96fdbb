"""Breeding ENN generations: elitism, tournament selection, uniform crossover and mutation.

Everything is a pure function of its arguments and seed, so an Airflow task that is retried
(or a DAG run that is re-run) breeds exactly the same population. Fitness is whatever the
workload reported as ``experiment.fitness`` (higher is better); ``None`` marks a genome whose
experiment failed, which is never chosen as a parent.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from .genome import (
    ACTIVATIONS,
    BATCH_SIZES,
    LEARNING_RATE_RANGE,
    MAX_INIT_SEED,
    MAX_LAYERS,
    MAX_UNITS,
    MIN_LAYERS,
    MIN_UNITS,
    WEIGHT_DECAY_RANGE,
    Genome,
    clamp,
    random_genome,
    round_significant,
)

Scored = tuple[Genome, float | None]
"""A genome and the fitness its experiment reported; None when the experiment failed."""

DEFAULT_ELITE = 2
DEFAULT_MUTATION_RATE = 0.3
DEFAULT_CROSSOVER_RATE = 0.7
DEFAULT_TOURNAMENT_SIZE = 3

LEARNING_RATE_SIGMA = 0.7
"""Std-dev of a learning-rate step in natural-log space: one sigma halves or doubles it."""
WEIGHT_DECAY_SIGMA = 1.0
"""Weight decay spans four decades, so its steps are wider."""
UNITS_SIGMA = 0.3
"""Std-dev of a layer's size step in log space: 64 units move by about +-20."""
MAX_ATTEMPTS = 50
"""Extra mutations tried on a child equal to a known genome before an immigrant replaces it."""


def initial_population(size: int, seed: int) -> list[Genome]:
    """``size`` random genomes of generation 0, all with distinct ids."""
    _check_size(size)
    rng = random.Random(f"enn-initial:{seed}")
    population: list[Genome] = []
    seen: set[str] = set()
    while len(population) < size:
        genome = random_genome(rng, generation=0)
        if genome.genome_id not in seen:
            seen.add(genome.genome_id)
            population.append(genome)
    return population


def next_generation(
    scored: Sequence[Scored],
    size: int,
    seed: int,
    generation: int,
    *,
    elite: int = DEFAULT_ELITE,
    mutation_rate: float = DEFAULT_MUTATION_RATE,
    crossover_rate: float = DEFAULT_CROSSOVER_RATE,
    tournament_size: int = DEFAULT_TOURNAMENT_SIZE,
) -> list[Genome]:
    """Generation ``generation`` bred from the scored previous one.

    The ``elite`` fittest survive unchanged (same id, same lineage) at the head of the list;
    every other place is a child: tournament-selected parents, uniform crossover with
    probability ``crossover_rate``, then each gene group mutated with probability
    ``mutation_rate``. A child is never a copy of a genome already in the new population or
    one just scored (that would re-run a known experiment), so one that comes out equal is
    mutated again. Raises ValueError when no genome has a fitness: there is nothing to breed
    from, and the failures need looking at rather than another random generation.
    """
    _check_size(size)
    if generation < 1:
        raise ValueError(
            f"generation must be 1 or more (generation 0 is initial_population), got {generation}"
        )
    if elite < 0:
        raise ValueError(f"elite must be 0 or more, got {elite}")
    if tournament_size < 1:
        raise ValueError(f"tournament_size must be 1 or more, got {tournament_size}")
    for name, rate in (("mutation_rate", mutation_rate), ("crossover_rate", crossover_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {rate}")

    ranked = rank(scored)
    if not ranked:
        raise ValueError(
            f"none of the {len(scored)} genomes of generation {generation - 1} has a fitness "
            f"(all failed); fix the failing experiments before breeding generation {generation}"
        )
    rng = random.Random(f"enn-generation:{seed}:{generation}")
    population = [genome for genome, _ in ranked[: min(elite, size)]]
    taken = {genome.genome_id for genome in population}
    known = taken | {genome.genome_id for genome, _ in scored}

    while len(population) < size:
        child = _breed(rng, ranked, known, generation, mutation_rate, crossover_rate, tournament_size)
        population.append(child)
        taken.add(child.genome_id)
        known.add(child.genome_id)
    return population


def rank(scored: Iterable[Scored]) -> list[tuple[Genome, float]]:
    """Genomes with a finite fitness, best first, each id once (its best score).

    Ties go to the smaller id, so the order never depends on the order of ``scored``.
    """
    best: dict[str, tuple[Genome, float]] = {}
    for genome, fitness in scored:
        if fitness is None or not math.isfinite(fitness):
            continue
        current = best.get(genome.genome_id)
        if current is None or fitness > current[1]:
            best[genome.genome_id] = (genome, float(fitness))
    return sorted(best.values(), key=lambda item: (-item[1], item[0].genome_id))


def summarise(scored: Sequence[Scored]) -> dict[str, Any]:
    """Fitness statistics of one scored generation, JSON-ready (None where nothing succeeded)."""
    fitnesses = [f for _, f in scored if f is not None and math.isfinite(f)]
    ranked = rank(scored)
    return {
        "count": len(scored),
        "failures": len(scored) - len(fitnesses),
        "best_fitness": max(fitnesses) if fitnesses else None,
        "mean_fitness": statistics.fmean(fitnesses) if fitnesses else None,
        "worst_fitness": min(fitnesses) if fitnesses else None,
        "best_genome_id": ranked[0][0].genome_id if ranked else None,
    }


# --- operators --------------------------------------------------------------------------------


def tournament(rng: random.Random, ranked: Sequence[tuple[Genome, float]], size: int) -> Genome:
    """The fittest of ``size`` genomes drawn with replacement; ``ranked`` is best first."""
    return ranked[min(rng.randrange(len(ranked)) for _ in range(size))][0]


def crossover(rng: random.Random, a: Genome, b: Genome) -> dict[str, Any]:
    """Uniform crossover: each gene from either parent with equal chance.

    Layer lists may differ in depth: the child takes one parent's depth, and each of its layers
    the size of either parent's layer at that position, or the only parent that has one there.
    """
    depth = len(rng.choice((a, b)).hidden_layers)
    layers = []
    for i in range(depth):
        options = [p.hidden_layers[i] for p in (a, b) if i < len(p.hidden_layers)]
        layers.append(rng.choice(options))
    genes = {"hidden_layers": layers}
    for name in ("activation", "learning_rate", "weight_decay", "batch_size", "init_seed"):
        genes[name] = getattr(rng.choice((a, b)), name)
    return genes


def mutate(rng: random.Random, genes: dict[str, Any], rate: float, *, force: bool = False) -> dict[str, Any]:
    """Each gene group changes with probability ``rate``; ``force`` makes sure one does.

    Rates move by a gaussian step in log space (they matter by ratio), layer sizes by a
    log-space step of at least one unit, a layer may be added or removed, the activation and
    batch size move to another value, and the weight-init seed is redrawn. Results are clamped
    to the genome's bounds.
    """
    genes = {**genes, "hidden_layers": list(genes["hidden_layers"])}
    operators = list(_MUTATIONS)
    chosen = [op for op in operators if rng.random() < rate]
    if force and not chosen:
        chosen = [rng.choice(operators)]
    for op in chosen:
        op(rng, genes)
    return genes


def _mutate_units(rng: random.Random, genes: dict[str, Any]) -> None:
    layers = genes["hidden_layers"]
    i = rng.randrange(len(layers))
    step = round(layers[i] * (math.exp(rng.gauss(0.0, UNITS_SIGMA)) - 1.0))
    if step == 0:
        step = rng.choice((-1, 1))
    layers[i] = int(clamp(layers[i] + step, MIN_UNITS, MAX_UNITS))


def _mutate_depth(rng: random.Random, genes: dict[str, Any]) -> None:
    layers = genes["hidden_layers"]
    grow = len(layers) < MAX_LAYERS and (len(layers) == MIN_LAYERS or rng.random() < 0.5)
    if grow:
        i = rng.randrange(len(layers) + 1)
        # A new layer copies a neighbour's size, so the function the network can express
        # changes little and the child stays near its parent.
        layers.insert(i, layers[min(i, len(layers) - 1)])
    elif len(layers) > MIN_LAYERS:
        del layers[rng.randrange(len(layers))]


def _mutate_activation(rng: random.Random, genes: dict[str, Any]) -> None:
    genes["activation"] = rng.choice([a for a in ACTIVATIONS if a != genes["activation"]])


def _mutate_learning_rate(rng: random.Random, genes: dict[str, Any]) -> None:
    genes["learning_rate"] = _log_step(rng, genes["learning_rate"], LEARNING_RATE_SIGMA, LEARNING_RATE_RANGE)


def _mutate_weight_decay(rng: random.Random, genes: dict[str, Any]) -> None:
    genes["weight_decay"] = _log_step(rng, genes["weight_decay"], WEIGHT_DECAY_SIGMA, WEIGHT_DECAY_RANGE)


def _mutate_batch_size(rng: random.Random, genes: dict[str, Any]) -> None:
    i = BATCH_SIZES.index(genes["batch_size"])
    neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(BATCH_SIZES)]
    genes["batch_size"] = BATCH_SIZES[rng.choice(neighbours)]


def _mutate_init_seed(rng: random.Random, genes: dict[str, Any]) -> None:
    genes["init_seed"] = rng.randint(0, MAX_INIT_SEED)


_MUTATIONS = (
    _mutate_units,
    _mutate_depth,
    _mutate_activation,
    _mutate_learning_rate,
    _mutate_weight_decay,
    _mutate_batch_size,
    _mutate_init_seed,
)


def _log_step(rng: random.Random, value: float, sigma: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return clamp(round_significant(math.exp(math.log(value) + rng.gauss(0.0, sigma))), low, high)


def _breed(
    rng: random.Random,
    ranked: Sequence[tuple[Genome, float]],
    known: set[str],
    generation: int,
    mutation_rate: float,
    crossover_rate: float,
    tournament_size: int,
) -> Genome:
    """One new child whose id is not in ``known``."""
    first = tournament(rng, ranked, tournament_size)
    parents = [first]
    if len(ranked) > 1 and rng.random() < crossover_rate:
        others = [item for item in ranked if item[0].genome_id != first.genome_id]
        parents.append(tournament(rng, others, tournament_size))
        genes = crossover(rng, first, parents[1])
    else:
        genes = first.genes()
    genes = mutate(rng, genes, mutation_rate)
    lineage = tuple(p.genome_id for p in parents)
    for _ in range(MAX_ATTEMPTS):
        child = Genome(**genes, parents=lineage, generation=generation)
        if child.genome_id not in known:
            return child
        # Equal to a known genome, so it would re-run a known experiment: mutate it further.
        genes = mutate(rng, genes, mutation_rate, force=True)
    # Practically unreachable (the search space is huge): an immigrant keeps the size up.
    while True:
        child = random_genome(rng, generation=generation)
        if child.genome_id not in known:
            return child


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"population size must be a positive integer, got {size!r}")
