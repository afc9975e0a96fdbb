"""The ENN workload script: its console format, its model artifacts, and its refusals."""

from __future__ import annotations

import ast
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dags.enn import genome as genome_module
from dags.enn.genome import Genome, random_genome
from tests.dags.workload_runs import SCRIPT, WORKLOAD_DIR, WorkloadRun, load_workload_module, run_workload

EPOCHS = 4
GENOME = Genome(
    hidden_layers=(48, 24),
    activation="relu",
    learning_rate=0.05,
    weight_decay=1e-4,
    batch_size=32,
    init_seed=7,
)


@pytest.fixture(scope="module")
def workload():
    return load_workload_module()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> WorkloadRun:
    run = run_workload(tmp_path_factory.mktemp("experiment"), GENOME, epochs=EPOCHS, seed=3)
    assert run.returncode == 0, run.stderr
    return run


# --- console ----------------------------------------------------------------------------------


def test_prints_one_json_line_per_epoch_then_the_summary(trained: WorkloadRun) -> None:
    lines = trained.lines
    assert len(lines) == EPOCHS + 1
    assert all(set(line) == {"experiment"} for line in lines)
    epochs = [line["experiment"] for line in lines[:-1]]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    for e in epochs:
        assert set(e) == {"epoch", "fitness", "loss", "genome_id"}
        assert e["genome_id"] == GENOME.genome_id
        assert 0.0 <= e["fitness"] <= 1.0
        assert e["loss"] > 0.0
    final = lines[-1]["experiment"]
    assert final["fitness"] == max(e["fitness"] for e in epochs)
    assert epochs[final["best_epoch"] - 1]["fitness"] == final["fitness"]
    assert final["genome_id"] == GENOME.genome_id
    assert final["train_seconds"] >= 0.0
    # 64 inputs -> 48 -> 24 -> 10 classes, weights and biases.
    assert final["parameters"] == 64 * 48 + 48 + 48 * 24 + 24 + 24 * 10 + 10
    assert final["diverged"] is False
    assert 0.0 <= final["test_accuracy"] <= 1.0
    assert final["fitness"] > 0.8, "a sane genome learns digits in a few epochs"


def test_the_runner_scrape_ends_with_the_best_validation_accuracy(trained: WorkloadRun) -> None:
    document = trained.document
    assert document["experiment"]["fitness"] == trained.lines[-1]["experiment"]["fitness"]
    assert document["experiment"]["epoch"] == EPOCHS
    assert trained.fitness == trained.lines[-1]["experiment"]["fitness"]


def test_stdout_is_only_json_and_stderr_is_quiet(trained: WorkloadRun) -> None:
    assert all(line.startswith("{") and line.endswith("}") for line in trained.stdout.splitlines())
    assert trained.stderr == ""


def test_same_genome_and_seed_train_the_same(tmp_path: Path, trained: WorkloadRun) -> None:
    again = run_workload(tmp_path, GENOME, epochs=EPOCHS, seed=3)
    assert [line["experiment"].get("fitness") for line in again.lines] == [
        line["experiment"].get("fitness") for line in trained.lines
    ]


# --- artifacts --------------------------------------------------------------------------------


def test_writes_the_best_weights_and_the_genome_to_modeldir(trained: WorkloadRun, workload) -> None:
    assert sorted(p.name for p in trained.modeldir.iterdir()) == ["genome.json", "weights.npz"]
    with np.load(trained.modeldir / "weights.npz") as saved:
        shapes = {name: saved[name].shape for name in saved.files}
        arrays = {name: saved[name] for name in saved.files}
    assert shapes == {"W0": (64, 48), "b0": (48,), "W1": (48, 24), "b1": (24,), "W2": (24, 10), "b2": (10,)}

    # The saved weights are the best epoch's: they score the reported fitness again.
    model = workload.MLP([64, 48, 24, 10], "relu", seed=0)
    model.weights = [arrays[f"W{i}"] for i in range(3)]
    model.biases = [arrays[f"b{i}"] for i in range(3)]
    x_val, y_val = workload.load_data()["validation"]
    final = trained.lines[-1]["experiment"]
    assert workload.accuracy(model, x_val, y_val) == final["fitness"]

    document = json.loads((trained.modeldir / "genome.json").read_text())
    assert (
        Genome.model_validate({**document["genome"], "genome_id": document["genome_id"]}).genes()
        == GENOME.genes()
    )
    assert document["fitness"] == final["fitness"]
    assert document["best_epoch"] == final["best_epoch"]
    assert document["epochs"] == EPOCHS


def test_workspace_imports_nothing_but_numpy_sklearn_and_the_stdlib() -> None:
    tree = ast.parse(SCRIPT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would need the project beside the workspace"
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "sklearn"}


