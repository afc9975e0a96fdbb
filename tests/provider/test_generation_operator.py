"""StudioGenerationOperator: a generation queued to real RabbitMQ, run by real ``studio-runner serve``
processes against SeaweedFS, waited for by its trigger, and resumed.

The task is driven as a worker and a triggerer would: ``execute`` publishes and defers, the
trigger is rebuilt from its ``serialize()`` (as the triggerer rebuilds it from the database) and
run in an event loop, and ``execute_complete`` gets its event. The full DAG through Airflow is in
tests/dags/test_enn_queue_mode.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pendulum
import pytest
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, TaskDeferred
from airflow.sdk.module_loading import import_string

from airflow_provider_studio.hooks.rabbitmq import StudioRabbitMQHook
from airflow_provider_studio.operators.generation import StudioGenerationOperator
from airflow_provider_studio.triggers.generation import StudioGenerationTrigger
from tests.broker import queue_depth, unique, unique_queue
from tests.polling import wait_for
from tests.provider.connections import rabbitmq_connection, set_connection
from tests.provider.task_context import runtime_context, seaweed_conn_json
from tests.runner.processes import RunnerProcess
from tests.runner.results import scrape_documents

EVENT_TIMEOUT = 300.0
"""Only a guard against a hung test; nothing here measures speed."""

WORKLOAD = """\
import json, sys
if sys.argv[1] == "fail":
    sys.exit("this genome is made to fail")
print(json.dumps({"experiment": {"fitness": float(sys.argv[2])}}), flush=True)
"""


@pytest.fixture
def generation(services, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A queue, a bucket, connections and a workspace for one test's generation."""
    aws = unique("gen_aws_")
    monkeypatch.setenv(f"AIRFLOW_CONN_{aws.upper()}", seaweed_conn_json(services))
    rmq = set_connection(monkeypatch, unique("gen_rmq_"), rabbitmq_connection(services))
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "train.py").write_text(WORKLOAD)
    return {
        "queue": unique_queue("rmq_gen"),
        "bucket": bucket,
        "aws": aws,
        "rmq": rmq,
        "workspace": workspace,
    }


@pytest.fixture
def runners(services, serve_runner) -> Callable[[str, int], list[RunnerProcess]]:
    """``count`` runners serving only ``queue``; a failed attempt is dead-lettered at once."""

    def start(queue: str, count: int) -> list[RunnerProcess]:
        env = {"AWS_ACCESS_KEY_ID": services.s3_access_key, "AWS_SECRET_ACCESS_KEY": services.s3_secret_key}
        return [
            serve_runner("--queue-match", f"^{queue}$", "--max-attempts", "1", env=env) for _ in range(count)
        ]

    return start


