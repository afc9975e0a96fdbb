"""MetadataScrapeOperator against a real SeaweedFS, with documents built by the runner's own code.

Documents are folded by ``studio_runner.metadata.scrape`` from runner facts and console lines,
and named by ``accession_id``/``scrape_file_name``, so they have exactly the runner's layout.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException
from studio_runner.metadata import RunnerFacts, accession_id, base62, scrape, scrape_file_name

from airflow_provider_studio.operators.metadata import MetadataScrapeOperator
from airflow_provider_studio.scrape_collection import (
    ScrapeCollector,
    Wanted,
    fields_from,
    scrape_location,
    wanted_from,
)

CONN_ID = "studio_scrape_s3"
T0 = 1_790_000_000  # 2026-09-21, a plausible attempt start in seconds


# --- helpers -------------------------------------------------------------------------------------


def scrape_bytes(
    key: str,
    *,
    host: str,
    start: float,
    fitness: float | None = None,
    finished: bool = True,
    status: str = "succeeded",
    exit_code: int = 0,
    extra: dict[str, Any] | None = None,
    tag: str | None = "1",
) -> tuple[str, bytes]:
    """(object key, body) of one attempt's scrape file, as the runner writes it.

    ``tag`` is the runner process's part of the name (its pid), so one (host, start) names one
    attempt that can be written again; None numbers attempts as a runner process does.
    """
    facts = RunnerFacts(
        host=host,
        key=key,
        project="enn-demo",
        artifacts={
            "output": f"s3://127.0.0.1:8333/experiments/{key}/output.tar",
            "modeldir": f"s3://127.0.0.1:8333/experiments/{key}/modeldir.tar",
        },
        load_time=start - 2,
        start_time=start,
        stop_time=start + 30 if finished else None,
        status=status if finished else "running",
        exit_code=exit_code if finished else None,
    )
    lines = ["epoch 1/2 loss=0.91", "epoch 2/2 loss=0.42"]
    if fitness is not None:
        lines.append(json.dumps({"experiment": {"fitness": fitness, "generation": 3}}))
    if extra:
        lines.append(json.dumps(extra))
    document = scrape(lines, before=facts.before(), after=facts.after())
    name = "metadata/" + scrape_file_name(accession_id(host, start, tag=tag))
    return name, (json.dumps(document, sort_keys=True) + "\n").encode()


def put(s3_client, bucket: str, name: str, body: bytes) -> str:
    s3_client.put_object(Bucket=bucket, Key=name, Body=body, ContentType="application/json")
    return f"s3://{bucket}/{name}"


def put_attempt(s3_client, bucket: str, key: str, **kwargs: Any) -> str:
    name, body = scrape_bytes(key, **kwargs)
    return put(s3_client, bucket, name, body)


def summary(key: str, scrape_uri: str | None, status: str = "succeeded", exit_code: int | None = 0) -> dict:
    """What ``RunSummary`` gives, with the runner's qualified ``s3://HOST:PORT/bucket/key``."""
    if scrape_uri is not None and scrape_uri.startswith("s3://"):
        scrape_uri = "s3://127.0.0.1:8333/" + scrape_uri[len("s3://") :]
    return {
        "key": key,
        "status": status,
        "reason": "",
        "exit_code": exit_code,
        "artifacts": {"output": f"s3://127.0.0.1:8333/experiments/{key}/output.tar"},
        "scrape_uri": scrape_uri,
        "results_saved": True,
        "duration_seconds": 31.2,
    }


def operator(**kwargs: Any) -> MetadataScrapeOperator:
    kwargs.setdefault("aws_conn_id", CONN_ID)
    kwargs.setdefault("poll_interval", 0.2)
    return MetadataScrapeOperator(task_id="collect_metadata", **kwargs)


def execute(op: MetadataScrapeOperator) -> list[dict[str, Any]]:
    return op.execute(context={})  # the operator reads nothing from the context


def by_key(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in rows}


