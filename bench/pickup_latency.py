"""Pick-up latency: the real ``studioml`` client's ``studio run`` → results visible in S3.

A trivial script is submitted with the real client (``studio-run``, the client's whole
``pip freeze`` as its environment) to a real ``studio-runner serve`` over private RabbitMQ,
SeaweedFS and moto (SQS) servers, each time on a NEW queue (created by that submission) and on
an EXISTING one. For each it prints, over ``--runs`` submissions, the median and p95 of:

- publish → results: from the client's ``basic_publish`` (noted by a wrapper around the real
  ``studio-run``; the client then sleeps a whole second before checking its confirm, so its
  exit is no measure) until the experiment's ``output.tar`` is in S3;
- client exit → results: from ``studio-run``'s exit (after its one-second confirm wait);
  negative when the results were in S3 before the client exited (S3 is watched meanwhile);
- submit → results: from ``studio-run``'s start (client start-up and workspace upload
  included), an upper bound.

The runner's own share (queue created → message taken → acked) is in its JSON log, printed
at the end.

A warm-up submission per transport builds the environment first; it is not counted.

    .venv/bin/python bench/pickup_latency.py [--runs 10] [--transports rmq,sqs]

Targets (issue 11): publish → results median ≤ 0.35 s on RabbitMQ, ≤ 1 s on SQS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from botocore.exceptions import ClientError  # noqa: E402

from devtools.services import Endpoints, private_services  # noqa: E402
from tests.fixtures_runner import StudioClient, build_studioml_client, make_studio_client  # noqa: E402

SCRIPT = 'print("hello from a trivial experiment", flush=True)\n'
CLIENT = """\
import sys, time
import pika.channel

stamp = sys.argv.pop(1)
publish = pika.channel.Channel.basic_publish


def noted(self, *args, **kwargs):
    with open(stamp, "w") as out:
        out.write(repr(time.time()))
    return publish(self, *args, **kwargs)


pika.channel.Channel.basic_publish = noted

import botocore.client

call = botocore.client.BaseClient._make_api_call


def sqs_noted(self, operation, params):
    if operation == "SendMessage":
        with open(stamp, "w") as out:
            out.write(repr(time.time()))
    return call(self, operation, params)


botocore.client.BaseClient._make_api_call = sqs_noted
from studio import runner