def test_requirements_name_numpy_and_scikit_learn_with_floors_only() -> None:
    lines = [
        line.strip()
        for line in (WORKLOAD_DIR / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    names = {re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower() for line in lines}
    assert names == {"numpy", "scikit-learn"}
    assert all(re.fullmatch(r"[a-z-]+>=[0-9.]+", line) for line in lines), lines


def test_digits_come_from_scikit_learn_unchanged(workload) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    features, labels = workload.digits_arrays()
    np.testing.assert_array_equal(features, digits.data)
    np.testing.assert_array_equal(labels, digits.target)


def test_digits_fall_back_to_load_digits_when_the_data_file_moves(workload, monkeypatch) -> None:
    monkeypatch.setattr(workload.importlib.util, "find_spec", lambda name: None)
    features, labels = workload.digits_arrays()
    assert features.shape == (1797, 64)
    assert labels.shape == (1797,)


def test_the_split_is_a_fixed_stratified_partition(workload) -> None:
    first, second = workload.load_data(), workload.load_data()
    for name in first:
        np.testing.assert_array_equal(first[name][0], second[name][0])
    features, labels = workload.digits_arrays()
    everything = np.column_stack([features / 16.0, labels])
    parts = np.vstack([np.column_stack([x, y]) for x, y in first.values()])
    # Every sample is in exactly one split: the rows, sorted, are the data set's rows.
    np.testing.assert_array_equal(
        parts[np.lexsort(parts.T[::-1])], everything[np.lexsort(everything.T[::-1])]
    )
    n_validation = len(first["validation"][1])
    assert abs(n_validation - 0.2 * len(labels)) <= 10
    for _, y in first.values():
        counts = np.bincount(y, minlength=10)
        assert counts.min() >= 0.8 * counts.max(), "each class in each split in proportion"


# --- the genome contract shared with dags/enn/genome.py ----------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MIN_LAYERS",
        "MAX_LAYERS",
        "MIN_UNITS",
        "MAX_UNITS",
        "ACTIVATIONS",
        "LEARNING_RATE_RANGE",
        "WEIGHT_DECAY_RANGE",
        "BATCH_SIZES",
        "MAX_INIT_SEED",
        "GENE_NAMES",
    ],
)
def test_workload_bounds_mirror_the_genome(workload, name: str) -> None:
    assert getattr(workload, name) == getattr(genome_module, name)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_workload_accepts_every_genome_and_agrees_on_its_id(workload, seed: int) -> None:
    genome = random_genome(random.Random(seed))
    genes = workload.parse_genome(genome.to_json())
    assert genes["genome_id"] == genome.genome_id
    assert {k: v for k, v in genes.items() if k != "genome_id"} == genome.genes()


def test_a_diverging_genome_reports_finite_numbers(workload, tmp_path: Path, capsys) -> None:
    genes = {**GENOME.genes(), "learning_rate": 1e6, "genome_id": GENOME.genome_id}
    summary = workload.train(genes, 3, 0, tmp_path / "modeldir")
    lines = capsys.readouterr().out.splitlines()
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} printed: the scrape drops it"))
    assert summary["diverged"] is True
    assert json.loads(lines[-1])["experiment"]["fitness"] == summary["fitness"]
    assert (tmp_path / "modeldir" / "weights.npz").is_file()


# --- refusals ---------------------------------------------------------------------------------

VALID = json.loads(GENOME.to_json())


@pytest.mark.parametrize(
    ("genome", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({k: v for k, v in VALID.items() if k != "activation"}), "missing ['activation']"),
        (json.dumps({**VALID, "hidden_layers": [64, 500]}), "hidden_layers[1]=500 is outside 8..128"),
        (json.dumps({**VALID, "hidden_layers": []}), "hidden_layers must be a list of 1 to 3"),
        (json.dumps({**VALID, "hidden_layers": [8, 8, 8, 8]}), "hidden_layers must be a list of 1 to 3"),
        (json.dumps({**VALID, "activation": "gelu"}), "activation must be one of"),
        (json.dumps({**VALID, "learning_rate": 2.0}), "learning_rate=2.0 is outside"),
        (json.dumps({**VALID, "learning_rate": "fast"}), "learning_rate must be a finite number"),
        (json.dumps({**VALID, "batch_size": 33}), "batch_size must be one of"),
        (json.dumps({**VALID, "init_seed": True}), "init_seed must be an integer"),
        (json.dumps({**VALID, "dropout": 0.5}), "unknown genome keys ['dropout']"),
        (json.dumps({**VALID, "genome_id": "0123456789ab"}), "does not match its genes"),
    ],
)
def test_malformed_genome_exits_non_zero_and_says_why(tmp_path: Path, genome: str, reason: str) -> None:
    run = run_workload(tmp_path, genome, epochs=2)
    assert run.returncode == 2
    assert "malformed genome" in run.stderr
    assert reason in run.stderr
    assert run.fitness is None
    assert not run.modeldir.exists(), "nothing is trained or saved for a refused genome"
    assert run.document["experiment"]["error"].startswith("malformed genome")


@pytest.mark.parametrize("epochs", ["0", "-3", "x"])
def test_bad_epochs_are_refused_by_the_command_line(tmp_path: Path, epochs: str) -> None:
    run = run_workload(tmp_path, GENOME.to_json(), epochs=epochs)
    assert run.returncode == 2
    assert "--epochs" in run.stderr