@pytest.fixture
def aws_conn(services, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An Airflow AWS connection to the session's SeaweedFS, from an AIRFLOW_CONN_ variable."""
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        json.dumps(
            {
                "conn_type": "aws",
                "login": services.s3_access_key,
                "password": services.s3_secret_key,
                "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
            }
        ),
    )
    yield CONN_ID


# --- by key --------------------------------------------------------------------------------------


def test_by_keys_picks_the_latest_attempt_across_hosts(s3_client, bucket: str, aws_conn: str) -> None:
    # gen3-a: three attempts on two hosts; the last one (by start second) wins.
    put_attempt(
        s3_client, bucket, "gen3-a", host="gpu-node-1", start=T0, fitness=0.1, status="failed", exit_code=1
    )
    put_attempt(s3_client, bucket, "gen3-a", host="gpu-node-1", start=T0 + 50, fitness=0.2)
    latest_a = put_attempt(s3_client, bucket, "gen3-a", host="runner-7d9f-x2", start=T0 + 90, fitness=0.3)
    # gen3-b: two hosts started in the same second; the document's start_time breaks the tie.
    put_attempt(s3_client, bucket, "gen3-b", host="gpu-node-2", start=T0 + 10.25, fitness=0.4)
    latest_b = put_attempt(s3_client, bucket, "gen3-b", host="gpu-node-1", start=T0 + 10.75, fitness=0.5)
    # gen3-c: one attempt, which failed.
    only_c = put_attempt(
        s3_client,
        bucket,
        "gen3-c",
        host="gpu-node-3",
        start=T0 + 5,
        fitness=None,
        status="failed",
        exit_code=1,
    )
    # someone else's experiment in the same bucket is ignored
    put_attempt(s3_client, bucket, "other-campaign", host="gpu-node-9", start=T0 + 500, fitness=9.9)

    rows = execute(operator(experiments=["gen3-c", "gen3-a", "gen3-b"], bucket=bucket))

    assert [row["key"] for row in rows] == ["gen3-c", "gen3-a", "gen3-b"]
    a, b, c = by_key(rows)["gen3-a"], by_key(rows)["gen3-b"], by_key(rows)["gen3-c"]
    assert a == {
        "key": "gen3-a",
        "status": "succeeded",
        "exit_code": 0,
        "attempts": 3,
        "scrape_uri": latest_a,
        "artifacts": {
            "modeldir": "s3://127.0.0.1:8333/experiments/gen3-a/modeldir.tar",
            "output": "s3://127.0.0.1:8333/experiments/gen3-a/output.tar",
        },
        "experiment.fitness": 0.3,
        "error": None,
    }
    assert (b["scrape_uri"], b["attempts"], b["experiment.fitness"]) == (latest_b, 2, 0.5)
    assert (c["status"], c["exit_code"], c["scrape_uri"], c["experiment.fitness"], c["error"]) == (
        "failed",
        1,
        only_c,
        None,
        None,
    )
    assert list(a) == [
        "key",
        "status",
        "exit_code",
        "attempts",
        "scrape_uri",
        "artifacts",
        "experiment.fitness",
        "error",
    ]


def test_attempts_on_one_host_in_one_second_are_all_kept_and_the_later_wins(
    s3_client, bucket: str, aws_conn: str
) -> None:
    """Names carry whole seconds (spec §5.1); the host part tells same-second attempts apart."""
    # the later attempt is named first, so the name order alone would pick the wrong one
    later = put_attempt(
        s3_client, bucket, "gen4-a", host="gpu-node-1", start=T0 + 20.75, fitness=0.2, tag=None
    )
    earlier = put_attempt(
        s3_client,
        bucket,
        "gen4-a",
        host="gpu-node-1",
        start=T0 + 20.25,
        fitness=0.1,
        status="failed",
        tag=None,
    )
    assert later != earlier
    for uri in (later, earlier):
        host_part, _, suffix = uri.rsplit("/", 1)[1][: -len(".json")].rpartition("-")
        assert suffix == base62(T0 + 20)  # decodes to the start second
        assert host_part.startswith("scrape-host-gpu-node-1_")

    [row] = execute(operator(experiments=["gen4-a"], bucket=bucket))
    assert (row["attempts"], row["scrape_uri"], row["experiment.fitness"]) == (2, later, 0.2)


