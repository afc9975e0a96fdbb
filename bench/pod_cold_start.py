"""Pod cold start: time to the workload's first line for successive fresh pods sharing packed envs.

Each pod is a ``studio-runner run`` of the same request with an empty working and cache folder
(as a pod's emptyDir), all sharing one ``--env-cache-uri`` on a private SeaweedFS. The first pod
builds the environment and stores it packed; every later pod restores it. Two environments: the
StudioML client's 75-line ``pip freeze`` (the captured CompletionService request) and the ENN
workload's (dags/enn/workload/requirements.txt).

    .venv/bin/python bench/pod_cold_start.py [--pods 3] [--installer uv] [--root /dev/shm]

``--root`` puts the pods' folders elsewhere: on tmpfs the figures show the runner's own cost
without the disk, which on a small VM is most of a restore (writing an environment's ~9,000
files; compare ``cp -a`` of the built environment, printed at the end).

Target (issue #11): every pod after the first at least 5x faster than the first, and under 3 s
for the 75-line environment. Times: runner start → the workload's first line (its own clock).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio_runner.pythonenv import MANIFEST  # noqa: E402

from devtools.services import Endpoints, private_services  # noqa: E402
from tests.runner.client_requests import client_request, upload_blob, workspace_tar  # noqa: E402

WORKLOAD = b"""\
import time
print("first-line", repr(time.time()), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=3, help="successive fresh pods per environment")
    parser.add_argument("--installer", default="uv", choices=("uv", "pip"))
    parser.add_argument("--root", type=Path, default=None, help="folder for the pods' working folders")
    options = parser.parse_args()
    freeze = json.loads((REPO / "tests" / "data" / "completion_service_task.json").read_text())["body"]
    environments = {
        f"client freeze ({len(freeze['experiment']['pythonenv'])} lines)": freeze["experiment"]["pythonenv"],
        "ENN workload": [
            line.strip()
            for line in (REPO / "dags" / "enn" / "workload" / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ],
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="pod-cold-start-", dir=options.root) as scratch:
        root = Path(scratch)
        with private_services(root / "services") as services:
            for name, pythonenv in environments.items():
                rows.append((name, pods(services.endpoints, root / uuid.uuid4().hex[:8], pythonenv, options)))
    print(f"\ntime to the workload's first line, {options.installer} installer, one fresh pod after another:")
    for name, (times, _) in rows:
        later = times[1:]
        print(
            f"  {name:28s} first pod {times[0]:6.2f} s; later pods "
            + ", ".join(f"{t:.2f}" for t in later)
            + f" s; first/slowest later {times[0] / max(later):.1f}x"
        )
    print("writing the environment's files alone (the floor for any restore on this disk):")
    for name, (_, floor) in rows:
        print(f"  {name:28s} {floor}")
    return 0


def pods(
    endpoints: Endpoints, root: Path, pythonenv: list[str], options: argparse.Namespace
) -> tuple[list[float], str]:
    s3 = endpoints.s3_client()
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    workspace_key = upload_blob(s3, bucket, workspace_tar({"train.py": WORKLOAD}))
    host = endpoints.s3_endpoint.split("://", 1)[1]
    times = []
    for n in range(options.pods):
        pod = root / f"pod-{n}"
        pod.mkdir(parents=True)
        key = f"cold_{n}_{uuid.uuid4().hex[:6]}"
        request = client_request(endpoints, bucket, key, workspace_key)
        request["experiment"]["pythonenv"] = pythonenv
        (pod / "request.json").write_text(json.dumps(request))
        env = {
            **os.environ,
            **endpoints.aws_identity(),
            # a fresh pod has no installer cache either
            "UV_CACHE_DIR": str(pod / "uv-cache"),
            "PIP_NO_CACHE_DIR": "1",
        }
        command = [
            str(Path(sys.executable).parent / "studio-runner"),
            "run",
            "--request",
            str(pod / "request.json"),
            "--working-dir",
            str(pod / "work"),
            "--installer",
            options.installer,
            "--env-cache-uri",
            f"s3://{host}/{bucket}/envs",
            "--log-format",
            "text",
        ]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
        if done.returncode != 0:
            raise SystemExit(
                f"pod {n} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        first = next(line for line in done.stdout.splitlines() if line.startswith("first-line"))
        how = next((line for line in done.stdout.splitlines() if "environment" in line), "")
        times.append(float(first.split()[1]) - started)
        print(
            f"  pod {n}: {times[-1]:.2f} s to the first line ({how.removeprefix('studio-runner: ')})",
            flush=True,
        )
    return times, copy_floor(root / "pod-0")


def copy_floor(pod: Path) -> str:
    """``cp -a`` of the environment the first pod built: its file writes without any unpacking."""
    built = next(manifest.parent for manifest in pod.glob(f"work/**/{MANIFEST}"))
    files = sum(len(names) for _, _, names in os.walk(built))
    size = sum(
        entry.stat().st_size for entry in built.rglob("*") if entry.is_file() and not entry.is_symlink()
    )
    subprocess.run(["sync"], check=True)
    started = time.monotonic()
    subprocess.run(["cp", "-a", str(built), str(pod / "copy")], check=True)
    return f"cp -a of {files} files, {size / 1e6:.0f} MB: {time.monotonic() - started:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