sys.argv[0] = "studio-run"
runner.main()
"""
"""``studio-run`` itself, noting the moment it publishes (RabbitMQ or SQS): the client waits a whole second for its
publisher confirm before it exits, so its exit would hide most of the latency."""
CLIENT_FAILURES: list[str] = []
RESULT_POLL_SECONDS = 0.01


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="submissions per transport and queue kind")
    parser.add_argument("--transports", default="rmq,sqs", help="comma-separated: rmq, sqs")
    options = parser.parse_args()
    transports = [t.strip() for t in options.transports.split(",") if t.strip()]
    bin_dir = build_studioml_client(REPO)
    rows: list[tuple[str, str, list[tuple[float, float, float]]]] = []
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
                        figures: list[tuple[float, float, float]] = []
                        for run in range(options.runs):
                            queue = (
                                existing
                                if kind == "existing"
                                else f"{transport}_pickup_{uuid.uuid4().hex[:8]}"
                            )
                            figures.append(submit(client, s3, workspace, queue, timeout=120))
                            print(
                                f"[{transport}] {kind} queue, run {run + 1}: "
                                + ", ".join(f"{f:.3f} s" for f in figures[-1]),
                                flush=True,
                            )
                        rows.append((transport, kind, figures))
            finally:
                runner.terminate()
                runner.wait(60)
            shares = runner_share(root / "runner.log")
    report(rows)
    print(
        "\nthe runner's share, from its log (median / p95 s): "
        + "; ".join(
            f"{name} {statistics.median(v):.3f} / {p95(v):.3f} (n={len(v)})"
            for name, v in shares.items()
            if v
        )
    )
    if CLIENT_FAILURES:
        print(
            f"\nstudio-run exited with an error {len(CLIENT_FAILURES)} time(s) after publishing (the message was "
            f"run all the same): {sorted(set(CLIENT_FAILURES))}"
        )
    return 0


def start_runner(endpoints: Endpoints, root: Path) -> subprocess.Popen[bytes]:
    """``studio-runner serve`` on both brokers, its caches kept under ``.cache/`` between benches."""
    cache = REPO / ".cache" / "bench-pickup-runner-cache"
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **endpoints.aws_identity(),
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


def submit(
    client: StudioClient, s3, workspace: Path, queue: str, *, timeout: float
) -> tuple[float, float, float]:
    """``studio run`` on ``queue``; returns (publish → results, exit → results, submit → results) in seconds."""
    key = f"pickup_{uuid.uuid4().hex[:10]}"
    stamp = workspace.parent / f"published-{key}"
    command = [str(client.bin_dir / "python"), "-c", CLIENT, str(stamp)]
    command += [f"--config={client.config}", f"--queue={queue}", f"--experiment={key}", "train.py"]
    started = time.time()
    # watch S3 while the client runs: the results usually land before the client exits
    with tempfile.TemporaryFile() as output:
        client_process = subprocess.Popen(
            command, cwd=workspace, env=client.env(), stdout=output, stderr=output
        )
        exited: float | None = None
        visible: float | None = None
        deadline = time.monotonic() + timeout
        while visible is None or exited is None:
            if exited is None and client_process.poll() is not None:
                exited = time.time()
            if visible is None and has_results(s3, client.bucket, key):
                visible = time.time()
            if time.monotonic() > deadline:
                client_process.kill()
                raise SystemExit(f"no results for {key} on {queue} within {timeout:.0f} s")
            time.sleep(RESULT_POLL_SECONDS)
        output.seek(0)
        text = output.read().decode(errors="replace").strip()
    if not stamp.exists():
        raise SystemExit(f"studio run published nothing:\n{text[-3000:]}")
    if client_process.returncode != 0:
        CLIENT_FAILURES.append(text.splitlines()[-1] if text else "?")
    published = float(stamp.read_text())
    return visible - published, visible - exited, visible - started


def has_results(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=f"experiments/{key}/output.tar")
        return True
    except ClientError:
        return False


def runner_share(log: Path) -> dict[str, list[float]]:
    """Per request: its queue's worker started → message taken, and taken → acked."""
    started: dict[str, float] = {}
    taken: dict[str, float] = {}
    shares: dict[str, list[float]] = {
        "queue created → taken (the client publishes after declaring)": [],
        "taken → acked": [],
    }
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        when = datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()
        message, queue = event.get("msg", ""), event.get("queue") or ""
        if message.startswith("servicing "):
            started[message.rsplit(" ", 1)[-1]] = when
        elif message.startswith("experiment ") and " from " in message and queue:
            taken[queue] = when
            if queue in started:
                shares["queue created → taken (the client publishes after declaring)"].append(
                    when - started.pop(queue)
                )
        elif message.startswith(f"request from {queue} ended succeeded") and queue in taken:
            shares["taken → acked"].append(when - taken.pop(queue))
    return shares


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def report(rows: list[tuple[str, str, list[tuple[float, float, float]]]]) -> None:
    columns = ("publish call → results", "client exit → results", "submit → results")
    print("\nmedian / p95 in seconds")
    print(f"{'transport':10}{'queue':10}{'runs':>5}" + "".join(f"{c:>26}" for c in columns))
    for transport, kind, figures in rows:
        cells = []
        for column in zip(*figures, strict=True):
            values = list(column)
            cells.append(f"{statistics.median(values):>15.3f} / {p95(values):.3f}")
        print(f"{transport:10}{kind:10}{len(figures):>5}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