def test_keys_over_several_listing_pages(s3_client, bucket: str, aws_conn: str) -> None:
    """1,050 documents: more than one ListObjectsV2 page (1,000), fetched by the pool."""
    documents = [
        scrape_bytes(f"exp-{i:04d}", host=f"node-{i % 7}", start=T0 + i, fitness=i / 1000)
        for i in range(1050)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: put(s3_client, bucket, *item), documents))

    keys = [f"exp-{i:04d}" for i in (1049, 0, 999, 1000, 500)]
    rows = execute(operator(experiments=keys, bucket=f"s3://{bucket}", max_workers=8))

    assert [row["key"] for row in rows] == keys
    assert [row["experiment.fitness"] for row in rows] == [1.049, 0.0, 0.999, 1.0, 0.5]
    assert all(row["error"] is None and row["attempts"] == 1 for row in rows)


# --- by summary, and mixed -----------------------------------------------------------------------


def test_by_summaries_reads_their_uris_without_listing(s3_client, bucket: str, aws_conn: str) -> None:
    older = put_attempt(s3_client, bucket, "cand-1", host="gpu-node-1", start=T0, fitness=0.61)
    put_attempt(s3_client, bucket, "cand-1", host="gpu-node-1", start=T0 + 60, fitness=0.99)
    second = put_attempt(s3_client, bucket, "cand-2", host="gpu-node-2", start=T0 + 1, fitness=0.72)

    # no bucket given: nothing can be listed, so the URIs alone must do; the summary's attempt
    # is the one reported even though a later attempt of cand-1 exists.
    rows = execute(operator(experiments=[summary("cand-2", second), summary("cand-1", older)]))

    assert [(row["key"], row["scrape_uri"], row["experiment.fitness"]) for row in rows] == [
        ("cand-2", second, 0.72),
        ("cand-1", older, 0.61),
    ]
    assert all(
        row["status"] == "succeeded" and row["attempts"] is None and row["error"] is None for row in rows
    )


def test_mixed_keys_and_summaries_nested_as_airflow_renders_them(
    s3_client, bucket: str, aws_conn: str
) -> None:
    by_uri = put_attempt(s3_client, bucket, "cand-1", host="gpu-node-1", start=T0, fitness=0.5)
    put_attempt(s3_client, bucket, "cand-2", host="gpu-node-2", start=T0, fitness=0.6)
    put_attempt(s3_client, bucket, "cand-2", host="gpu-node-2", start=T0 + 100, fitness=0.65)
    put_attempt(s3_client, bucket, "cand-3", host="gpu-node-3", start=T0, fitness=0.7)
    mapped_xcom = (summary(k, u) for k, u in [("cand-1", by_uri)])  # a lazy sequence, as XCom gives

    rows = execute(operator(experiments=[mapped_xcom, "cand-2", summary("cand-3", None)], bucket=bucket))

    assert [(row["key"], row["experiment.fitness"], row["attempts"]) for row in rows] == [
        ("cand-1", 0.5, 1),  # the bucket was listed anyway for cand-2, so attempts are known
        ("cand-2", 0.65, 2),
        ("cand-3", 0.7, 1),  # a summary without scrape_uri is looked up by its key
    ]


def test_fields_are_picked_by_dotted_path(s3_client, bucket: str, aws_conn: str) -> None:
    put_attempt(
        s3_client,
        bucket,
        "cand-1",
        host="gpu-node-1",
        start=T0,
        fitness=0.8,
        extra={"experiment": {"scores": [0.1, 0.2]}, "hyper": {"lr": 0.003, "layers": {"n": 4}}},
    )

    fields = [
        "experiment.fitness",
        "experiment.generation",
        "experiment.scores.1",
        "hyper.layers.n",
        "hyper.missing",
        "studioml.host",
    ]
    (row,) = execute(operator(experiments=["cand-1"], bucket=bucket, fields=fields))

    assert {path: row[path] for path in fields} == {
        "experiment.fitness": 0.8,
        "experiment.generation": 3,
        "experiment.scores.1": 0.2,
        "hyper.layers.n": 4,
        "hyper.missing": None,
        "studioml.host": "gpu-node-1",
    }


