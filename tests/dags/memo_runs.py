"""Running ``tests/dags/memo_dag``'s generation through ``airflow dags test`` and reading what it
did from Airflow's database: shared by the memoization test and ``bench/memo_rerun.py``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.provider.task_context import seaweed_conn_json

DAG_FOLDER = Path(__file__).resolve().parent / "memo_dag"
DAG_ID = "memo_generation"

_DRIVER = """
import importlib.util, json, sys
from datetime import datetime
spec = importlib.util.spec_from_file_location("memo_generation", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
when = datetime.fromisoformat(sys.argv[2])
run = module.generation.test(run_after=when, logical_date=when, run_conf=json.loads(sys.argv[3]))
print(f"generation run {run.run_id} state={run.state}")
"""
"""``airflow dags test`` with the run time fixed too (the CLI takes now), so the run id repeats."""


def airflow_env(services: Any) -> dict[str, str]:
    """This process's Airflow settings with the memo DAG folder, local runners and ``services``' S3."""
    return {
        **os.environ,
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FOLDER),
        "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
        "AIRFLOW_CONN_AWS_DEFAULT": seaweed_conn_json(services),
    }


@dataclass
class GenerationRun:
    """One ``dags test`` of the generation: the train summaries by map index, and the table."""

    run_id: str
    wall_seconds: float
    summaries: dict[int, dict[str, Any]]
    table: list[dict[str, Any]]
    log: str

    @property
    def launched(self) -> list[dict[str, Any]]:
        """Summaries of experiments that really ran (not reused)."""
        return [s for s in self.summaries.values() if not s.get("reused_from")]

    @property
    def experiment_seconds(self) -> float:
        return round(sum(float(s.get("duration_seconds") or 0) for s in self.launched), 3)


def run_generation(env: dict[str, str], db: Path, logical_date: str, conf: dict[str, Any]) -> GenerationRun:
    """Run the generation; at a logical date that already ran, the same run (id, keys) runs again."""
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _DRIVER,
            str(DAG_FOLDER / "memo_generation.py"),
            logical_date,
            json.dumps(conf),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.monotonic() - started
    log = result.stdout + result.stderr
    if result.returncode != 0 or "state=success" not in result.stdout:
        raise AssertionError(f"the generation run failed:\n{log[-6000:]}")
    with sqlite3.connect(db) as connection:
        ((run_id,),) = connection.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)
        ).fetchall()
        xcoms = connection.execute(
            "SELECT task_id, map_index, value FROM xcom WHERE dag_id = ? AND run_id = ? AND key = 'return_value'",
            (DAG_ID, run_id),
        ).fetchall()
    summaries = {index: json.loads(value) for task, index, value in xcoms if task == "train"}
    (table,) = [json.loads(value) for task, _, value in xcoms if task == "collect"]
    return GenerationRun(run_id, wall, summaries, table, log)