def operator(
    generation: dict[str, Any], genomes: list[list[str]], *, prefix: str = "g", **kwargs: Any
) -> StudioGenerationOperator:
    """Genome ``i`` is experiment ``<queue>-<prefix><i>``: a new prefix is a new DAG run's keys."""
    with DAG("enn_queue", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
        return StudioGenerationOperator(
            task_id=kwargs.pop("task_id", "train"),
            experiments=[
                {"experiment_key": f"{generation['queue']}-{prefix}{index}", "args": args}
                for index, args in enumerate(genomes)
            ],
            queue_name=generation["queue"],
            results_bucket=generation["bucket"],
            script="train.py",
            workspace=str(generation["workspace"]),
            aws_conn_id=generation["aws"],
            rabbitmq_conn_id=generation["rmq"],
            poll_interval=0.5,
            fields=["experiment.fitness"],
            **kwargs,
        )


def publish(op: StudioGenerationOperator, context: Any) -> StudioGenerationTrigger:
    """``execute`` as a worker runs it: it must defer; the trigger comes back as the triggerer rebuilds it."""
    return deferral(op, context)[0]


def deferral(op: StudioGenerationOperator, context: Any) -> tuple[StudioGenerationTrigger, dict[str, Any]]:
    """The rebuilt trigger and the kwargs Airflow keeps for ``execute_complete`` (``next_kwargs``),
    which must survive the JSON trip through the task instance table."""
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "execute_complete"
    kwargs = deferred.value.kwargs or {}
    assert json.loads(json.dumps(kwargs)) == kwargs, "next_kwargs are stored as JSON"
    return rebuilt(deferred.value.trigger), kwargs


def rebuilt(trigger: StudioGenerationTrigger) -> StudioGenerationTrigger:
    classpath, kwargs = trigger.serialize()
    assert json.loads(json.dumps(kwargs)) == kwargs, "only primitives go into the trigger table"
    copy = import_string(classpath)(**kwargs)
    assert copy.serialize() == (classpath, kwargs)
    return copy


async def first_event(trigger: StudioGenerationTrigger, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
    events = trigger.run()
    try:
        event = await asyncio.wait_for(anext(events), timeout)
    finally:
        await events.aclose()
    return event.payload


def test_a_generation_completes_with_two_runners_and_a_trigger_rebuilt_from_its_serialized_form(
    generation, runners, s3_client, services
) -> None:
    genomes = [["ok", f"0.{index + 1}"] for index in range(6)]
    op = operator(generation, genomes)
    context = runtime_context(op)
    trigger = publish(op, context)
    # the management API's counts lag the broker by a few seconds
    wait_for(lambda: queue_depth(services.amqp_management_url, generation["queue"]) == 6, 30, "6 queued")

    # the trigger's own part of a triggerer restart (the cancelled run, then the rebuild from its
    # serialized row); a real restart of `airflow triggerer` is tests/dags/test_generation_triggerer_restart.py
    with pytest.raises(TimeoutError):
        asyncio.run(first_event(trigger, timeout=3))
    runners(generation["queue"], 2)
    # a new triggerer rebuilds the trigger from the database row and waits on
    event = asyncio.run(first_event(rebuilt(trigger)))
    assert event["status"] == "done" and event["succeeded"] == 6 and event["dead_lettered"] == 0

    rows = op.execute_complete(context, event)
    assert [row["key"] for row in rows] == [f"{generation['queue']}-g{index}" for index in range(6)]
    assert all(row["status"] == "succeeded" and row["error"] is None for row in rows)
    assert [row["experiment.fitness"] for row in rows] == [float(args[1]) for args in genomes]
    for row in rows:  # each experiment ran exactly once
        assert len(scrape_documents(s3_client, generation["bucket"], row["key"])) == 1
    wait_for(
        lambda: queue_depth(services.amqp_management_url, generation["queue"]) == 0, 30, "an empty queue"
    )


def test_min_success_ratio_both_ways_and_a_resumed_generation_publishes_only_the_missing_genome(
    generation, runners, services, s3_client
) -> None:
    genomes = [["ok", "0.5"], ["fail", "0"], ["ok", "0.7"], ["ok", "0.9"]]
    lenient = operator(generation, genomes, min_success_ratio=0.75)
    context = runtime_context(lenient)
    trigger = publish(lenient, context)
    started = runners(generation["queue"], 2)
    event = asyncio.run(first_event(trigger))
    assert event["status"] == "done"
    assert (event["succeeded"], event["dead_lettered"]) == (3, 1)

    rows = lenient.execute_complete(context, event)
    failed_key = f"{generation['queue']}-g1"
    assert [row["status"] for row in rows] == ["succeeded", "dead_lettered", "succeeded", "succeeded"]
    assert rows[1]["key"] == failed_key and "dead-lettered" in rows[1]["error"]

    strict = operator(generation, genomes, min_success_ratio=1.0)
    with pytest.raises(AirflowException, match=r"3 of 4 succeeded, 1 dead-lettered, 0 unfinished"):
        strict.execute_complete(runtime_context(strict), event)

    # the generation is cleared and re-run: only the genome without a success is queued again
    for runner in started:
        runner.stop()
    trigger = publish(strict, runtime_context(strict))
    bodies = wait_for(lambda: peek(services, generation), 30, "the re-published request")
    assert [json.loads(body)["experiment"]["key"] for body in bodies] == [failed_key]
    # the earlier run's dead letter is not taken for this run's: the trigger waits for a runner
    with pytest.raises(TimeoutError):
        asyncio.run(first_event(trigger, timeout=3))
    runners(generation["queue"], 1)
    event = asyncio.run(first_event(rebuilt(trigger)))
    assert (event["status"], event["succeeded"], event["dead_lettered"]) == ("done", 3, 1)
    assert len(scrape_documents(s3_client, generation["bucket"], failed_key)) == 2, "it ran again, once"
    assert len(scrape_documents(s3_client, generation["bucket"], f"{generation['queue']}-g0")) == 1
    # cache=False (the default) neither reads nor writes the result index
    assert memo_keys(s3_client, generation["bucket"]) == []
    assert all(
        row["reused_from"] is None for row in lenient.execute_complete(runtime_context(lenient), event)
    )


def peek(services, generation: dict[str, Any]) -> list[bytes]:
    return StudioRabbitMQHook(generation["rmq"]).peek(generation["queue"], limit=10)


def test_bad_experiments_are_refused_before_anything_is_queued(generation, services) -> None:
    op = operator(generation, [["ok", "1"]])
    op.experiments = [{"experiment_key": "a", "args": ["ok"]}, {"experiment_key": "a"}, {"argz": []}, "x"]
    with pytest.raises(AirflowException) as refused:
        op.execute(runtime_context(op))
    text = str(refused.value)
    assert "experiments[2] sets ['argz']" in text and "experiments[3] is a str" in text
    assert "appear more than once: ['a']" in text
    with pytest.raises(ValueError, match="min_success_ratio"):
        operator(generation, [], min_success_ratio=0)


def task_log(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def memo_keys(s3_client, bucket: str) -> list[str]:
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix="memo/").get("Contents", [])
    return [entry["Key"] for entry in listing]


def recorded_keys(s3_client, bucket: str) -> set[str]:
    """The experiment keys whose results the index holds."""
    return {
        json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())["summary"]["key"]
        for key in memo_keys(s3_client, bucket)
    }


def test_a_new_generation_of_the_same_genomes_reuses_their_results_and_publishes_only_the_rest(
    generation, runners, services, s3_client, capsys
) -> None:
    queue, bucket = generation["queue"], generation["bucket"]
    first_genomes = [["ok", "0.1"], ["ok", "0.2"], ["ok", "0.3"], ["fail", "0"], ["ok", "0.5"]]
    first = operator(generation, first_genomes, prefix="a", cache=True, min_success_ratio=0.5)
    context = runtime_context(first)
    trigger, resume = deferral(first, context)
    assert resume["reused"] == {} and len(resume["fingerprints"]) == 5
    started = runners(queue, 2)
    event = asyncio.run(first_event(trigger))
    assert (event["status"], event["succeeded"], event["dead_lettered"]) == ("done", 4, 1)
    rows = first.execute_complete(context, event, **resume)
    assert [row["status"] for row in rows] == ["succeeded"] * 3 + ["dead_lettered", "succeeded"]
    # every success is recorded; the dead-lettered genome never is
    assert recorded_keys(s3_client, bucket) == {f"{queue}-a{index}" for index in (0, 1, 2, 4)}

    # the next DAG run: new keys, three genomes carried over, the failed one again, one new
    for runner in started:
        runner.stop()
    second_genomes = [["ok", "0.1"], ["ok", "0.2"], ["ok", "0.3"], ["fail", "0"], ["ok", "0.8"]]
    second = operator(generation, second_genomes, prefix="b", cache=True, min_success_ratio=0.5)
    context = runtime_context(second)
    capsys.readouterr()
    trigger, resume = deferral(second, context)
    assert "3 of 5 reused from the result index, publishing 2" in task_log(capsys)
    # exactly the two without a succeeded result reach the queue
    bodies = wait_for(
        lambda: len(peek(services, generation)) == 2 and peek(services, generation), 30, "2 queued"
    )
    assert sorted(json.loads(body)["experiment"]["key"] for body in bodies) == [f"{queue}-b3", f"{queue}-b4"]
    assert trigger.keys == [f"{queue}-b3", f"{queue}-b4"], "only what was published is waited for"
    runners(queue, 1)
    event = asyncio.run(first_event(trigger))
    assert (event["status"], event["succeeded"], event["dead_lettered"]) == ("done", 1, 1)
    rows = second.execute_complete(context, event, **resume)

    assert [row["key"] for row in rows] == [f"{queue}-b{index}" for index in range(5)]
    assert [row["reused_from"] for row in rows] == [f"{queue}-a0", f"{queue}-a1", f"{queue}-a2", None, None]
    assert [row["status"] for row in rows] == ["succeeded"] * 3 + ["dead_lettered", "succeeded"]
    assert [row["experiment.fitness"] for row in rows[:3]] == [0.1, 0.2, 0.3], "read from the originals"
    assert rows[4]["experiment.fitness"] == 0.8 and all(rows[i]["error"] is None for i in (0, 1, 2, 4))
    for index in range(3):  # nothing ran under the reused keys
        assert scrape_documents(s3_client, bucket, f"{queue}-b{index}") == []
    assert len(scrape_documents(s3_client, bucket, f"{queue}-b3")) == 1, "a failure is never reused"
    assert recorded_keys(s3_client, bucket) == {f"{queue}-{key}" for key in ("a0", "a1", "a2", "a4", "b4")}

    # cache=False keeps resuming by key only: new keys are all published, the index is not read
    uncached = operator(generation, second_genomes[:1], prefix="c")
    capsys.readouterr()
    trigger = publish(uncached, runtime_context(uncached))
    assert "published 1 requests" in task_log(capsys) and trigger.keys == [f"{queue}-c0"]


def test_a_republished_key_waits_for_its_new_attempt_not_an_earlier_success(
    generation, runners, s3_client
) -> None:
    """The same key cleared with a new cache_version (another fingerprint) runs again; the
    earlier run's succeeded attempt under that key neither completes the wait nor is recorded."""
    queue, bucket = generation["queue"], generation["bucket"]
    first = operator(generation, [["ok", "0.4"]], cache=True)
    context = runtime_context(first)
    trigger, resume = deferral(first, context)
    started = runners(queue, 1)
    event = asyncio.run(first_event(trigger))
    first.execute_complete(context, event, **resume)
    for runner in started:
        runner.stop()

    again = operator(generation, [["ok", "0.4"]], cache=True, cache_version="2")
    context = runtime_context(again)
    trigger, resume = deferral(again, context)
    assert resume["reused"] == {} and resume["attempts_before"] == {f"{queue}-g0": 1}
    with pytest.raises(TimeoutError):  # no runner: the earlier success does not count
        asyncio.run(first_event(trigger, timeout=3))
    runners(queue, 1)
    event = asyncio.run(first_event(rebuilt(trigger)))
    (row,) = again.execute_complete(context, event, **resume)
    assert row["status"] == "succeeded" and row["reused_from"] is None
    assert len(scrape_documents(s3_client, bucket, f"{queue}-g0")) == 2, "it ran again"
    assert len(memo_keys(s3_client, bucket)) == 2, "one entry per fingerprint"