# --- problems ------------------------------------------------------------------------------------


@pytest.fixture
def troubled_bucket(s3_client, bucket: str) -> dict[str, str]:
    """One good experiment and one of each problem the operator must name."""
    good = put_attempt(s3_client, bucket, "good", host="gpu-node-1", start=T0, fitness=0.9)
    # truncated upload of cand-broken's only attempt: the key is still legible in the bytes
    name, body = scrape_bytes("cand-broken", host="gpu-node-2", start=T0)
    cut = body[: body.index(b'"key": "cand-broken"') + 40]
    broken = put(s3_client, bucket, name, cut)
    # cand-regressed: a good attempt, then a later one that is not JSON
    put_attempt(s3_client, bucket, "cand-regressed", host="gpu-node-3", start=T0, fitness=0.4)
    name, body = scrape_bytes("cand-regressed", host="gpu-node-3", start=T0 + 100)
    regressed = put(s3_client, bucket, name, body.replace(b"}", b"", 1))
    # garbage that cannot be attributed to any experiment
    put(s3_client, bucket, "metadata/scrape-host-mystery-1sGgNO.json", b"\x00\x01 not json")
    # a summary pointing at an object that is not there, one pointing at garbage
    gone = f"s3://{bucket}/metadata/scrape-host-gpu-node-5-1sGgNO.json"
    garbage = put(s3_client, bucket, "metadata/scrape-host-gpu-node-6-1sGgNO.json", b"{'python': 'repr'}")
    return {
        "bucket": bucket,
        "good": good,
        "broken": broken,
        "regressed": regressed,
        "gone": gone,
        "garbage": garbage,
    }


def troubled_experiments(t: dict[str, str]) -> list[Any]:
    return [
        "good",
        "cand-missing",
        "cand-broken",
        "cand-regressed",
        summary("cand-gone", t["gone"]),
        summary("cand-garbage", t["garbage"]),
        summary("cand-invalid", None, status="invalid", exit_code=None),
    ]


def test_every_problem_is_reported_at_once_and_fails_the_task(
    troubled_bucket: dict[str, str], aws_conn: str
) -> None:
    t = troubled_bucket
    op = operator(experiments=troubled_experiments(t), bucket=t["bucket"])

    with pytest.raises(AirflowException) as raised:
        execute(op)

    message = str(raised.value)
    lines = message.splitlines()
    assert lines[0] == "6 of 7 experiments have no usable scrape document:"
    assert lines[-1] == "Set allow_missing=True to report these as rows with an error instead."
    problems = dict(line[2:].split(": ", 1) for line in lines[1:-1])
    assert set(problems) == {
        "cand-missing",
        "cand-broken",
        "cand-regressed",
        "cand-gone",
        "cand-garbage",
        "cand-invalid",
    }
    assert problems["cand-missing"].startswith(
        f"no scrape document for key 'cand-missing' under s3://{t['bucket']}/metadata/"
    )
    assert "scrape-host-mystery-1sGgNO.json" in problems["cand-missing"]  # the unreadable file is named
    assert problems["cand-broken"].startswith(f"{t['broken']} is not valid JSON: ")
    assert problems["cand-regressed"].startswith(f"latest attempt {t['regressed']} is not valid JSON: ")
    assert problems["cand-gone"] == f"scrape document {t['gone']} for key 'cand-gone' does not exist"
    assert problems["cand-garbage"].startswith(f"{t['garbage']} is not valid JSON: Expecting property name")
    assert problems["cand-invalid"].startswith("no scrape document for key 'cand-invalid'")


