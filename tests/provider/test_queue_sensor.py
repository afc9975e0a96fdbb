"""StudioQueueSensor: deferral, resumption, poke mode against real brokers, and one run through ``airflow dags test``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta

import boto3
import pytest
from airflow.sdk import PokeReturnValue
from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)

from airflow_provider_studio.exceptions import BrokerAuthError, QueueNotFound
from airflow_provider_studio.hooks.queue import summarise_requests
from airflow_provider_studio.sensors.queue import StudioQueueSensor
from airflow_provider_studio.triggers.queue import StudioQueueTrigger
from tests.broker import declare_like_client, drain_bodies, publish_like_client, unique
from tests.provider.connections import rabbitmq_connection, set_connection
from tests.runner.client_requests import queued_request as studio_request

SUCCESS = {
    "status": "success",
    "queue": "rmq_done",
    "depth": 2,
    "resources": summarise_requests([studio_request("a"), studio_request("b")]),
}
FAILURE = {"status": "error", "queue": "rmq_gone", "message": "RabbitMQ queue 'rmq_gone' does not exist"}


def make_sensor(**kwargs) -> StudioQueueSensor:
    kwargs.setdefault("queue_name", "rmq_example")
    return StudioQueueSensor(task_id=unique("wait_"), **kwargs)


@pytest.fixture
def rmq_conn_id(services, monkeypatch) -> str:
    return set_connection(monkeypatch, unique("sensor_rmq_"), rabbitmq_connection(services))


@pytest.fixture
def queue(services) -> str:
    name = unique("rmq_sensor_")
    declare_like_client(services.amqp_url, name)
    return name


# --- construction -------------------------------------------------------------------------------------
def test_defaults():
    sensor = make_sensor()
    assert sensor.deferrable is True
    assert sensor.rabbitmq_conn_id == "studio_rabbitmq_default"
    assert sensor.template_fields == ("queue_name", "min_messages")


def test_poll_interval_sets_the_poke_interval():
    assert make_sensor(poll_interval=7).poke_interval == 7
    assert make_sensor(poke_interval=9).poke_interval == 9


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"min_messages": 0}, "min_messages"),
        ({"peek": -2}, "peek"),
        ({"missing_queue": "skip"}, "missing_queue"),
    ],
)
def test_bad_arguments_are_refused(kwargs, complaint):
    with pytest.raises(ValueError, match=complaint):
        make_sensor(**kwargs)


@pytest.mark.parametrize("deferrable", [True, False])
def test_a_queue_name_without_prefix_fails_before_waiting(deferrable):
    with pytest.raises(AirflowException, match=r"start with 'rmq_' .* or 'sqs_'"):
        make_sensor(queue_name="experiments", deferrable=deferrable).execute(context={})


# --- deferrable path ---------------------------------------------------------------------------------
def test_execute_defers_to_the_queue_trigger():
    sensor = make_sensor(
        queue_name="rmq_gpu_jobs",
        min_messages=4,
        rabbitmq_conn_id="broker",
        aws_conn_id="aws_x",
        peek=3,
        poll_interval=15,
        timeout=3600,
        deferrable=True,
        missing_queue="wait",
    )
    with pytest.raises(TaskDeferred) as raised:
        sensor.execute(context={})
    deferred = raised.value
    assert isinstance(deferred.trigger, StudioQueueTrigger)
    assert deferred.trigger.serialize() == (
        "airflow_provider_studio.triggers.queue.StudioQueueTrigger",
        {
            "queue_name": "rmq_gpu_jobs",
            "min_messages": 4,
            "rabbitmq_conn_id": "broker",
            "aws_conn_id": "aws_x",
            "peek": 3,
            "poll_interval": 15.0,
            "missing_queue": "wait",
        },
    )
    assert deferred.method_name == "execute_complete"
    assert deferred.timeout == timedelta(seconds=3600)


def test_execute_complete_returns_queue_depth_and_resources():
    result = make_sensor(deferrable=True).execute_complete(context={}, event=dict(SUCCESS))
    assert result == {"queue": "rmq_done", "depth": 2, "resources": SUCCESS["resources"]}


def test_execute_complete_raises_the_trigger_message():
    with pytest.raises(AirflowException, match="RabbitMQ queue 'rmq_gone' does not exist"):
        make_sensor(deferrable=True).execute_complete(context={}, event=dict(FAILURE))


@pytest.mark.parametrize("event", [None, {}, {"status": "success", "depth": 1}, {"status": "odd"}])
def test_execute_complete_refuses_an_unreadable_event(event):
    with pytest.raises(AirflowException, match="cannot read"):
        make_sensor(deferrable=True).execute_complete(context={}, event=event)


def test_soft_fail_skips_a_trigger_error_like_any_airflow_sensor():
    # Airflow's own resume path: with soft_fail an error after deferral skips, without it fails.
    with pytest.raises(AirflowSkipException):
        make_sensor(soft_fail=True).resume_execution("execute_complete", {"event": dict(FAILURE)}, context={})
    with pytest.raises(AirflowException, match="does not exist") as raised:
        make_sensor().resume_execution("execute_complete", {"event": dict(FAILURE)}, context={})
    assert not isinstance(raised.value, AirflowSkipException)


def test_soft_fail_skips_a_deferral_timeout():
    timeout = {"error": TriggerFailureReason.TRIGGER_TIMEOUT}
    with pytest.raises(AirflowSkipException):
        make_sensor(soft_fail=True).resume_execution(TRIGGER_FAIL_REPR, timeout, context={})
    with pytest.raises(AirflowSensorTimeout):
        make_sensor().resume_execution(TRIGGER_FAIL_REPR, timeout, context={})


# --- poke path against real brokers ----------------------------------------------------------------
def test_poke_waits_then_returns_depth_and_resources(services, rmq_conn_id, queue):
    sensor = make_sensor(queue_name=queue, min_messages=2, rabbitmq_conn_id=rmq_conn_id, deferrable=False)
    assert sensor.poke(context={}) is False

    bodies = [studio_request("p1", gpus=1, cpus=4), studio_request("p2")]
    publish_like_client(services.amqp_url, queue, bodies)
    answer = sensor.poke(context={})
    assert isinstance(answer, PokeReturnValue) and answer.is_done
    expected = {"queue": queue, "depth": 2, "resources": summarise_requests(bodies)}
    assert answer.xcom_value == expected
    assert sensor.execute(context={}) == expected  # the same XCom as the deferrable path
    assert drain_bodies(services.amqp_url, queue) == bodies


def test_poke_timeout_with_soft_fail_skips(rmq_conn_id, queue):
    sensor = make_sensor(
        queue_name=queue, rabbitmq_conn_id=rmq_conn_id, deferrable=False, timeout=0, soft_fail=True
    )
    with pytest.raises(AirflowSkipException):
        sensor.execute(context={})


def test_poke_missing_queue_fails_or_waits(rmq_conn_id):
    failing = make_sensor(queue_name="rmq_not_there", rabbitmq_conn_id=rmq_conn_id, deferrable=False)
    with pytest.raises(QueueNotFound, match=r"'rmq_not_there' does not exist on vhost '/' at 127\.0\.0\.1:"):
        failing.execute(context={})
    waiting = make_sensor(
        queue_name="rmq_not_there", rabbitmq_conn_id=rmq_conn_id, deferrable=False, missing_queue="wait"
    )
    assert waiting.poke(context={}) is False


def test_poke_with_bad_credentials_says_so(services, monkeypatch, queue):
    conn_id = set_connection(
        monkeypatch, unique("sensor_badpw_"), rabbitmq_connection(services, password="x1y2z3")
    )
    with pytest.raises(BrokerAuthError, match="refused the login"):
        make_sensor(queue_name=queue, rabbitmq_conn_id=conn_id, deferrable=False).execute(context={})


def test_poke_on_sqs(services, monkeypatch):
    definition = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": services.sqs_endpoint, "region_name": services.region},
    }
    conn_id = set_connection(monkeypatch, unique("sensor_aws_"), definition)
    sqs = boto3.client(
        "sqs",
        endpoint_url=services.sqs_endpoint,
        region_name=services.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    queue = unique("sqs_sensor_")
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    sensor = make_sensor(queue_name=queue, aws_conn_id=conn_id, deferrable=False)
    assert sensor.poke(context={}) is False
    body = studio_request("sqs_poke", cpus=3)
    sqs.send_message(QueueUrl=url, MessageBody=body.decode())
    assert sensor.execute(context={}) == {"queue": queue, "depth": 1, "resources": summarise_requests([body])}

    with pytest.raises(QueueNotFound, match="SQS queue 'sqs_absent' does not exist"):
        make_sensor(queue_name="sqs_absent", aws_conn_id=conn_id, deferrable=False).execute(context={})


# --- end to end through Airflow ------------------------------------------------------------------------
DAG_FILE = """
from __future__ import annotations

