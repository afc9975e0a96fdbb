"""ENN genomes and breeding: properties of the operators, and a real mini-evolution."""

from __future__ import annotations

import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dags.enn.evolution import (
    crossover,
    initial_population,
    mutate,
    next_generation,
    rank,
    summarise,
)
from dags.enn.genome import (
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
    random_genome,
)
from tests.dags.workload_runs import run_workload

seeds = st.integers(min_value=0, max_value=2**32)

BASE = Genome(
    hidden_layers=(64, 32),
    activation="tanh",
    learning_rate=0.05,
    weight_decay=1e-4,
    batch_size=32,
    init_seed=11,
)


def fitness_of(genome: Genome) -> float:
    """A made-up deterministic fitness for breeding tests that need no training."""
    return int(genome.genome_id[:8], 16) / 16**8


def scored_population(size: int, seed: int, failed: int = 0) -> list[tuple[Genome, float | None]]:
    population = initial_population(size, seed)
    return [(g, None if i < failed else fitness_of(g)) for i, g in enumerate(population)]


def assert_in_bounds(genome: Genome) -> None:
    assert MIN_LAYERS <= len(genome.hidden_layers) <= MAX_LAYERS
    assert all(MIN_UNITS <= units <= MAX_UNITS for units in genome.hidden_layers)
    assert genome.activation in ACTIVATIONS
    assert LEARNING_RATE_RANGE[0] <= genome.learning_rate <= LEARNING_RATE_RANGE[1]
    assert WEIGHT_DECAY_RANGE[0] <= genome.weight_decay <= WEIGHT_DECAY_RANGE[1]
    assert genome.batch_size in BATCH_SIZES
    assert 0 <= genome.init_seed <= MAX_INIT_SEED


# --- the genome -------------------------------------------------------------------------------


@settings(max_examples=200)
@given(seeds)
def test_json_round_trip_keeps_genes_lineage_and_id(seed: int) -> None:
    genome = random_genome(random.Random(seed), generation=3).model_copy(update={"parents": ("a" * 12,)})
    text = genome.to_json()
    again = Genome.from_json(text)
    assert again == genome
    assert again.genome_id == genome.genome_id == json.loads(text)["genome_id"]
    assert again.to_json() == text


def test_genome_id_is_pinned() -> None:
    """Ids name experiments in queues and buckets: changing the hash orphans all of them."""
    assert BASE.genome_id == "ad4137b46e9e"
    assert len(BASE.genome_id) == 12


def test_genome_id_depends_on_genes_only() -> None:
    child = BASE.model_copy(update={"parents": ("abc", "def"), "generation": 4})
    assert Genome.from_json(child.to_json()).genome_id == BASE.genome_id
    for change in (
        {"hidden_layers": (64, 33)},
        {"hidden_layers": (64, 32, 8)},
        {"activation": "relu"},
        {"learning_rate": 0.051},
        {"weight_decay": 2e-4},
        {"batch_size": 64},
        {"init_seed": 12},
    ):
        assert Genome(**{**BASE.genes(), **change}).genome_id != BASE.genome_id, change


def test_genome_is_immutable() -> None:
    with pytest.raises(ValidationError):
        BASE.learning_rate = 0.1  # type: ignore[misc]


def test_rates_are_kept_to_four_significant_digits() -> None:
    genome = Genome(**{**BASE.genes(), "learning_rate": 0.0123456789})
    assert genome.learning_rate == 0.01235


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_layers": ()},
        {"hidden_layers": (8, 8, 8, 8)},
        {"hidden_layers": (7,)},
        {"hidden_layers": (129,)},
        {"activation": "gelu"},
        {"learning_rate": 0.5},
        {"learning_rate": 1e-4},
        {"learning_rate": math.nan},
        {"weight_decay": 0.0},
        {"batch_size": 48},
        {"batch_size": 32.0},
        {"init_seed": -1},
        {"init_seed": True},
        {"hidden_layers": ("64",)},
    ],
)
def test_out_of_bounds_genes_are_refused(change: dict) -> None:
    with pytest.raises(ValidationError):
        Genome(**{**BASE.genes(), **change})


def test_an_edited_genome_json_is_refused() -> None:
    document = json.loads(BASE.to_json())
    document["learning_rate"] = 0.2
    with pytest.raises(ValidationError, match="does not match its genes"):
        Genome.model_validate(document)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="dropout"):
        Genome.model_validate({**BASE.genes(), "dropout": 0.5})