def test_allow_missing_reports_problems_as_rows(troubled_bucket: dict[str, str], aws_conn: str) -> None:
    t = troubled_bucket
    rows = execute(operator(experiments=troubled_experiments(t), bucket=t["bucket"], allow_missing=True))

    table = by_key(rows)
    assert [row["key"] for row in rows] == [
        "good", "cand-missing", "cand-broken", "cand-regressed", "cand-gone", "cand-garbage", "cand-invalid",
    ]  # fmt: skip
    assert table["good"]["error"] is None and table["good"]["experiment.fitness"] == 0.9
    assert all(row["error"] for row in rows[1:])
    missing = table["cand-missing"]
    assert (missing["status"], missing["attempts"], missing["scrape_uri"], missing["experiment.fitness"]) == (
        None,
        0,
        None,
        None,
    )
    assert table["cand-regressed"]["attempts"] == 2
    assert table["cand-regressed"]["scrape_uri"] == t["regressed"]
    # what the runner's summary knew is kept when the document is not there
    invalid = table["cand-invalid"]
    assert (invalid["status"], invalid["artifacts"]) == (
        "invalid",
        {"output": "s3://127.0.0.1:8333/experiments/cand-invalid/output.tar"},
    )


# --- waiting -------------------------------------------------------------------------------------


