"""Runner overhead: message pick-up → the workload's first line, and its exit → the ack.

A trivial script in a 1 MB workspace, with the StudioML client's full ``pip freeze`` as its
``pythonenv`` (the captured CompletionService request), is published to RabbitMQ and run by a
real ``studio-runner serve``: first with empty caches (cold: the virtualenv is built, with uv
and with pip), then again with the caches warm. Times come from the runner's JSON log (pick-up,
ack) and from the workload itself (first line, exit), all on this machine's clock.

    .venv/bin/python bench/runner_overhead.py [--warm-runs 5] [--skip-pip]

Targets (issue #2): warm overhead under 0.5 s each way; a warm experiment at least 20x faster
end to end than a cold one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.services import Endpoints, private_services  # noqa: E402
from tests.broker import publish_like_client  # noqa: E402
from tests.runner.client_requests import client_request, upload_blob, workspace_tar  # noqa: E402
from tests.runner.results import tar_members  # noqa: E402

WORKLOAD = b"""\
import time
print("first-line", repr(time.time()), flush=True)
print("exit", repr(time.time()), flush=True)
"""


@dataclass
class Measurement:
    pickup_to_first_line: float
    exit_to_ack: float
    pickup_to_ack: float
    publish_to_ack: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-runs", type=int, default=5)
    parser.add_argument("--skip-pip", action="store_true", help="skip the slow cold build with pip")
    options = parser.parse_args()
    freeze = json.loads((REPO / "tests" / "data" / "completion_service_task.json").read_text())["body"]
    pythonenv = freeze["experiment"]["pythonenv"]

    with tempfile.TemporaryDirectory(prefix="runner-overhead-") as scratch:
        root = Path(scratch)
        with private_services(root / "services") as services:
            endpoints = services.endpoints
            rows = []
            installers = ["uv"] if options.skip_pip else ["uv", "pip"]
            for installer in installers:
                cold, warm = scenario(endpoints, root / installer, installer, pythonenv, options.warm_runs)
                rows.append((installer, cold, warm))
    report(rows, len(pythonenv))
    return 0


def scenario(
    endpoints: Endpoints, root: Path, installer: str, pythonenv: list[str], warm_runs: int
) -> tuple[Measurement, list[Measurement]]:
    """One runner with empty caches: the first experiment is cold, the following ones warm."""
    s3 = endpoints.s3_client()
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    blob = workspace_tar({"train.py": WORKLOAD, "data.bin": os.urandom(1024 * 1024)})
    workspace_key = upload_blob(s3, bucket, blob)
    queue = f"rmq_bench_{installer}"
    log = root / "runner.log"
    root.mkdir(parents=True)
    env = {**os.environ, "UV_CACHE_DIR": str(root / "uv-cache"), "PIP_NO_CACHE_DIR": "1"}
    command = [
        str(Path(sys.executable).parent / "studio-runner"),
        "serve",
        "--installer",
        installer,
        "--working-dir",
        str(root / "work"),
        "--cache-dir",
        str(root / "cache"),
        "--prom-address",
        "off",
        "--amqp-url",
        endpoints.amqp_url,
        "--amqp-mgt-url",
        endpoints.amqp_management_url,
    ]
    with open(log, "wb") as output:
        runner = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        measurements = []
        for run in range(1 + warm_runs):
            label = "cold" if run == 0 else f"warm {run}"
            print(f"[{installer}] {label} experiment ...", flush=True)
            key = f"bench_{installer}_{run}_{uuid.uuid4().hex[:6]}"
            request = client_request(endpoints, bucket, key, workspace_key)
            request["experiment"]["pythonenv"] = pythonenv
            published = time.time()
            publish_like_client(endpoints.amqp_url, queue, [json.dumps(request).encode()])
            measurements.append(measure(s3, bucket, key, log, published))
    finally:
        runner.terminate()
        runner.wait(60)
    return measurements[0], measurements[1:]


def measure(s3, bucket: str, key: str, log: Path, published: float, timeout: float = 900) -> Measurement:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = _events(log)
        pickup = _event_time(events, f"experiment {key} from")
        acked = _event_time(events, "ended succeeded", experiment=key)
        failed = [e for e in events if e.get("experiment") == key and e.get("level") == "error"]
        if failed:
            raise SystemExit(f"experiment {key} failed: {failed[0]['msg']}")
        if pickup is not None and acked is not None:
            output = tar_members(s3, bucket, f"experiments/{key}/output.tar")["./output"].decode()
            stamps = dict(
                line.split(" ", 1) for line in output.splitlines() if line.startswith(("first-line", "exit"))
            )
            return Measurement(
                pickup_to_first_line=float(stamps["first-line"]) - pickup,
                exit_to_ack=acked - float(stamps["exit"]),
                pickup_to_ack=acked - pickup,
                publish_to_ack=acked - published,
            )
        time.sleep(0.2)
    raise SystemExit(f"experiment {key} did not finish within {timeout:.0f}s; see {log}")


def _events(log: Path) -> list[dict]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _event_time(events: list[dict], text: str, experiment: str | None = None) -> float | None:
    for event in events:
        if text in event.get("msg", "") and (experiment is None or event.get("experiment") == experiment):
            return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()
    return None


def report(rows: list[tuple[str, Measurement, list[Measurement]]], freeze_lines: int) -> None:
    out = io.StringIO()
    out.write(
        f"\ntrivial script, 1 MB workspace, pythonenv = the client's pip freeze ({freeze_lines} lines)\n"
    )
    header = ("pick-up → first line", "exit → ack", "pick-up → ack", "publish → ack")
    out.write(f"{'installer':10}{'run':6}" + "".join(f"{h:>22}" for h in header) + "\n")
    for installer, cold, warm in rows:
        median = Measurement(
            *(statistics.median(getattr(m, f) for m in warm) for f in Measurement.__dataclass_fields__)
        )
        for label, m in (("cold", cold), ("warm", median)):
            values = (m.pickup_to_first_line, m.exit_to_ack, m.pickup_to_ack, m.publish_to_ack)
            out.write(
                f"{installer if label == 'cold' else '':10}{label:6}"
                + "".join(f"{v:>20.3f} s" for v in values)
                + "\n"
            )
        out.write(
            f"{'':16}warm = median of {len(warm)} runs; cold/warm, pick-up → ack: "
            f"{cold.pickup_to_ack / median.pickup_to_ack:.0f}x, publish → ack: "
            f"{cold.publish_to_ack / median.publish_to_ack:.0f}x\n"
        )
    print(out.getvalue())


if __name__ == "__main__":
    sys.exit(main())
