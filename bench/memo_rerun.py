"""Memoization: what re-running a cleared generation costs when two of its genomes had failed.

Runs an 8-genome generation of ``StudioExperimentOperator(cache=True)`` (the DAG in
``tests/dags/memo_dag``: mapped train with local runners, then collect) through real Airflow
(``DAG.test``, SQLite in a private ``AIRFLOW_HOME``) on a private SeaweedFS (free loopback
ports, stopped at the end). Each genome works ``--seconds``; ``--failing`` of them then hit a
fault outside the request (so the failed run cost as much as a good one). The fault is fixed
and the same run (same run id, same experiment keys) runs again, as clearing it does.

Printed per run: experiments launched and reused, their states, *experiment time* (the sum of
the runner-reported ``duration_seconds`` of the experiments that ran; a reused result costs
none) and the run's wall time. Target: the re-run's experiment time is at most 25 % of the
first run's, and exactly ``--failing`` experiments launch. With faults at the end of the work
the floor of that ratio is failing/genomes (25 % for 2 of 8): the target asks that memoization
add nothing measurable. Exit status 1 when the launch count is wrong.

    .venv/bin/python bench/memo_rerun.py [--genomes 8] [--failing 2] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.services import private_services  # noqa: E402
from tests.dags.memo_runs import GenerationRun, airflow_env, run_generation  # noqa: E402

LOGICAL_DATE = "2026-03-01T00:00:00+00:00"
TARGET_RATIO = 0.25


def describe(name: str, run: GenerationRun) -> str:
    states: dict[str, int] = {}
    for summary in run.launched:
        states[summary["status"]] = states.get(summary["status"], 0) + 1
    reused = len(run.summaries) - len(run.launched)
    shown = ", ".join(f"{count} {status}" for status, count in sorted(states.items())) or "none"
    durations = " ".join(f"{float(summary.get('duration_seconds') or 0):.2f}" for summary in run.launched)
    return (
        f"{name:<10} launched {len(run.launched):>2} ({shown}), reused {reused:>2}, "
        f"experiment time {run.experiment_seconds:7.2f} s, wall {run.wall_seconds:6.1f} s\n"
        f"{'':<10} each launched experiment (s): {durations}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genomes", type=int, default=8)
    parser.add_argument("--failing", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="work per genome")
    options = parser.parse_args()
    failing = set(range(1, options.genomes, max(1, options.genomes // max(1, options.failing))))
    failing = set(sorted(failing)[: options.failing])

    with tempfile.TemporaryDirectory(prefix="memo-bench-") as scratch:
        home = Path(scratch) / "airflow"
        home.mkdir()
        os.environ.update(
            {
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "AIRFLOW__STUDIO__LOCAL_CACHE_DIR": str(Path(scratch) / "runner-cache"),
            }
        )
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
        with private_services(Path(scratch) / "services") as services:
            endpoints = services.endpoints
            bucket = "memo-bench"
            endpoints.s3_client().create_bucket(Bucket=bucket)
            faults = Path(scratch) / "faults"
            faults.mkdir()
            for genome in failing:
                (faults / f"genome-{genome}").touch()
            conf = {
                "bucket": bucket,
                "genomes": options.genomes,
                "seconds": options.seconds,
                "faults": str(faults),
            }
            env = airflow_env(endpoints)
            db = home / "airflow.db"
            print(
                f"generation of {options.genomes} genomes, {options.seconds:g} s of work each, genomes {sorted(failing)} failing"
            )
            first = run_generation(env, db, LOGICAL_DATE, conf)
            print(describe("first run", first))
            for marker in faults.iterdir():
                marker.unlink()
            rerun = run_generation(env, db, LOGICAL_DATE, conf)
            print(describe("re-run", rerun))

    ratio = rerun.experiment_seconds / first.experiment_seconds if first.experiment_seconds else float("nan")
    launched_ok = (
        len(rerun.launched) == len(failing)
        and {index for index, summary in rerun.summaries.items() if not summary.get("reused_from")} == failing
    )
    print(
        f"re-run experiment time / first run's: {ratio:.1%} (target <= {TARGET_RATIO:.0%}: "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
        f"wall: {rerun.wall_seconds / first.wall_seconds:.1%}"
    )
    print(
        f"experiments launched by the re-run: {len(rerun.launched)} "
        f"(target exactly {len(failing)}, the failed genomes: {'met' if launched_ok else 'NOT met'})"
    )
    return 0 if launched_ok else 1


if __name__ == "__main__":
    sys.exit(main())