def test_waits_until_documents_complete(
    s3_client, bucket: str, aws_conn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # cand-1 is at a checkpoint: same file name as its final document, which the runner overwrites.
    put_attempt(s3_client, bucket, "cand-1", host="gpu-node-1", start=T0, fitness=0.2, finished=False)
    # cand-2's runner reported a URI whose document is not there yet.
    name2, final2 = scrape_bytes("cand-2", host="gpu-node-2", start=T0, fitness=0.7)
    name1, final1 = scrape_bytes("cand-1", host="gpu-node-1", start=T0, fitness=0.8)

    def finish() -> None:
        put(s3_client, bucket, name1, final1)
        put(s3_client, bucket, name2, final2)

    timer = threading.Timer(1.5, finish)
    timer.start()
    try:
        with caplog.at_level(logging.INFO, logger="airflow_provider_studio.scrape_collection"):
            rows = execute(
                operator(
                    experiments=["cand-1", summary("cand-2", f"s3://{bucket}/{name2}")],
                    bucket=bucket,
                    wait_for_completion=True,
                    timeout=60,
                    poll_interval=0.25,
                )
            )
    finally:
        timer.cancel()
        timer.join()

    assert [(row["key"], row["status"], row["experiment.fitness"], row["error"]) for row in rows] == [
        ("cand-1", "succeeded", 0.8, None),
        ("cand-2", "succeeded", 0.7, None),
    ]
    assert "2 of 2 experiments not complete yet" in caplog.text


def test_without_waiting_an_incomplete_document_is_reported_as_running(
    s3_client, bucket: str, aws_conn: str
) -> None:
    put_attempt(s3_client, bucket, "cand-1", host="gpu-node-1", start=T0, fitness=0.2, finished=False)

    (row,) = execute(operator(experiments=["cand-1"], bucket=bucket))

    assert (row["status"], row["exit_code"], row["experiment.fitness"], row["error"]) == (
        "running",
        None,
        0.2,
        None,
    )


def test_waiting_times_out_naming_what_is_missing_or_incomplete(
    s3_client, bucket: str, aws_conn: str
) -> None:
    put_attempt(s3_client, bucket, "cand-done", host="gpu-node-1", start=T0, fitness=0.9)
    stuck = put_attempt(
        s3_client, bucket, "cand-stuck", host="gpu-node-2", start=T0, fitness=0.1, finished=False
    )
    experiments = ["cand-done", "cand-stuck", "cand-never"]

    with pytest.raises(AirflowException) as raised:
        execute(
            operator(
                experiments=experiments, bucket=bucket, wait_for_completion=True, timeout=1, poll_interval=0.2
            )
        )

    message = str(raised.value)
    assert message.startswith("2 of 3 experiments have no usable scrape document:")
    assert (
        f"- cand-stuck: latest attempt {stuck} is still incomplete (no studioml.stop_time, status 'running') after waiting"
        in message
    )
    assert f"- cand-never: no scrape document for key 'cand-never' under s3://{bucket}/metadata/" in message
    assert "cand-done" not in message

    rows = execute(
        operator(
            experiments=experiments, bucket=bucket, wait_for_completion=True, timeout=0.5, allow_missing=True
        )
    )
    assert [(row["key"], row["status"], bool(row["error"])) for row in rows] == [
        ("cand-done", "succeeded", False),
        ("cand-stuck", "running", True),
        ("cand-never", None, True),
    ]


def test_polling_rereads_only_new_or_changed_documents(s3_client, bucket: str) -> None:
    """Between polls, unchanged objects (same ETag) are not fetched again; summaries use If-None-Match."""
    for i in range(5):
        put_attempt(
            s3_client, bucket, f"cand-{i}", host="gpu-node-1", start=T0 + i, fitness=0.1, finished=False
        )
    summary_uri = put_attempt(s3_client, bucket, "cand-9", host="gpu-node-9", start=T0, finished=False)
    name, final = scrape_bytes("cand-0", host="gpu-node-1", start=T0, fitness=0.9)
    wanted = [Wanted("cand-0"), Wanted("cand-1"), Wanted("cand-9", scrape_uri=summary_uri)]

    with ScrapeCollector(s3_client, max_workers=4) as collector:
        first = collector.collect_once(wanted, bucket=bucket)
        assert collector.fetched == 6  # each of the six documents once, though cand-9's is also listed
        collector.collect_once(wanted, bucket=bucket)
        assert collector.fetched == 6  # nothing changed: nothing read again
        put(s3_client, bucket, name, final)  # the runner overwrites cand-0's file at the end
        last = collector.collect_once(wanted, bucket=bucket)
        assert collector.fetched == 7

    assert [outcome.settled for outcome in first] == [False, False, False]
    assert [outcome.settled for outcome in last] == [True, False, False]
    assert last[0].attempt is not None and last[0].attempt.values == {"experiment.fitness": 0.9}


def test_a_summary_may_point_at_a_local_scrape_file(tmp_path: Path, aws_conn: str) -> None:
    """The provider's local execution mode keeps metadata on disk: file:// URIs are read as files."""
    name, body = scrape_bytes("cand-local", host="laptop", start=T0, fitness=0.42)
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_bytes(body)

    (row,) = execute(operator(experiments=[summary("cand-local", f"file://{path}")]))

    assert (row["key"], row["status"], row["experiment.fitness"], row["scrape_uri"], row["error"]) == (
        "cand-local",
        "succeeded",
        0.42,
        f"file://{path}",
        None,
    )


# --- output --------------------------------------------------------------------------------------


def test_output_uri_holds_the_table_as_json_lines(s3_client, bucket: str, aws_conn: str) -> None:
    put_attempt(s3_client, bucket, "cand-1", host="gpu-node-1", start=T0, fitness=0.25)
    put_attempt(s3_client, bucket, "cand-2", host="gpu-node-2", start=T0, fitness=0.75)
    output = f"s3://{bucket}/tables/generation=3/metadata.jsonl"

    rows = execute(
        operator(
            experiments=["cand-1", "cand-2", "cand-3"], bucket=bucket, allow_missing=True, output_uri=output
        )
    )

    body = (
        s3_client.get_object(Bucket=bucket, Key="tables/generation=3/metadata.jsonl")["Body"].read().decode()
    )
    assert body.endswith("\n")
    lines = body.splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert [json.loads(line)["key"] for line in lines] == ["cand-1", "cand-2", "cand-3"]
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="tables/")["Contents"]
    assert [item["Key"] for item in listed] == ["tables/generation=3/metadata.jsonl"]  # one object


# --- inputs --------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_reasons() -> None:
    with pytest.raises(ValueError) as raised:
        wanted_from(["ok", 3, {"status": "failed"}, "", {"key": "k", "scrape_uri": "http://x/y"}])
    message = str(raised.value)
    assert "experiments[1] is a int" in message
    assert "experiments[2] is a dict with neither a scrape_uri nor a key" in message
    assert "experiments[3] is an empty key" in message
    assert "experiments[4] (key 'k'): scrape_uri 'http://x/y' is not an s3:// or file:// URI" in message
    with pytest.raises(ValueError, match="render_template_as_native_obj"):
        wanted_from("['a', 'b']")
    with pytest.raises(ValueError, match="would overwrite the row's own column"):
        fields_from(["experiment.fitness", "status"])
    assert fields_from("experiment.fitness, hyper.lr") == ("experiment.fitness", "hyper.lr")
    with pytest.raises(ValueError, match="max_workers"):
        operator(experiments=[], max_workers=0)