import pendulum

from airflow.sdk import DAG
from airflow_provider_studio.sensors.queue import StudioQueueSensor

with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    StudioQueueSensor(
        task_id="wait_for_request",
        queue_name={queue!r},
        rabbitmq_conn_id="studio_e2e_rmq",
        deferrable=True,
        poll_interval=0.5,
        timeout=300,
    )
"""


def test_airflow_dags_test_defers_and_fires_when_a_request_arrives(airflow_db, services, tmp_path):
    queue = unique("rmq_e2e_")
    dag_id = unique("studio_queue_e2e_")
    declare_like_client(services.amqp_url, queue)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "studio_queue_e2e.py").write_text(textwrap.dedent(DAG_FILE.format(dag_id=dag_id, queue=queue)))
    env = {
        **os.environ,
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW_CONN_STUDIO_E2E_RMQ": json.dumps(rabbitmq_connection(services)),
        "PYTHONUNBUFFERED": "1",  # lines must arrive while the trigger waits, not at exit
    }
    body = studio_request("e2e_job", gpus=1, cpus=2)
    process = subprocess.Popen(
        [sys.executable, "-m", "airflow", "dags", "test", dag_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(300, process.kill)  # a guard against a hang, not a speed check
    watchdog.start()
    lines: list[str] = []
    published_after = None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if published_after is None and f"in queue '{queue}'" in line and "Waiting for" in line:
                publish_like_client(services.amqp_url, queue, [body])
                published_after = len(lines)
        returncode = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    log = "".join(lines)

    assert returncode == 0, log[-5000:]
    assert published_after is not None, "the trigger never started waiting:\n" + log[-5000:]
    deferred_at = next(i for i, line in enumerate(lines) if "Pausing task as DEFERRED" in line)
    fired_at = next(i for i, line in enumerate(lines) if f"Queue '{queue}' holds 1 request(s)" in line)
    assert deferred_at < published_after <= fired_at
    assert "state=success" in log

    with sqlite3.connect(airflow_db / "airflow.db") as db:
        (value,) = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = 'wait_for_request' AND key = 'return_value'",
            (dag_id,),
        ).fetchone()
    xcom = json.loads(value)
    xcom = json.loads(xcom) if isinstance(xcom, str) else xcom
    assert xcom == {"queue": queue, "depth": 1, "resources": summarise_requests([body])}
    assert drain_bodies(services.amqp_url, queue) == [body]  # waiting consumed nothing
