"""StudioML workload: train one ENN genome's MLP on scikit-learn's digits and report its fitness.

This folder is the experiment's workspace and is uploaded alone, so the script imports nothing
from the project: it re-checks the genome itself (the bounds mirror ``dags/enn/genome.py``, a
test keeps them equal). The network is written out in numpy, forward and backward, on purpose:
the demo shows what a genome's genes do.

Usage (what the runner executes, in a virtualenv holding only numpy and scikit-learn)::

    python train_genome.py --genome '<genome json>' --epochs 10 --seed 0

stdout carries one JSON line per epoch, ``{"experiment": {"epoch", "fitness", "loss",
"genome_id"}}``, then a final ``{"experiment": {"fitness": <best validation accuracy>, ...}}``;
the runner merges them into the metadata document, so ``experiment.fitness`` ends as the best
validation accuracy. The best epoch's weights go to ``../modeldir/weights.npz`` with
``../modeldir/genome.json`` beside them (the StudioML ``../<label>`` artifact layout).
A malformed genome exits with status 2 and says what is wrong on stderr.
"""

from __future__ import annotations

import os

# One BLAS thread: the matrices are small (threads cost more than they save) and the runner
# packs several experiments per machine. Set before numpy loads; an explicit setting wins.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

# --- the genome (mirrors dags/enn/genome.py) --------------------------------------------------

MIN_LAYERS, MAX_LAYERS = 1, 3
MIN_UNITS, MAX_UNITS = 8, 128
ACTIVATIONS = ("relu", "tanh", "sigmoid")
LEARNING_RATE_RANGE = (1e-3, 3e-1)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
BATCH_SIZES = (16, 32, 64, 128)
MAX_INIT_SEED = 2**31 - 1
GENE_NAMES = ("hidden_layers", "activation", "learning_rate", "weight_decay", "batch_size", "init_seed")
LINEAGE_NAMES = ("genome_id", "parents", "generation")
MAX_EPOCHS = 1000

# --- training constants -----------------------------------------------------------------------

SPLIT_SEED = 20240601
"""Fixed, so every genome of every generation is scored on the same validation set."""
VALIDATION_FRACTION = 0.2
TEST_FRACTION = 0.2
MOMENTUM = 0.9
EXIT_MALFORMED = 2


class MalformedGenome(ValueError):
    """The --genome argument is not a genome this script can train."""


