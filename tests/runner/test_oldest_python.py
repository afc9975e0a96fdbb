"""The runner on the oldest Python it supports (3.10.12+, as the Ubuntu 22.04 GPU images have).

One test installs ``runner_image/`` into a fresh Python 3.10 virtualenv (with the repository's
pins wherever they support 3.10) and runs a real ``studio-runner run`` of a request against the
session's SeaweedFS; the machine must have a Python 3.10.12+ (pyenv's, or ``python3.10`` on
PATH), and the test fails with how to get one when it does not. The other checks the command's
start-up refusal of a Python without tarfile's extraction filters (PEP 706).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from studio_runner import cli

from devtools import pythons
from tests.runner.client_requests import client_request, upload_blob, workspace_tar
from tests.runner.results import final_document, tar_members

REPO = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 600

TRAIN = """\
import json, sys, tarfile
print("workload on", sys.version.split()[0], "filters:", hasattr(tarfile, "data_filter"))
print(json.dumps({"experiment": {"python": list(sys.version_info[:3]), "fitness": 0.5}}))
"""


def test_the_command_refuses_a_python_without_extraction_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delattr(tarfile, "data_filter")
    work = tmp_path / "work"
    code = cli.main(["run", "--working-dir", str(work), "--request", str(tmp_path / "request.json")])
    assert code == 5  # infrastructure: this machine, not the request
    error = capsys.readouterr().err
    assert "tarfile.data_filter" in error and "3.10.12+, 3.11.4+ or 3.12+" in error, error
    assert not work.exists(), "the check comes before the runner touches anything"


@pytest.fixture(scope="module")
def oldest_runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``studio-runner`` installed (not editable) into a fresh Python 3.10 virtualenv."""
    try:
        python = pythons.oldest_python()
    except pythons.MissingPython as error:
        pytest.fail(f"this test needs the oldest Python the runner supports: {error}")
    venv = tmp_path_factory.mktemp("py310") / "venv"
    subprocess.run([str(python.path), "-m", "venv", str(venv)], check=True, timeout=120)
    constraints = venv.parent / "constraints.txt"
    constraints.write_text("\n".join(pythons.constraints_for(python.version)) + "\n")
    uv = Path(sys.executable).parent / "uv"
    installed = subprocess.run(
        [
            str(uv),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(venv / "bin" / "python"),
            "--constraint",
            str(constraints),
            str(REPO / "runner_image"),
        ],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert installed.returncode == 0, (
        f"runner_image does not install on Python {python.version}:\n{installed.stderr}"
    )
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(*sys.version_info[:3], sep='.')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == python.version
    return venv / "bin" / "studio-runner"


def test_the_runner_installs_and_runs_a_request_on_python_3_10(
    oldest_runner: Path, services, s3_client, bucket: str, tmp_path: Path
) -> None:
    key = f"py310_{bucket[2:14]}"
    workspace = upload_blob(s3_client, bucket, workspace_tar({"train.py": TRAIN.encode()}))
    request = client_request(services, bucket, key, workspace)
    request["experiment"]["pythonver"] = pythons.OLDEST
    (tmp_path / "request.json").write_text(json.dumps(request))
    result_file = tmp_path / "summary.json"
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "VIRTUAL_ENV"))}
    done = subprocess.run(
        [
            str(oldest_runner),
            "run",
            "--request",
            str(tmp_path / "request.json"),
            "--result-file",
            str(result_file),
            "--working-dir",
            str(tmp_path / "work"),
            "--cpu-only",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYENV_ROOT": str(pythons.PYENV_ROOT)},
    )
    log = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"studio-runner run on Python 3.10 failed (exit {done.returncode}):\n{log}"
    summary = json.loads(result_file.read_text())
    assert (summary["key"], summary["status"], summary["results_saved"]) == (key, "succeeded", True), summary
    document = final_document(s3_client, bucket, key)
    assert document is not None and document["studioml"]["status"] == "succeeded", log
    assert document["experiment"]["python"][:2] == [3, 10], document["experiment"]
    output = tar_members(s3_client, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    assert "workload on 3.10." in output and "filters: True" in output, output
