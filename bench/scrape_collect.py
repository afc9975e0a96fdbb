"""How fast MetadataScrapeOperator collects 2,000 experiments' scrape documents.

Starts a private SeaweedFS (free ports, temporary data folder), writes 2,000 scrape documents
built by the runner's own scrape code (plus earlier failed attempts for some keys), then times:

  (a) the naive way: a sequential ``get_object`` + ``json.loads`` loop over the 2,000 latest
      documents, whose names it already knows (no listing);
  (b) the operator's code path (``scrape_client`` + ``ScrapeCollector.collect``, the functions
      ``MetadataScrapeOperator.execute`` calls) by keys: list ``metadata/`` and fetch every
      document, second attempts included, with a thread pool;
  (c) the same by runner summaries: the 2,000 scrape URIs are read directly.

Each is run a few times (after one untimed warm-up in the first scenario); the median is
reported with the client process's CPU time. On loopback, botocore's CPU per request (about 2 ms
here) and SeaweedFS share the machine's cores, so concurrency can overlap little: the figure is
bound by CPU, not by waiting. Real object stores answer after tens of milliseconds, which
concurrency hides; the second scenario therefore routes the same requests through a TCP proxy
(a separate process) that holds every request back by a fixed time. Its figures are labelled
as simulated.

    .venv/bin/python bench/scrape_collect.py [--experiments 2000] [--repeat 3] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUCKET = "scrape-bench"
T0 = 1_790_000_000


# --- latency proxy (runs as its own process) --------------------------------------------------


async def _proxy(listen_port: int, upstream_port: int, delay: float) -> None:
    """Forward TCP to the upstream port, holding each client->server chunk back by ``delay``.

    An HTTP/1.1 GET travels in one chunk, so each request gains ``delay`` before it reaches
    the server (like an object store's time to first byte); chunks keep their order, and
    connections are delayed independently of each other.
    """

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
            writer.close()

        releaser = asyncio.create_task(release())
        try:
            while chunk := await reader.read(65536):
                queue.put_nowait((time.monotonic() + hold, chunk))
        except ConnectionError:
            pass
        queue.put_nowait((0.0, b""))
        await releaser

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pipe(client_reader, server_writer, delay),
            pipe(server_reader, client_writer, 0.0),
            return_exceptions=True,
        )

    server = await asyncio.start_server(serve, "127.0.0.1", listen_port, backlog=512)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def start_proxy(listen_port: int, upstream_port: int, delay_ms: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, __file__, "--proxy", str(listen_port), str(upstream_port), str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError("the latency proxy did not start")
    return process


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- documents ---------------------------------------------------------------------------------


def build_documents(experiments: int, retried_every: int) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """All scrape files to write, and the latest one's object key per experiment key."""
    from studio_runner.metadata import RunnerFacts, accession_id, scrape, scrape_file_name

    files: list[tuple[str, bytes]] = []
    latest: dict[str, str] = {}
    for i in range(experiments):
        key = f"enn-gen007-cand-{i:05d}"
        attempts = [(f"gpu-node-{(i + 1) % 13}", T0 + i, "failed", 1)] if i % retried_every == 0 else []
        attempts.append((f"gpu-node-{i % 13}", T0 + 3600 + i, "succeeded", 0))
        for host, start, status, code in attempts:
            facts = RunnerFacts(
                host=host,
                key=key,
                project="enn-bench",
                artifacts={
                    label: f"s3://10.0.0.5:9000/studio-experiments/{key}/{label}.tar"
                    for label in ("output", "modeldir", "_metadata")
                },
                load_time=start - 3,
                start_time=start,
                stop_time=start + 600,
                status=status,
                exit_code=code,
            )
            lines = [f"epoch {e:3d}/40 loss={1 / (e + 1):.5f} val_acc={0.5 + e / 100:.4f}" for e in range(40)]
            lines.append(
                json.dumps({"experiment": {"fitness": round(0.5 + (i % 997) / 2000, 6), "epochs": 40}})
            )
            lines.append(json.dumps({"hyper": {"lr": 0.001 * (1 + i % 5), "layers": [64, 64, 10]}}))
            document = scrape(lines, before=facts.before(), after=facts.after())
            name = "metadata/" + scrape_file_name(accession_id(host, start))
            files.append((name, (json.dumps(document, sort_keys=True) + "\n").encode()))
            latest[key] = name
    return files, latest


# --- timing ------------------------------------------------------------------------------------


def timed(label: str, run: Callable[[], Any], repeat: int, warm_up: bool) -> tuple[float, Any]:
    """Median wall time of ``repeat`` runs; also prints this process's CPU time."""
    if warm_up:
        run()  # imports, SeaweedFS's caches
    seconds = []
    cpu = []
    result = None
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = run()
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    spread = ", ".join(f"{s:.2f}" for s in seconds)
    print(
        f"  {label:<44} median {statistics.median(seconds):6.2f} s  "
        f"(client CPU {statistics.median(cpu):5.2f} s)  runs: {spread}",
        flush=True,
    )
    return statistics.median(seconds), result


def scenario(
    conn_id: str, latest: dict[str, str], workers: int, repeat: int, warm_up: bool
) -> dict[str, float]:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from airflow_provider_studio.scrape_collection import ScrapeCollector, Wanted, scrape_client

    keys = list(latest)
    summaries = [Wanted(key=key, scrape_uri=f"s3://{BUCKET}/{latest[key]}") for key in keys]

    def sequential() -> dict[str, Any]:
        # the hook's own client, made per run as the operator makes its own (~0.2 s each)
        plain = S3Hook(aws_conn_id=conn_id).get_conn()
        fitness = {}
        for key in keys:
            body = plain.get_object(Bucket=BUCKET, Key=latest[key])["Body"].read()
            fitness[key] = json.loads(body)["experiment"]["fitness"]
        return fitness

    def operator_path(wanted: list[Wanted], bucket: str | None) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            client = scrape_client(S3Hook(aws_conn_id=conn_id), workers)
            with ScrapeCollector(client, max_workers=workers) as collector:
                table = collector.collect(wanted, bucket=bucket)
            if table.problems:
                raise RuntimeError(table.failure_message())
            return {row["key"]: row["experiment.fitness"] for row in table.rows}

        return run

    a, expected = timed("(a) sequential get_object loop", sequential, repeat, warm_up)
    b, by_keys = timed(
        f"(b) operator, by keys ({workers} workers)",
        operator_path([Wanted(k) for k in keys], BUCKET),
        repeat,
        warm_up,
    )
    c, by_uris = timed(
        f"(c) operator, by summaries ({workers} workers)", operator_path(summaries, None), repeat, warm_up
    )
    if not (by_keys == expected == by_uris):
        raise RuntimeError("the operator's table differs from the sequential loop's documents")
    return {"a": a, "b": b, "c": c}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=2000)
    parser.add_argument(
        "--retried-every", type=int, default=10, help="every Nth key also has a failed earlier attempt"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=None, help="default: the operator's max_workers default"
    )
    parser.add_argument("--latency-ms", type=float, default=20.0, help="0 skips the latency scenario")
    parser.add_argument("--proxy", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        listen, upstream, delay_ms = args.proxy
        asyncio.run(_proxy(int(listen), int(upstream), float(delay_ms) / 1000))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="scrape-bench-"))
    # Airflow writes its config under AIRFLOW_HOME on import; keep it out of the user's home.
    os.environ["AIRFLOW_HOME"] = str(workdir / "airflow")
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    # one "credentials retrieved" line per hook would drown the figures
    os.environ.setdefault("AIRFLOW__LOGGING__NAMESPACE_LEVELS", "airflow.providers.amazon=warning")
    from devtools.services import Ports, ServiceSet

    services = ServiceSet(data_dir=workdir / "services", ports=Ports.free())
    proxy: subprocess.Popen | None = None
    try:
        print(f"starting SeaweedFS in {workdir} ...", flush=True)
        services.start_seaweedfs()
        endpoint = services.endpoints
        import boto3

        from airflow_provider_studio.scrape_collection import DEFAULT_MAX_WORKERS

        workers = args.workers or DEFAULT_MAX_WORKERS
        writer = boto3.client(
            "s3",
            endpoint_url=endpoint.s3_endpoint,
            aws_access_key_id=endpoint.s3_access_key,
            aws_secret_access_key=endpoint.s3_secret_key,
            region_name=endpoint.region,
        )
        writer.create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        files, latest = build_documents(args.experiments, args.retried_every)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: writer.put_object(Bucket=BUCKET, Key=item[0], Body=item[1]), files))
        sizes = sorted(len(body) for _, body in files)
        print(
            f"wrote {len(files)} scrape documents for {len(latest)} keys "
            f"(median {sizes[len(sizes) // 2] / 1024:.1f} KiB) in {time.perf_counter() - started:.1f}s",
            flush=True,
        )

        def connection(conn_id: str, url: str) -> str:
            os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
                {
                    "conn_type": "aws",
                    "login": endpoint.s3_access_key,
                    "password": endpoint.s3_secret_key,
                    "extra": {"endpoint_url": url, "region_name": endpoint.region},
                }
            )
            return conn_id

        results: list[tuple[str, dict[str, float]]] = []
        print(
            f"\nscenario 1: SeaweedFS on loopback, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
        )
        results.append(
            (
                "loopback SeaweedFS",
                scenario(
                    connection("bench_loopback", endpoint.s3_endpoint), latest, workers, args.repeat, True
                ),
            )
        )
        if args.latency_ms > 0:
            port = free_port()
            proxy = start_proxy(port, services.ports.s3, args.latency_ms)
            label = f"+{args.latency_ms:g} ms/request (proxy, simulated)"
            print(f"\nscenario 2: {label}, load average {os.getloadavg()[0]:.2f}")
            results.append(
                (
                    label,
                    # no warm-up: SeaweedFS is warm from scenario 1, and every run makes its own client
                    scenario(
                        connection("bench_latency", f"http://127.0.0.1:{port}"),
                        latest,
                        workers,
                        args.repeat,
                        False,
                    ),
                )
            )

        print(f"\n{len(latest)} experiments, median of {args.repeat} runs, {workers} fetch workers")
        header = f"{'scenario':<38} {'(a) sequential':>15} {'(b) by keys':>12} {'(c) by URIs':>12} {'a/b':>7} {'a/c':>7}"
        print(header)
        print("-" * len(header))
        for label, r in results:
            print(
                f"{label:<38} {r['a']:>13.2f} s {r['b']:>10.2f} s {r['c']:>10.2f} s "
                f"{r['a'] / r['b']:>6.1f}x {r['a'] / r['c']:>6.1f}x"
            )
        print(
            "(b) also lists metadata/ and reads the failed earlier attempts; (a) and (c) read one file per key."
        )
        return 0
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=10)
        services.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
