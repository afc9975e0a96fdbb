"""The on-disk layout of one experiment attempt.

StudioML workloads find their artifacts as siblings of the workspace (``../<label>``, see
``studio.fs_tracker``), and the CompletionService client lists ``..`` to find its inputs, so
the experiment folder holds the artifact folders and ``_runner`` and nothing else.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

RUNNER_DIR = "_runner"
OUTPUT_LABEL = "output"
METADATA_LABEL = "_metadata"
WORKSPACE_LABEL = "workspace"


@dataclass(frozen=True)
class ExperimentLayout:
    """Paths of one attempt: ``<root>/experiments/<hash>.<n>/`` plus a private temp folder."""

    root: Path
    name: str

    @classmethod
    def create(cls, root: Path, key: str) -> ExperimentLayout:
        """A fresh attempt folder; ``.n`` counts attempts of the same key on this runner."""
        experiments = root / "experiments"
        experiments.mkdir(parents=True, exist_ok=True)
        digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        attempt = 0
        while True:
            name = f"{digest}.{attempt}"
            try:
                (experiments / name).mkdir()
            except FileExistsError:
                attempt += 1
                continue
            layout = cls(root=root, name=name)
            layout.runner_dir.mkdir()
            layout.output_file.parent.mkdir()
            layout.output_file.touch()
            layout.tmp_dir.mkdir(parents=True)
            return layout

    @property
    def experiment_dir(self) -> Path:
        return self.root / "experiments" / self.name

    @property
    def runner_dir(self) -> Path:
        return self.experiment_dir / RUNNER_DIR

    @property
    def workspace_dir(self) -> Path:
        return self.artifact_dir(WORKSPACE_LABEL)

    @property
    def output_file(self) -> Path:
        return self.artifact_dir(OUTPUT_LABEL) / "output"

    @property
    def metadata_dir(self) -> Path:
        return self.artifact_dir(METADATA_LABEL)

    @property
    def tmp_dir(self) -> Path:
        """Kept outside the experiment folder so ``..`` shows artifacts only."""
        return self.root / "tmp" / self.name

    def artifact_dir(self, label: str) -> Path:
        return self.experiment_dir / label

    def remove(self) -> None:
        shutil.rmtree(self.experiment_dir, ignore_errors=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