# --- operators --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(seeds, st.floats(min_value=0.0, max_value=1.0))
def test_many_mutations_stay_in_bounds(seed: int, rate: float) -> None:
    rng = random.Random(seed)
    genes = random_genome(rng).genes()
    for _ in range(200):
        genes = mutate(rng, genes, rate, force=True)
        assert_in_bounds(Genome(**genes))


@settings(max_examples=200)
@given(seeds)
def test_mutation_leaves_the_parent_alone(seed: int) -> None:
    rng = random.Random(seed)
    parent = random_genome(rng)
    before = parent.genes()
    genes = before.copy()
    mutate(rng, genes, 1.0)
    assert genes == before


def test_a_forced_mutation_almost_always_changes_the_genes() -> None:
    """Not always: a step can be clamped at a bound or rounded away; breeding retries those."""
    rng = random.Random(0)
    genes = [random_genome(rng).genes() for _ in range(500)]
    changed = sum(mutate(rng, g, 0.0, force=True) != g for g in genes)
    assert changed >= 475


@settings(max_examples=200)
@given(seeds)
def test_crossover_takes_every_gene_from_a_parent(seed: int) -> None:
    rng = random.Random(seed)
    a, b = random_genome(rng), random_genome(rng)
    child = crossover(rng, a, b)
    assert len(child["hidden_layers"]) in (len(a.hidden_layers), len(b.hidden_layers))
    for i, units in enumerate(child["hidden_layers"]):
        assert units in [p.hidden_layers[i] for p in (a, b) if i < len(p.hidden_layers)]
    for name in ("activation", "learning_rate", "weight_decay", "batch_size", "init_seed"):
        assert child[name] in (getattr(a, name), getattr(b, name))
    assert_in_bounds(Genome(**child))


# --- populations ------------------------------------------------------------------------------


@settings(max_examples=50)
@given(seeds, st.integers(min_value=1, max_value=30))
def test_initial_population_is_distinct_and_repeatable(seed: int, size: int) -> None:
    population = initial_population(size, seed)
    assert len(population) == size
    assert len({g.genome_id for g in population}) == size
    assert all(g.generation == 0 and g.parents == () for g in population)
    assert population == initial_population(size, seed)


def test_initial_population_depends_on_the_seed() -> None:
    assert initial_population(8, 1) != initial_population(8, 2)


@settings(max_examples=50, deadline=None)
@given(seeds, st.integers(min_value=2, max_value=20))
def test_next_generation_is_deterministic_for_a_seed(seed: int, size: int) -> None:
    scored = scored_population(size, seed, failed=size // 3)
    first = next_generation(scored, size, seed, 1)
    assert first == next_generation(scored, size, seed, 1)
    assert first == next_generation(list(reversed(scored)), size, seed, 1), (
        "the order of results is irrelevant"
    )


def test_next_generation_depends_on_seed_and_generation() -> None:
    scored = scored_population(10, 0)
    base = next_generation(scored, 10, 0, 1)
    assert next_generation(scored, 10, 1, 1) != base
    assert next_generation(scored, 10, 0, 2) != base


@settings(max_examples=50, deadline=None)
@given(seeds, st.integers(min_value=2, max_value=20), st.integers(min_value=0, max_value=5))
def test_elites_survive_unchanged_at_the_head(seed: int, size: int, elite: int) -> None:
    scored = scored_population(size, seed, failed=1)
    population = next_generation(scored, size, seed, 1, elite=elite)
    best = [g for g, _ in rank(scored)][: min(elite, size)]
    assert population[: len(best)] == best
    assert all(g.generation == 0 for g in population[: len(best)])


@settings(max_examples=100, deadline=None)
@given(
    seeds,
    st.integers(min_value=2, max_value=16),
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=0.0, max_value=1.0),
    st.data(),
)
def test_failed_genomes_are_never_parents_nor_elites(
    seed: int, size: int, mutation_rate: float, crossover_rate: float, data: st.DataObject
) -> None:
    failed = data.draw(st.integers(min_value=0, max_value=size - 1))
    scored = scored_population(size, seed, failed=failed)
    failed_ids = {g.genome_id for g, f in scored if f is None}
    population = next_generation(
        scored, size, seed, 1, elite=2, mutation_rate=mutation_rate, crossover_rate=crossover_rate
    )
    assert not failed_ids & {g.genome_id for g in population}
    assert not failed_ids & {p for g in population for p in g.parents}


