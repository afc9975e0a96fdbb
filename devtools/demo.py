"""`make demo`: evolve a population of digit-classifying networks, one Airflow run per generation.

Local RabbitMQ and SeaweedFS, a local Airflow (scheduler, triggerer, UI) and the ``enn_generation``
DAG in local execution mode: each genome is a StudioML experiment run by ``studio-runner`` in its
own cached virtualenv. Prints each generation as it finishes, then the table and the fitness plot.

    python -m devtools.demo [--population 8] [--generations 4] [--epochs 2] [--seed 3] [--keep-running]
    python -m devtools.demo --generations 2 --population 4   # the reduced demo CI runs
    python -m devtools.demo ui      # browse earlier runs in the Airflow UI (Ctrl-C stops it)

It follows the campaign through Airflow's own state (DAG runs and task instances), never through
what S3 happens to hold yet, so it behaves the same on a fresh machine and on one that ran it before.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
import webbrowser
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from .local_airflow import DEFAULT_HOME, AirflowError, LocalAirflow
from .services import (
    DEFAULT_DATA_DIR,
    REPO,
    Ports,
    ServiceError,
    ServiceSet,
    fixed_ports_free,
    forget_running,
    load_running,
    save_running,
)
from .system import SystemPackageError

DAG_ID = "enn_generation"
BUCKET = "studio-enn"
OUTPUT_DIR = REPO / ".local" / "demo"
LAST_CAMPAIGN = OUTPUT_DIR / "last-campaign"
"""The campaign the last demo ran, which `make ui` opens."""
POLL_SECONDS = 3.0
PROGRESS_SECONDS = 30.0
"""A line at least this often while a generation trains, so a long wait never looks like a hang."""
ABSENT = {"NoSuchKey", "NoSuchBucket", "404"}
"""S3 answers meaning "not written yet": a fresh store has no bucket until ``breed`` creates it."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["run", "ui"], default="run")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--generation-timeout",
        type=float,
        default=1800,
        help="seconds one generation may take before the demo gives up (default 1800)",
    )
    parser.add_argument("--keep-running", action="store_true", help="leave Airflow and the services running")
    args = parser.parse_args(argv)
    for name in ("population", "generations", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    # SIGTERM (CI's timeout, a closed terminal) unwinds like Ctrl-C, so `finally` stops what we started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    airflow: LocalAirflow | None = None
    services: ServiceSet | None = None
    we_started = False
    try:
        services, we_started = _services()
        airflow = LocalAirflow(home=DEFAULT_HOME, endpoints=services.endpoints)
        if airflow.stop_leftover():
            say("stopped the Airflow an interrupted earlier demo left running")
        airflow.choose_port()
        say("preparing Airflow (SQLite in .local/airflow; the first time takes about a minute)")
        airflow.migrate()
        if args.command == "ui":
            return _browse(airflow)
        say(f"starting Airflow on {airflow.url}: scheduler, DAG processor, triggerer, API server")
        airflow.start(progress=say)
        airflow.wait_for_dag(DAG_ID, progress=say)
        airflow.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
        _end_leftover_runs(airflow)
        summaries = run_campaign(airflow, services, args)
        _report(summaries, services, args, time.monotonic() - started, airflow)
        return 0
    except (AirflowError, ServiceError, SystemPackageError, CampaignFailed) as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    finally:
        if args.command == "ui" or not args.keep_running:
            if airflow is not None:
                airflow.stop()
            if we_started and services is not None:
                services.stop()
                forget_running(services.data_dir)


class CampaignFailed(RuntimeError):
    """A generation's DAG run failed; the message names it and where to look."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _services() -> tuple[ServiceSet, bool]:
    """The local servers: the ones already running from `make services`, or a fresh set.

    A fresh set is recorded like `make services` records its own, so that if this process is
    killed, the next demo reuses them and `make services-stop` stops them.
    """
    running = load_running(DEFAULT_DATA_DIR)
    if running is not None:
        say("using the local services already running (make services-stop stops them)")
        return running, False
    services = ServiceSet(data_dir=DEFAULT_DATA_DIR)
    if not fixed_ports_free():
        services.ports = Ports.free()
        say("the demo's usual ports are taken (another checkout's demo?); using free ports")
    services.start(progress=lambda line: say(line))
    save_running(services)
    return services, True


def _end_leftover_runs(airflow: LocalAirflow) -> None:
    """Runs an interrupted earlier demo left queued or running would hold the DAG's one active
    run slot (``max_active_runs=1``), and this campaign would wait behind them forever."""
    for state in ("running", "queued"):
        runs = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?state={state}&limit=100")["dag_runs"]
        for run in runs:
            airflow.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}", {"state": "failed"})
            say(f"marked {run['dag_run_id']}, left {state} by an earlier demo, as failed")


def run_campaign(
    airflow: LocalAirflow, services: ServiceSet, args: argparse.Namespace, *, remember: bool = True
) -> list[dict[str, Any]]:
    """Trigger generation 0, then follow each generation's DAG run until one stops the chain;
    ``remember`` records the campaign as the one `make ui` opens (tests leave it alone)."""
    # unique even for two demos started in the same second against one `make services` store
    campaign = f"{time.strftime('demo-%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    conf = {
        "campaign": campaign,
        "generation": 0,
        "generations": args.generations,
        "population": args.population,
        "epochs": args.epochs,
        "seed": args.seed,
        "bucket": BUCKET,
    }
    if remember:
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        LAST_CAMPAIGN.write_text(campaign)
    say(
        f"campaign {campaign}: {args.generations} generations of {args.population} genomes, {args.epochs} epochs each"
    )
    run_id = _run_id(campaign, 0)
    airflow.api(
        "POST",
        f"/dags/{DAG_ID}/dagRuns",
        {"dag_run_id": run_id, "logical_date": None, "conf": conf},
    )
    s3 = services.endpoints.s3_client()
    summaries: list[dict[str, Any]] = []
    previous_end: datetime | None = None
    for generation in range(args.generations):
        run_id = _run_id(campaign, generation)
        tasks = _follow_run(airflow, run_id, generation, args)
        summary = _s3_json(s3, f"enn/{campaign}/generation-{generation:03d}/summary.json")
        if summary is None:
            raise CampaignFailed(
                f"{run_id} succeeded but wrote no summary; see the select task's log: "
                f"{_log_of(airflow, tasks, 'select')}"
            )
        run = _dag_run(airflow, run_id) or {}
        summary["overhead_seconds"] = orchestration_overhead(run, tasks, previous_end)
        previous_end = _when(run.get("end_date"))
        summaries.append(summary)
        overhead = summary["overhead_seconds"]
        say(
            f"generation {generation} done: best {_fitness(summary['best_fitness'])}, "
            f"mean {_fitness(summary['mean_fitness'])}, {summary['experiments']} experiments, "
            f"{summary['failures']} failed, {summary['wall_seconds'] or 0:.0f} s"
            + (f", {overhead:.0f} s orchestration overhead" if overhead is not None else "")
        )
        if summary["best_fitness"] is None:
            raise CampaignFailed(
                f"every experiment of generation {generation} failed; the first one's log: "
                f"{_log_of(airflow, tasks, 'train')}"
            )
        following = {ti["task_id"]: ti["state"] for ti in tasks}.get("next_generation")
        if following != "success":  # skipped: the generation limit or the target fitness was reached
            break
    return summaries


def _run_id(campaign: str, generation: int) -> str:
    return f"{campaign}-gen-{generation:03d}"


def _follow_run(
    airflow: LocalAirflow, run_id: str, generation: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Wait for one generation's DAG run to end, with a progress line whenever its training moves
    on (and every half minute regardless); its task instances once it succeeded, else CampaignFailed."""
    started = time.monotonic()
    said_at, said = 0.0, ""
    while True:
        if airflow.process is not None and airflow.process.poll() is not None:
            raise AirflowError(f"Airflow stopped while generation {generation} ran; see {airflow.log_file}")
        run = _dag_run(airflow, run_id)
        tasks = airflow.task_instances(DAG_ID, run_id) if run is not None else []
        state = run["state"] if run is not None else "not created yet"
        if state == "success":
            return tasks
        if state == "failed":
            raise CampaignFailed(_failure(airflow, run_id, tasks))
        progress = _progress(state, tasks, args.population)
        elapsed = time.monotonic() - started
        if progress != said or elapsed - said_at >= PROGRESS_SECONDS:
            say(f"generation {generation}: {progress} ({elapsed:.0f} s)")
            said, said_at = progress, elapsed
        if elapsed > args.generation_timeout:
            raise CampaignFailed(
                f"generation {generation} ({run_id}) did not finish within {args.generation_timeout:.0f} s "
                f"(last: {progress}); see {airflow.log_file} and {airflow.home / 'logs'}"
            )
        time.sleep(POLL_SECONDS)


def orchestration_overhead(
    run: dict[str, Any], tasks: list[dict[str, Any]], previous_end: datetime | None
) -> float | None:
    """Seconds of a generation that were not training: from the previous generation's DAG run end
    (this run's own start for the first generation) to this run's end, less the span of its
    training (the first ``train`` task's start to the last one's end). It holds the trigger of
    this run, ``breed``, every hop to and from ``train``, ``select`` and ``next_generation``;
    None when Airflow did not report the times."""
    end = _when(run.get("end_date"))
    begin = previous_end or _when(run.get("start_date"))
    train = [ti for ti in tasks if ti["task_id"] == "train"]
    starts = [_when(ti.get("start_date")) for ti in train]
    ends = [_when(ti.get("end_date")) for ti in train]
    if end is None or begin is None or not train or None in starts or None in ends:
        return None
    span = (max(ends) - min(starts)).total_seconds()  # type: ignore[type-var]
    return round((end - begin).total_seconds() - span, 1)


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _dag_run(airflow: LocalAirflow, run_id: str) -> dict[str, Any] | None:
    try:
        return airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
    except AirflowError as error:
        if "HTTP 404" in str(error):
            return None
        raise


def _progress(state: str, tasks: list[dict[str, Any]], population: int) -> str:
    """ "breeding", "training 3/8 done, 2 running", "collecting", ... from the task states."""
    if state != "running":
        return f"run {state}"
    states = {ti["task_id"]: ti["state"] for ti in tasks if ti["task_id"] != "train"}
    train = [ti["state"] for ti in tasks if ti["task_id"] == "train" and ti.get("map_index", -1) >= 0]
    if states.get("breed") != "success":
        return "breeding the population"
    if states.get("select") not in ("running", "success", "failed", "upstream_failed"):
        finished = sum(s in ("success", "failed", "skipped") for s in train)
        running = sum(s == "running" for s in train)
        return f"training {finished}/{len(train) or population} experiments done, {running} running"
    return "collecting results and selecting parents"


def _failure(airflow: LocalAirflow, run_id: str, tasks: list[dict[str, Any]]) -> str:
    """Which tasks failed and where their logs are: enough to act without opening the UI."""
    failed = [ti for ti in tasks if ti["state"] == "failed"]
    lines = [f"DAG run {run_id} failed"]
    for ti in failed[:5]:
        where = f"{ti['task_id']}[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else ti["task_id"]
        lines.append(f"  task {where} failed; its log: {airflow.task_log(ti)}")
    if len(failed) > 5:
        lines.append(f"  ... and {len(failed) - 5} more failed tasks")
    if not failed:
        lines.append(f"  no task failed (the run was marked failed); see {airflow.log_file}")
    lines.append(f"  in the UI: make ui, then {airflow.url}/dags/{DAG_ID}/runs/{run_id}")
    return "\n".join(lines)


def _log_of(airflow: LocalAirflow, tasks: list[dict[str, Any]], task_id: str) -> str:
    ti = next((ti for ti in tasks if ti["task_id"] == task_id), None)
    return str(airflow.task_log(ti)) if ti is not None else str(airflow.home / "logs")


def _s3_json(s3: Any, key: str) -> Any:
    """An S3 JSON document, or None while it (or its bucket) does not exist yet."""
    try:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ABSENT:
            return None
        raise
    return json.loads(body)


def _fitness(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


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
        f" {'overhead':>9}"
    )
    for s in summaries:
        overhead = s.get("overhead_seconds")
        print(
            f"{s['generation']:>10} {_fitness(s['best_fitness']):>8} {_fitness(s['mean_fitness']):>8} "
            f"{_fitness(s['worst_fitness']):>8} {s['experiments']:>12} {s['failures']:>7} {s['wall_seconds'] or 0:>7.0f}s"
            f" {'-' if overhead is None else f'{overhead:.1f}s':>9}"
        )
    print(
        "overhead: the generation's time from the previous generation's end (its own start for the "
        "first) to its end, less its training span (first train start to last train end)"
    )
    first, last = summaries[0]["best_fitness"], summaries[-1]["best_fitness"]
    change = "improved" if last > first else "did not improve"
    print(
        f"\nbest fitness {change}: {first:.4f} (generation 0) -> {last:.4f} (generation {summaries[-1]['generation']})"
    )
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    plot = OUTPUT_DIR / f"{campaign}-fitness.png"
    services.endpoints.s3_client().download_file(BUCKET, f"enn/{campaign}/fitness.png", str(plot))
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
        print("\nBrowse the campaign in the Airflow UI's Studio view (chart, generations, genomes): make ui")


def studio_view_url(base: str, campaign: str | None) -> str:
    """The Studio view's campaign tab on the campaign's first DAG run; the DAG's runs without one."""
    if not campaign:
        return f"{base}/dags/{DAG_ID}"
    return f"{base}/dags/{DAG_ID}/runs/{_run_id(campaign, 0)}/plugin/studio-campaign"


def _browse(airflow: LocalAirflow) -> int:
    airflow.start(command=("api-server",))
    campaign = LAST_CAMPAIGN.read_text().strip() if LAST_CAMPAIGN.exists() else None
    url = studio_view_url(airflow.url, campaign)
    what = f"campaign {campaign}" if campaign else "no demo campaign yet (make demo runs one)"
    print(f"\nAirflow UI, {what}: {url}  (no login on this local copy; Ctrl-C to stop)", flush=True)
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        webbrowser.open(url)
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
