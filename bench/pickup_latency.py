"""Pick-up latency: the real ``studioml`` client's ``studio run`` → results visible in S3.

A trivial script is submitted with the real client (``studio-run``, the client's whole
``pip freeze`` as its environment) to a real ``studio-runner serve`` over private RabbitMQ,
SeaweedFS and moto (SQS) servers, each time on a NEW queue (created by that submission) and on
an EXISTING one. For each it prints, over ``--runs`` submissions, the median and p95 of:

- publish → results: from ``studio-run``'s exit (the client publishes with confirms, then
  exits, so this slightly flatters the figure by the client's exit time) until the
  experiment's ``output.tar`` is in S3;
- submit → results: the same from ``studio-run``'s start (client start-up and workspace
  upload included), an upper bound.

A warm-up submission per transport builds the environment first; it is not counted.

    .venv/bin/python bench/pickup_latency.py [--runs 10] [--transports rmq,sqs]

Targets (issue 11): publish → results median ≤ 0.35 s on RabbitMQ, ≤ 1 s on SQS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from botocore.exceptions import ClientError  # noqa: E402

from devtools.services import Endpoints, private_services  # noqa: E402
from tests.fixtures_runner import StudioClient, build_studioml_client, make_studio_client  # noqa: E402

SCRIPT = 'print("hello from a trivial experiment", flush=True)\n'
RESULT_POLL_SECONDS = 0.01


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="submissions per transport and queue kind")
    parser.add_argument("--transports", default="rmq,sqs", help="comma-separated: rmq, sqs")
    options = parser.parse_args()
    transports = [t.strip() for t in options.transports.split(",") if t.strip()]
    bin_dir = build_studioml_client(REPO)
    rows: list[tuple[str, str, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="pickup-latency-") as scratch:
        root = Path(scratch)
        with private_services(root / "services") as services:
            endpoints = services.endpoints
            s3 = endpoints.s3_client()
            bucket = f"pickup-{uuid.uuid4().hex[:10]}"
            s3.create_bucket(Bucket=bucket)
            client = make_studio_client(bin_dir, endpoints, bucket, root)
            workspace = root / "workspace"
            workspace.mkdir()
            (workspace / "train.py").write_text(SCRIPT)
            runner = start_runner(endpoints, root)
            try:
                for transport in transports:
                    existing = f"{transport}_pickup_{uuid.uuid4().hex[:8]}"
                    print(f"[{transport}] warm-up (builds the environment once) ...", flush=True)
                    submit(client, s3, workspace, existing, timeout=900)
                    for kind in ("new", "existing"):
                        publish_to_results, submit_to_results = [], []
                        for run in range(options.runs):
                            queue = (
                                existing
                                if kind == "existing"
                                else f"{transport}_pickup_{uuid.uuid4().hex[:8]}"
                            )
                            published, submitted = submit(client, s3, workspace, queue, timeout=120)
                            publish_to_results.append(published)
                            submit_to_results.append(submitted)
                            print(f"[{transport}] {kind} queue, run {run + 1}: {published:.3f} s", flush=True)
                        rows.append((transport, kind, publish_to_results, submit_to_results))
            finally:
                runner.terminate()
                runner.wait(60)
    report(rows)
    return 0


def start_runner(endpoints: Endpoints, root: Path) -> subprocess.Popen[bytes]:
    """``studio-runner serve`` on both brokers, its caches kept under ``.cache/`` between benches."""
    cache = REPO / ".cache" / "bench-pickup-runner-cache"
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": endpoints.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": endpoints.s3_secret_key,
        "AWS_DEFAULT_REGION": endpoints.region,
    }
    command = [
        str(Path(sys.executable).parent / "studio-runner"),
        "serve",
        "--working-dir",
        str(root / "work"),
        "--cache-dir",
        str(cache),
        "--prom-address",
        "off",
        "--amqp-url",
        endpoints.amqp_url,
        "--amqp-mgt-url",
        endpoints.amqp_management_url,
        "--sqs-endpoint",
        endpoints.sqs_endpoint,
        "--sqs-region",
        endpoints.region,
    ]
    log = root / "runner.log"
    print(f"runner log: {log}", flush=True)
    with open(log, "wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)


def submit(client: StudioClient, s3, workspace: Path, queue: str, *, timeout: float) -> tuple[float, float]:
    """``studio run`` on ``queue``; returns (publish → results, submit → results) in seconds."""
    key = f"pickup_{uuid.uuid4().hex[:10]}"
    started = time.time()
    client.run(workspace, queue, "train.py", key=key)
    published = time.time()
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.head_object(Bucket=client.bucket, Key=f"experiments/{key}/output.tar")
            break
        except ClientError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no results for {key} on {queue} within {timeout:.0f} s") from None
            time.sleep(RESULT_POLL_SECONDS)
    visible = time.time()
    return visible - published, visible - started


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def report(rows: list[tuple[str, str, list[float], list[float]]]) -> None:
    print()
    print(
        f"{'transport':10}{'queue':10}{'runs':>5}{'publish→results median':>25}{'p95':>9}{'submit→results median':>24}{'p95':>9}"
    )
    for transport, kind, published, submitted in rows:
        print(
            f"{transport:10}{kind:10}{len(published):>5}"
            f"{statistics.median(published):>23.3f} s{p95(published):>7.3f} s"
            f"{statistics.median(submitted):>22.3f} s{p95(submitted):>7.3f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