def test_keys_without_a_bucket_are_refused(aws_conn: str) -> None:
    with pytest.raises(ValueError, match="no bucket was given"):
        execute(operator(experiments=["cand-1"]))


@pytest.mark.parametrize(
    ("uri", "canonical"),
    [
        (
            "s3://127.0.0.1:8333/exp/metadata/scrape-host-a-1sGgNO.json",
            "s3://exp/metadata/scrape-host-a-1sGgNO.json",
        ),
        ("s3://exp/metadata/scrape-host-a-1sGgNO.json", "s3://exp/metadata/scrape-host-a-1sGgNO.json"),
        (
            "s3://minio.svc/metadata/metadata/scrape-host-a-1sGgNO.json",
            "s3://metadata/metadata/scrape-host-a-1sGgNO.json",
        ),
        (
            "file:///tmp/work/metadata/scrape-host-a-1sGgNO.json",
            "file:///tmp/work/metadata/scrape-host-a-1sGgNO.json",
        ),
    ],
)
def test_summary_uris_are_read_in_both_forms(uri: str, canonical: str) -> None:
    assert scrape_location(uri) == canonical


# --- through Airflow -----------------------------------------------------------------------------


def test_in_a_dag_run_the_rows_reach_downstream_tasks_through_xcom(
    s3_client, bucket: str, aws_conn: str, airflow_db: Path, tmp_path: Path
) -> None:
    """Mapped tasks return runner summaries; the operator's return value is passed on by XCom."""
    uri_1 = put_attempt(s3_client, bucket, "cand-1", host="gpu-node-1", start=T0, fitness=0.31)
    uri_2 = put_attempt(s3_client, bucket, "cand-2", host="gpu-node-2", start=T0, fitness=0.62)
    put_attempt(s3_client, bucket, "cand-3", host="gpu-node-3", start=T0, fitness=0.93)
    dags = tmp_path / "dags"
    dags.mkdir()
    received = tmp_path / "received.json"
    (dags / "scrape_collect_dag.py").write_text(
        textwrap.dedent(
            f"""
            import json
            from pathlib import Path

            import pendulum
            from airflow.sdk import DAG, task
            from airflow_provider_studio.operators.metadata import MetadataScrapeOperator

            with DAG("scrape_collect_test", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):

                @task
                def run_experiment(key, uri):
                    # stands in for StudioExperimentOperator: the runner's result summary
                    return {{"key": key, "status": "succeeded", "exit_code": 0, "scrape_uri": uri}}

                summaries = run_experiment.expand_kwargs({[{"key": "cand-1", "uri": uri_1}, {"key": "cand-2", "uri": uri_2}]!r})
                collect = MetadataScrapeOperator(
                    task_id="collect",
                    experiments=[summaries, "cand-3"],
                    bucket={bucket!r},
                    aws_conn_id={aws_conn!r},
                    fields=["experiment.fitness", "studioml.host"],
                )

                @task
                def select(rows):
                    Path({str(received)!r}).write_text(json.dumps(rows))
                    return max(rows, key=lambda row: row["experiment.fitness"])["key"]

                select(collect.output)
            """
        )
    )
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "scrape_collect_test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    rows = json.loads(received.read_text())
    assert [(row["key"], row["experiment.fitness"], row["studioml.host"], row["error"]) for row in rows] == [
        ("cand-1", 0.31, "gpu-node-1", None),
        ("cand-2", 0.62, "gpu-node-2", None),
        ("cand-3", 0.93, "gpu-node-3", None),
    ]
    assert [row["scrape_uri"] for row in rows[:2]] == [uri_1, uri_2]
