"""The training script the end-to-end tests give the real client, and the workspace folder it runs in."""

from __future__ import annotations

import textwrap
from pathlib import Path

TRAIN = """\
import json, os, sys
print("arguments:", sys.argv[1:])
for epoch in range(3):
    print(json.dumps({"experiment": {"epoch": epoch, "fitness": 0.25 * (epoch + 1)}}))
os.makedirs("../modeldir", exist_ok=True)
with open("../modeldir/weights.txt", "w") as out:
    out.write("trained")
"""


def workspace(tmp_path: Path, script: str, name: str = "train.py") -> Path:
    folder = tmp_path / "workspace"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(textwrap.dedent(script))
    return folder
