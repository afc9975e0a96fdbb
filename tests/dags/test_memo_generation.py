"""Clearing a generation re-runs only the genomes that did not succeed: a generation of
``StudioExperimentOperator(cache=True)`` through real Airflow (``airflow dags test``, SQLite),
local runners and SeaweedFS, with two genomes made to fail and then fixed."""

from __future__ import annotations

from pathlib import Path

from tests.dags.memo_runs import airflow_env, run_generation
from tests.runner.results import scrape_documents

GENOMES = 4
FAILING = (1, 3)
LOGICAL_DATE = "2026-02-01T00:00:00+00:00"


def test_a_cleared_generation_reruns_only_the_failed_genomes(
    services, airflow_db: Path, s3_client, bucket: str, tmp_path: Path
) -> None:
    env = airflow_env(services)
    db = airflow_db / "airflow.db"
    faults = tmp_path / "faults"
    faults.mkdir()
    for genome in FAILING:
        (faults / f"genome-{genome}").touch()
    conf = {"bucket": bucket, "genomes": GENOMES, "seconds": 0, "faults": str(faults)}

    first = run_generation(env, db, LOGICAL_DATE, conf)
    assert len(first.summaries) == GENOMES and len(first.launched) == GENOMES
    failed = {i for i, summary in first.summaries.items() if summary["status"] == "failed"}
    assert failed == set(FAILING)
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix="memo/").get("Contents", [])
    assert len(listing) == GENOMES - len(FAILING), "only the successes are recorded"

    # a second run of the same generation is not a reason to re-run failures from the index
    again = run_generation(env, db, LOGICAL_DATE, conf)
    assert again.run_id == first.run_id, "the same generation, cleared and run again"
    assert {i for i, s in again.summaries.items() if s.get("reused_from")} == set(range(GENOMES)) - set(
        FAILING
    )
    assert {i for i, s in again.summaries.items() if s["status"] == "failed"} == set(FAILING), "never reused"

    for genome in FAILING:  # the fault is fixed; clear the generation again
        (faults / f"genome-{genome}").unlink()
    fixed = run_generation(env, db, LOGICAL_DATE, conf)
    assert fixed.run_id == first.run_id
    launched = {i for i, s in fixed.summaries.items() if not s.get("reused_from")}
    assert launched == set(FAILING), "exactly the failed genomes ran"
    assert all(summary["status"] == "succeeded" for summary in fixed.summaries.values())
    assert "reusing the succeeded result of experiment" in fixed.log
    for index, summary in fixed.summaries.items():
        attempts = scrape_documents(s3_client, bucket, summary["key"])
        # a failing genome ran in all three runs, a good one only in the first
        assert len(attempts) == (3 if index in FAILING else 1), (index, attempts)

    # the generation table has every genome, reused or not, with its fitness
    assert len(fixed.table) == GENOMES
    by_genome = {row["experiment.genome"]: row for row in fixed.table}
    assert set(by_genome) == set(range(GENOMES))
    for genome, row in by_genome.items():
        assert row["error"] is None and row["status"] == "succeeded"
        assert row["experiment.fitness"] == round(1 / (2 + genome), 4)