@settings(max_examples=100, deadline=None)
@given(
    seeds,
    st.integers(min_value=1, max_value=24),
    st.integers(min_value=1, max_value=24),
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_no_duplicate_ids_and_lineage_is_recorded(
    seed: int, previous: int, size: int, mutation_rate: float, crossover_rate: float
) -> None:
    scored = scored_population(previous, seed)
    previous_ids = {g.genome_id for g, _ in scored}
    population = next_generation(
        scored, size, seed, 5, elite=1, mutation_rate=mutation_rate, crossover_rate=crossover_rate
    )
    assert len(population) == size
    assert len({g.genome_id for g in population}) == size
    elite, children = population[:1], population[1:]
    assert elite[0].genome_id in previous_ids
    for child in children:
        assert child.genome_id not in previous_ids, "a child re-running a scored experiment"
        assert child.generation == 5
        assert 1 <= len(child.parents) <= 2
        assert set(child.parents) <= previous_ids
        assert len(set(child.parents)) == len(child.parents)
        assert_in_bounds(child)


def test_zero_rates_still_give_new_children() -> None:
    scored = scored_population(3, 0)
    population = next_generation(scored, 12, 0, 1, elite=3, mutation_rate=0.0, crossover_rate=0.0)
    assert len({g.genome_id for g in population}) == 12


def test_all_failed_is_an_error_that_says_so() -> None:
    with pytest.raises(ValueError, match="all failed"):
        next_generation(scored_population(4, 0, failed=4), 4, 0, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "population size"),
        ({"generation": 0}, "generation must be 1 or more"),
        ({"elite": -1}, "elite"),
        ({"mutation_rate": 1.5}, "mutation_rate"),
        ({"crossover_rate": -0.1}, "crossover_rate"),
        ({"tournament_size": 0}, "tournament_size"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    arguments = {"size": 4, "seed": 0, "generation": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        next_generation(scored_population(4, 0), **arguments)


def test_summarise() -> None:
    a, b, c, d = initial_population(4, 0)
    summary = summarise([(a, 0.5), (b, None), (c, 0.9), (d, 0.7)])
    assert summary == {
        "count": 4,
        "failures": 1,
        "best_fitness": 0.9,
        "mean_fitness": pytest.approx(0.7),
        "worst_fitness": 0.5,
        "best_genome_id": c.genome_id,
    }
    json.dumps(summary)
    assert summarise([(a, None)]) == {
        "count": 1,
        "failures": 1,
        "best_fitness": None,
        "mean_fitness": None,
        "worst_fitness": None,
        "best_genome_id": None,
    }


# --- a real evolution -------------------------------------------------------------------------

# Chosen by running this evolution for seeds 0-39: with 2 epochs, 8 genomes and 5 generations
# (the breeding defaults) 39 of 40 seeds improve, and seed 3 improves in most generations,
# so a platform whose arithmetic differs slightly still takes an improving path.
EVOLUTION_SEED = 3
TRAINING_SEED = 0
POPULATION = 8
GENERATIONS = 5
EPOCHS = 2
WORKERS = min(4, os.cpu_count() or 1)


def test_best_fitness_improves_over_a_real_evolution(tmp_path: Path) -> None:
    """Genomes trained by the workload script itself, scored as the runner's scrape reads them.

    Elites are not trained again: the DAG reuses a known genome's fitness too, and training
    is deterministic for a genome and seed anyway.
    """
    fitness: dict[str, float | None] = {}

    def score(population: list[Genome], pool: ThreadPoolExecutor) -> list[tuple[Genome, float | None]]:
        new = [g for g in population if g.genome_id not in fitness]
        runs = pool.map(
            lambda g: run_workload(tmp_path / g.genome_id, g, epochs=EPOCHS, seed=TRAINING_SEED), new
        )
        for genome, run in zip(new, runs, strict=True):
            assert run.returncode == 0, run.stderr
            fitness[genome.genome_id] = run.fitness
        return [(g, fitness[g.genome_id]) for g in population]

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        scored = score(initial_population(POPULATION, EVOLUTION_SEED), pool)
        history = [summarise(scored)]
        for generation in range(1, GENERATIONS):
            scored = score(next_generation(scored, POPULATION, EVOLUTION_SEED, generation), pool)
            history.append(summarise(scored))
    best = [summary["best_fitness"] for summary in history]
    print("best fitness per generation:", [round(b, 4) for b in best])
    assert best == sorted(best), "elitism never loses the best genome"
    assert best[-1] > best[0], best