def genome_id_of(genes: dict[str, Any]) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of the genes (same as genome.py)."""
    canonical = json.dumps({name: genes[name] for name in GENE_NAMES}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedGenome(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise MalformedGenome(f"{name}={value} is outside {low}..{high}")
    return value


def _float(value: Any, name: str, bounds: tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedGenome(f"{name} must be a finite number, got {value!r}")
    low, high = bounds
    if not low <= value <= high:
        raise MalformedGenome(f"{name}={value} is outside {low:g}..{high:g}")
    return float(value)


def parse_genome(text: str) -> dict[str, Any]:
    """The checked genes of a genome JSON object plus its ``genome_id``; MalformedGenome if bad."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise MalformedGenome(f"--genome is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise MalformedGenome(f"--genome must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(GENE_NAMES) - set(LINEAGE_NAMES))
    if unknown:
        raise MalformedGenome(f"unknown genome keys {unknown}; expected {list(GENE_NAMES)}")
    missing = [name for name in GENE_NAMES if name not in raw]
    if missing:
        raise MalformedGenome(f"genome is missing {missing}")

    layers = raw["hidden_layers"]
    if not isinstance(layers, list) or not MIN_LAYERS <= len(layers) <= MAX_LAYERS:
        raise MalformedGenome(
            f"hidden_layers must be a list of {MIN_LAYERS} to {MAX_LAYERS} layer sizes, got {layers!r}"
        )
    genes: dict[str, Any] = {
        "hidden_layers": [
            _int(units, f"hidden_layers[{i}]", MIN_UNITS, MAX_UNITS) for i, units in enumerate(layers)
        ],
        "activation": raw["activation"],
        "learning_rate": _float(raw["learning_rate"], "learning_rate", LEARNING_RATE_RANGE),
        "weight_decay": _float(raw["weight_decay"], "weight_decay", WEIGHT_DECAY_RANGE),
        "batch_size": raw["batch_size"],
        "init_seed": _int(raw["init_seed"], "init_seed", 0, MAX_INIT_SEED),
    }
    if genes["activation"] not in ACTIVATIONS:
        raise MalformedGenome(f"activation must be one of {list(ACTIVATIONS)}, got {raw['activation']!r}")
    if isinstance(raw["batch_size"], bool) or raw["batch_size"] not in BATCH_SIZES:
        raise MalformedGenome(f"batch_size must be one of {list(BATCH_SIZES)}, got {raw['batch_size']!r}")
    computed = genome_id_of(genes)
    claimed = raw.get("genome_id")
    if claimed is not None and claimed != computed:
        raise MalformedGenome(
            f"genome_id {claimed!r} does not match its genes (they hash to {computed!r}); "
            "the genome was edited or corrupted after it was created"
        )
    genes["genome_id"] = computed
    return genes


# --- data -------------------------------------------------------------------------------------


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes): nothing to download.

    Read straight from the package's data file when it is where ``load_digits`` reads it:
    importing ``sklearn.datasets`` costs well over a second, far more than training a genome.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as stream:
                table = np.loadtxt(stream, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target


def load_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digits scaled to [0, 1] in a fixed stratified train/validation/test split."""
    features, labels = digits_arrays()
    x = (features / 16.0).astype(np.float64)
    y = labels.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for label in np.unique(y):
        index = rng.permutation(np.flatnonzero(y == label))
        n_val = round(len(index) * VALIDATION_FRACTION)
        n_test = round(len(index) * TEST_FRACTION)
        parts["validation"].append(index[:n_val])
        parts["test"].append(index[n_val : n_val + n_test])
        parts["train"].append(index[n_val + n_test :])
    split = {}
    for name, chunks in parts.items():
        index = np.sort(np.concatenate(chunks))
        split[name] = (x[index], y[index])
    return split


# --- the network ------------------------------------------------------------------------------


def _activate(z: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without exp overflow


def _activation_grad(a: np.ndarray, name: str) -> np.ndarray:
    """Derivative in terms of the activation's output ``a``, which the forward pass keeps."""
    if name == "relu":
        return (a > 0.0).astype(a.dtype)
    if name == "tanh":
        return 1.0 - a * a
    return a * (1.0 - a)


class MLP:
    """Dense layers, the genome's activation between them, softmax cross-entropy on top."""

    def __init__(self, sizes: list[int], activation: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        # He init for relu, Glorot for the saturating ones: keeps early gradients usable.
        self.activation = activation
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            scale = math.sqrt(2.0 / fan_in) if activation == "relu" else math.sqrt(2.0 / (fan_in + fan_out))
            self.weights.append(rng.normal(0.0, scale, size=(fan_in, fan_out)))
            self.biases.append(np.zeros(fan_out))

    @property
    def parameters(self) -> int:
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases, strict=True))

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's output, input first and logits last (the backward pass needs them)."""
        outputs = [x]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            z = outputs[-1] @ w + b
            outputs.append(z if i == last else _activate(z, self.activation))
        return outputs

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.forward(x)[-1], axis=1)

    def loss_and_gradients(
        self, x: np.ndarray, y: np.ndarray, weight_decay: float
    ) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        """Mean cross-entropy plus the L2 penalty on weights (not biases), and its gradients."""
        outputs = self.forward(x)
        logits = outputs[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_probs = shifted - log_norm
        n = x.shape[0]
        rows = np.arange(n)
        loss = -log_probs[rows, y].mean()
        loss += 0.5 * weight_decay * sum(float(np.sum(w * w)) for w in self.weights)

        delta = np.exp(log_probs)  # softmax; d(loss)/d(logits) = (p - onehot) / n
        delta[rows, y] -= 1.0
        delta /= n
        grad_w: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        grad_b: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        for i in range(len(self.weights) - 1, -1, -1):
            grad_w[i] = outputs[i].T @ delta + weight_decay * self.weights[i]
            grad_b[i] = delta.sum(axis=0)
            if i:
                delta = (delta @ self.weights[i].T) * _activation_grad(outputs[i], self.activation)
        return float(loss), grad_w, grad_b


def accuracy(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x) == y))


def emit(fields: dict[str, Any]) -> None:
    """One scrape line; allow_nan=False because the runner's scrape drops non-finite numbers."""
    print(json.dumps({"experiment": fields}, allow_nan=False), flush=True)


