"""Running the ENN workload the way the runner does, for the dags tests.

Each run gets its own experiment folder with the script alone in ``workspace/`` (as the runner
unpacks it, so an import from the project would fail) and ``modeldir/`` beside it; the console
is folded with the runner's own scrape, so the tests read ``experiment.fitness`` exactly as the
Airflow side will.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from studio_runner.metadata import scrape

from dags.enn.genome import Genome

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKLOAD_DIR = REPO_ROOT / "dags" / "enn" / "workload"
SCRIPT = WORKLOAD_DIR / "train_genome.py"
RUN_TIMEOUT = 120
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class WorkloadRun:
    returncode: int
    stdout: str
    stderr: str
    experiment_dir: Path

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    @property
    def document(self) -> dict[str, Any]:
        """The runner's scrape document for this console."""
        return scrape(self.stdout.splitlines())

    @property
    def fitness(self) -> float | None:
        """What the DAG reads: the last ``experiment.fitness``, None when the run failed."""
        if self.returncode != 0:
            return None
        return self.document.get("experiment", {}).get("fitness")

    @property
    def modeldir(self) -> Path:
        return self.experiment_dir / "modeldir"


def run_workload(
    experiment_dir: Path, genome: Genome | str, *, epochs: int | str = 3, seed: int = 0
) -> WorkloadRun:
    """``python train_genome.py --genome ... --epochs ... --seed ...`` in a fresh workspace."""
    workspace = experiment_dir / "workspace"
    workspace.mkdir(parents=True)
    shutil.copy2(SCRIPT, workspace / SCRIPT.name)
    text = genome.to_json() if isinstance(genome, Genome) else genome
    result = subprocess.run(
        [sys.executable, "-u", SCRIPT.name, "--genome", text, "--epochs", str(epochs), "--seed", str(seed)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return WorkloadRun(result.returncode, result.stdout, result.stderr, experiment_dir)


def load_workload_module() -> ModuleType:
    """The script as a module, for its constants and functions.

    Loading it sets the BLAS thread variables (for numpy, already loaded here, too late to
    matter); they are put back so that later tests' subprocesses see the environment they had.
    """
    spec = importlib.util.spec_from_file_location("enn_train_genome", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    added = [name for name in THREAD_VARIABLES if name not in os.environ]
    try:
        spec.loader.exec_module(module)
    finally:
        for name in added:
            os.environ.pop(name, None)
    return module
