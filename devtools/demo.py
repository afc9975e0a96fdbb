"""`make demo`: evolve a population of digit-classifying networks, one Airflow run per generation.

Local RabbitMQ and SeaweedFS, a local Airflow (scheduler, triggerer, UI) and the ``enn_generation``
DAG in local execution mode: each genome is a StudioML experiment run by ``studio-runner`` in its
own cached virtualenv. Prints each generation as it finishes, then the table and the fitness plot.

    python -m devtools.demo [--population 8] [--generations 4] [--epochs 2] [--seed 3] [--keep-running]
    python -m devtools.demo ui      # browse earlier runs in the Airflow UI (Ctrl-C stops it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .local_airflow import DEFAULT_HOME, AirflowError, LocalAirflow
from .services import DEFAULT_DATA_DIR, REPO, ServiceError, ServiceSet, load_running

DAG_ID = "enn_generation"
BUCKET = "studio-enn"
OUTPUT_DIR = REPO / ".local" / "demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["run", "ui"], default="run")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--keep-running", action="store_true", help="leave Airflow and the services running")
    args = parser.parse_args(argv)
    started = time.monotonic()
    services, we_started = _services()
    airflow = LocalAirflow(home=DEFAULT_HOME, endpoints=services.endpoints)
    try:
        say("preparing Airflow (SQLite in .local/airflow)")
        airflow.migrate()
        if args.command == "ui":
            return _browse(airflow)
        say("starting Airflow: scheduler, DAG processor, triggerer, API server")
        airflow.start(progress=say)
        airflow.wait_for_dag(DAG_ID)
        airflow.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
        summaries = _run_campaign(airflow, services, args)
        _report(summaries, services, args, time.monotonic() - started, airflow)
        return 0
    except (AirflowError, ServiceError, CampaignFailed) as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    finally:
        if args.command == "ui" or not args.keep_running:
            airflow.stop()
            if we_started:
                services.stop()


class CampaignFailed(RuntimeError):
    """A generation's DAG run failed; the message names it and where to look."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _services() -> tuple[ServiceSet, bool]:
    """The local servers: the ones already running from `make services`, or a fresh set."""
    running = load_running(DEFAULT_DATA_DIR)
    if running is not None:
        say("using the local services already running")
        return running, False
    services = ServiceSet(data_dir=DEFAULT_DATA_DIR)
    services.start(progress=lambda line: say(line))
    return services, True


def _run_campaign(
    airflow: LocalAirflow, services: ServiceSet, args: argparse.Namespace
) -> list[dict[str, Any]]:
    campaign = time.strftime("demo-%Y%m%d-%H%M%S")
    conf = {
        "campaign": campaign,
        "generation": 0,
        "generations": args.generations,
        "population": args.population,
        "epochs": args.epochs,
        "seed": args.seed,
        "bucket": BUCKET,
    }
    say(
        f"campaign {campaign}: {args.generations} generations of {args.population} genomes, {args.epochs} epochs each"
    )
    airflow.api(
        "POST",
        f"/dags/{DAG_ID}/dagRuns",
        {"dag_run_id": f"{campaign}-gen-000", "logical_date": None, "conf": conf},
    )
    s3 = _s3(services)
    reported: set[int] = set()
    announced: set[str] = set()
    while True:
        runs = {
            run["dag_run_id"]: run
            for run in airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]
        }
        ours = sorted(run_id for run_id in runs if run_id.startswith(f"{campaign}-gen-"))
        for run_id in ours:
            state = runs[run_id]["state"]
            if state == "running" and run_id not in announced:
                announced.add(run_id)
                say(
                    f"generation {int(run_id.rsplit('-', 1)[1])} is running ({run_id}); training {args.population} experiments"
                )
            if state == "failed":
                raise CampaignFailed(
                    f"DAG run {run_id} failed: open the Airflow UI (make ui) or see {airflow.home}/logs"
                )
        summaries = _summaries(s3, campaign)
        for summary in summaries:
            if summary["generation"] not in reported:
                reported.add(summary["generation"])
                say(
                    f"generation {summary['generation']} done: best {summary['best_fitness']:.4f}, "
                    f"mean {summary['mean_fitness']:.4f}, {summary['experiments']} experiments, "
                    f"{summary['failures']} failed, {summary['wall_seconds']:.0f} s"
                )
        last = ours[-1] if ours else None
        if last and runs[last]["state"] == "success":
            time.sleep(3)  # a triggered next run shows up right after the trigger task ends
            following = [
                r
                for r in airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]
                if r["dag_run_id"].startswith(f"{campaign}-gen-") and r["dag_run_id"] > last
            ]
            if not following:
                return _summaries(s3, campaign)
        time.sleep(3)


def _s3(services: ServiceSet):
    return services.endpoints.s3_client()


def _summaries(s3, campaign: str) -> list[dict[str, Any]]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"enn/{campaign}/").get("Contents", [])
    keys = sorted(item["Key"] for item in listing if item["Key"].endswith("/summary.json"))
    return [json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) for key in keys]


def _report(
    summaries: list[dict[str, Any]],
    services: ServiceSet,
    args: argparse.Namespace,
    seconds: float,
    airflow: LocalAirflow,
) -> None:
    if not summaries:
        raise CampaignFailed("the campaign finished without a single generation summary")
    campaign = summaries[0]["run_id"].rsplit("-gen-", 1)[0]
    print()
    print(
        f"{'generation':>10} {'best':>8} {'mean':>8} {'worst':>8} {'experiments':>12} {'failed':>7} {'wall':>8}"
    )
    for s in summaries:
        print(
            f"{s['generation']:>10} {s['best_fitness']:>8.4f} {s['mean_fitness']:>8.4f} {s['worst_fitness']:>8.4f} "
            f"{s['experiments']:>12} {s['failures']:>7} {s['wall_seconds']:>7.0f}s"
        )
    first, last = summaries[0]["best_fitness"], summaries[-1]["best_fitness"]
    change = "improved" if last > first else "did not improve"
    print(
        f"\nbest fitness {change}: {first:.4f} (generation 0) -> {last:.4f} (generation {summaries[-1]['generation']})"
    )
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    plot = OUTPUT_DIR / f"{campaign}-fitness.png"
    _s3(services).download_file(BUCKET, f"enn/{campaign}/fitness.png", str(plot))
    print(f"fitness plot: {plot} (also s3://{BUCKET}/enn/{campaign}/fitness.png)")
    print(
        f"results: s3://{BUCKET}/experiments/ and s3://{BUCKET}/metadata/ on {services.endpoints.s3_endpoint}"
    )
    print(f"demo finished in {seconds / 60:.1f} min")
    if args.keep_running:
        print(
            f"\nAirflow UI: {airflow.url}/dags/{DAG_ID} (left running; stop with: make services-stop and kill the airflow processes)"
        )
    else:
        print("\nBrowse the run history (one run per generation, one mapped task per genome): make ui")


def _browse(airflow: LocalAirflow) -> int:
    airflow.start(command=("api-server",))
    print(
        f"\nAirflow UI: {airflow.url}/dags/{DAG_ID}  (no login on this local copy; Ctrl-C to stop)",
        flush=True,
    )
    try:
        while airflow.process is not None and airflow.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        airflow.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