def train(genes: dict[str, Any], epochs: int, seed: int, modeldir: Path) -> dict[str, Any]:
    """Train, print one line per epoch and the summary, save the best epoch's weights."""
    started = time.perf_counter()
    data = load_data()
    loaded = time.perf_counter()
    x_test, y_test = data["test"]
    classes = int(max(labels.max() for _, labels in data.values())) + 1
    sizes = [x_test.shape[1], *genes["hidden_layers"], classes]
    model = MLP(sizes, genes["activation"], genes["init_seed"])
    # Overflow is how a too-large learning rate shows; it is reported as "diverged" instead.
    with np.errstate(over="ignore", invalid="ignore"):
        best_epoch, best_fitness, diverged = fit(model, genes, data, epochs, seed)
        test_acc = accuracy(model, x_test, y_test) if best_epoch else 0.0
    summary = {
        "fitness": best_fitness,
        "best_epoch": best_epoch,
        "test_accuracy": test_acc,
        "diverged": diverged,
        "parameters": model.parameters,
        "genome_id": genes["genome_id"],
    }
    trained = time.perf_counter()
    save(modeldir, model, genes, {**summary, "epochs": epochs, "seed": seed})
    summary["data_seconds"] = round(loaded - started, 3)
    summary["train_seconds"] = round(trained - loaded, 3)
    emit(summary)
    return summary


def fit(
    model: MLP,
    genes: dict[str, Any],
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    epochs: int,
    seed: int,
) -> tuple[int, float, bool]:
    """Mini-batch SGD with momentum; leaves the model at its best validation epoch.

    Returns (best epoch, its validation accuracy, diverged); epoch 0 means no epoch finished.
    """
    x_train, y_train = data["train"]
    x_val, y_val = data["validation"]
    lr, decay, batch = genes["learning_rate"], genes["weight_decay"], genes["batch_size"]
    velocity_w = [np.zeros_like(w) for w in model.weights]
    velocity_b = [np.zeros_like(b) for b in model.biases]
    shuffle = np.random.default_rng(seed)
    best_epoch, best_fitness = 0, 0.0
    best_weights = [w.copy() for w in model.weights]
    best_biases = [b.copy() for b in model.biases]
    diverged = False
    for epoch in range(1, epochs + 1):
        order = shuffle.permutation(len(y_train))
        total = 0.0
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            loss, grad_w, grad_b = model.loss_and_gradients(x_train[rows], y_train[rows], decay)
            if not math.isfinite(loss):
                diverged = True
                break
            total += loss * len(rows)
            for i in range(len(model.weights)):
                velocity_w[i] = MOMENTUM * velocity_w[i] - lr * grad_w[i]
                velocity_b[i] = MOMENTUM * velocity_b[i] - lr * grad_b[i]
                model.weights[i] += velocity_w[i]
                model.biases[i] += velocity_b[i]
        if diverged or not all(np.isfinite(w).all() for w in model.weights):
            # A learning rate that blows up makes a bad genome, not a failed experiment: it
            # keeps the fitness it reached before diverging.
            diverged = True
            emit({"epoch": epoch, "fitness": 0.0, "loss": None, "genome_id": genes["genome_id"]})
            break
        val_acc = accuracy(model, x_val, y_val)
        emit(
            {
                "epoch": epoch,
                "fitness": val_acc,
                "loss": total / len(y_train),
                "genome_id": genes["genome_id"],
            }
        )
        if val_acc > best_fitness:
            best_epoch, best_fitness = epoch, val_acc
            best_weights = [w.copy() for w in model.weights]
            best_biases = [b.copy() for b in model.biases]
    model.weights, model.biases = best_weights, best_biases
    return best_epoch, best_fitness, diverged


def save(modeldir: Path, model: MLP, genes: dict[str, Any], result: dict[str, Any]) -> None:
    modeldir.mkdir(parents=True, exist_ok=True)
    arrays = {f"W{i}": w for i, w in enumerate(model.weights)}
    arrays.update({f"b{i}": b for i, b in enumerate(model.biases)})
    np.savez(modeldir / "weights.npz", **arrays)
    document = {"genome": {k: v for k, v in genes.items() if k != "genome_id"}, **result}
    (modeldir / "genome.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genome", required=True, help="the genome as a JSON object")
    parser.add_argument("--epochs", type=int, default=10, help=f"training epochs, 1..{MAX_EPOCHS}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mini-batch order")
    parser.add_argument(
        "--modeldir",
        type=Path,
        default=Path("..") / "modeldir",
        help="where the weights go (default ../modeldir: the StudioML artifact beside the workspace)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.epochs <= MAX_EPOCHS:
        parser.error(f"--epochs must be between 1 and {MAX_EPOCHS}, got {args.epochs}")
    try:
        genes = parse_genome(args.genome)
    except MalformedGenome as error:
        message = f"malformed genome: {error}"
        emit({"error": message})
        print(f"train_genome.py: {message}", file=sys.stderr, flush=True)
        return EXIT_MALFORMED
    train(genes, args.epochs, args.seed, args.modeldir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
