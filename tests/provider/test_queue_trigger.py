"""StudioQueueTrigger against a real RabbitMQ and moto's SQS server.

Messages are published from a background thread only after the trigger has looked at the queue
at least once and found too few, so each success really is the trigger noticing new requests.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from airflow.sdk.module_loading import import_string
from studio_runner.units import parse_size

from airflow_provider_studio.hooks import queue as queue_module
from airflow_provider_studio.hooks.queue import summarise_requests
from airflow_provider_studio.hooks.rabbitmq import StudioRabbitMQHook
from airflow_provider_studio.triggers.queue import StudioQueueTrigger
from tests.broker import declare_like_client, drain_bodies, publish_like_client, unique
from tests.provider.connections import closed_port, rabbitmq_connection, set_connection
from tests.runner.client_requests import queued_request as studio_request

EVENT_TIMEOUT = 60.0
"""Only a guard against a hung test; nothing here measures speed."""


# --- helpers -----------------------------------------------------------------------------------------
async def first_event(trigger: StudioQueueTrigger) -> dict[str, Any]:
    events = trigger.run()
    try:
        event = await asyncio.wait_for(anext(events), EVENT_TIMEOUT)
    finally:
        await events.aclose()
    return event.payload


def count_looks(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> asyncio.Event:
    """Wrap the real async queue look so the test knows when the trigger has looked at least once."""
    looked = asyncio.Event()
    real = getattr(owner, name)

    async def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            return await real(*args, **kwargs)
        finally:
            looked.set()

    monkeypatch.setattr(owner, name, spy)
    return looked


async def fire_after_first_look(
    trigger: StudioQueueTrigger, looked: asyncio.Event, publish: Callable[[], None]
) -> dict[str, Any]:
    waiting = asyncio.create_task(first_event(trigger))
    await asyncio.wait_for(looked.wait(), EVENT_TIMEOUT)
    assert not waiting.done(), f"trigger fired before any message was published: {waiting.result()}"
    publisher = threading.Thread(target=publish, name="publisher")
    publisher.start()
    try:
        return await waiting
    finally:
        publisher.join()


@pytest.fixture
def rmq_conn_id(services, monkeypatch) -> str:
    return set_connection(monkeypatch, unique("trig_rmq_"), rabbitmq_connection(services))


@pytest.fixture
def aws_conn_id(services, monkeypatch) -> str:
    definition = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": services.sqs_endpoint, "region_name": services.region},
    }
    return set_connection(monkeypatch, unique("trig_aws_"), definition)


@pytest.fixture
def sqs(services):
    return boto3.client(
        "sqs",
        endpoint_url=services.sqs_endpoint,
        region_name=services.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# --- serialisation ------------------------------------------------------------------------------------
def test_serialize_round_trips_through_the_classpath():
    trigger = StudioQueueTrigger(
        "rmq_roundtrip",
        3,
        rabbitmq_conn_id="my_rmq",
        aws_conn_id=None,
        peek=4,
        poll_interval=2.5,
        missing_queue="wait",
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_studio.triggers.queue.StudioQueueTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs  # primitives only: the trigger table stores them
    rebuilt = import_string(classpath)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {
        "queue_name": "rmq_roundtrip",
        "min_messages": 3,
        "rabbitmq_conn_id": "my_rmq",
        "aws_conn_id": None,
        "peek": 4,
        "poll_interval": 2.5,
        "missing_queue": "wait",
    }


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"min_messages": 0}, "min_messages"),
        ({"peek": -1}, "peek"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"missing_queue": "ignore"}, "missing_queue"),
    ],
)
def test_bad_arguments_are_refused(kwargs, complaint):
    with pytest.raises(ValueError, match=complaint):
        StudioQueueTrigger("rmq_x", **kwargs)


# --- the resources summary ------------------------------------------------------------------------------
def test_summary_adds_up_requests_and_counts_the_rest():
    gpu = studio_request("gpu_job", gpus=1, gpuCount=2, cpus=4, ram="16g", hdd="10g")
    cpu = studio_request("cpu_job")
    envelope = json.dumps({"message": {"payload": "c2VhbGVk"}}).encode()
    summary = summarise_requests([gpu, b"not json at all", cpu, envelope])
    assert summary == {
        "peeked": 4,
        "requests": 2,
        "undecodable": 2,
        "cpus": 5,
        "gpus": 1,
        "cards": 2,
        "ram_bytes": parse_size("16g") + parse_size("2g"),
        "hdd_bytes": parse_size("10g") + parse_size("3g"),
    }


def test_summary_of_nothing_is_zeros():
    assert set(summarise_requests([]).values()) == {0}


# --- RabbitMQ -----------------------------------------------------------------------------------------
async def test_rabbitmq_fires_once_enough_requests_arrive(services, monkeypatch, rmq_conn_id):
    queue = unique("rmq_trig_")
    first = [studio_request("early", cpus=2)]
    later = [studio_request("late", gpus=1, cpus=8, ram="32g"), b"\x00garbage"]
    publish_like_client(services.amqp_url, queue, first)
    looked = count_looks(monkeypatch, StudioRabbitMQHook, "aqueue_state")
    trigger = StudioQueueTrigger(queue, 3, rabbitmq_conn_id=rmq_conn_id, poll_interval=0.2)

    payload = await fire_after_first_look(
        trigger, looked, lambda: publish_like_client(services.amqp_url, queue, later)
    )

    assert payload == {
        "status": "success",
        "queue": queue,
        "depth": 3,
        "resources": summarise_requests(first + later),
    }
    assert payload["resources"]["undecodable"] == 1 and payload["resources"]["cards"] == 1
    assert drain_bodies(services.amqp_url, queue) == first + later  # the trigger consumed nothing


async def test_rabbitmq_peek_zero_skips_the_summary(services, rmq_conn_id):
    queue = unique("rmq_trig_")
    publish_like_client(services.amqp_url, queue, [studio_request("only")])
    payload = await first_event(
        StudioQueueTrigger(queue, rabbitmq_conn_id=rmq_conn_id, peek=0, poll_interval=0.2)
    )
    assert payload["status"] == "success" and payload["depth"] == 1
    assert payload["resources"]["peeked"] == 0


async def test_rabbitmq_missing_queue_is_an_error_event(rmq_conn_id):
    payload = await first_event(StudioQueueTrigger("rmq_never_declared", rabbitmq_conn_id=rmq_conn_id))
    assert payload["status"] == "error"
    assert "RabbitMQ queue 'rmq_never_declared' does not exist on vhost '/'" in payload["message"]
    assert "start the StudioML client" in payload["message"]


async def test_rabbitmq_missing_queue_can_be_waited_for(services, monkeypatch, rmq_conn_id):
    queue = unique("rmq_later_")
    looked = count_looks(monkeypatch, StudioRabbitMQHook, "aqueue_state")
    trigger = StudioQueueTrigger(queue, rabbitmq_conn_id=rmq_conn_id, poll_interval=0.2, missing_queue="wait")

    body = studio_request("first")
    payload = await fire_after_first_look(
        trigger, looked, lambda: publish_like_client(services.amqp_url, queue, [body])
    )

    assert payload["status"] == "success" and payload["depth"] == 1


async def test_rabbitmq_bad_credentials_are_an_error_event(services, monkeypatch):
    queue = unique("rmq_trig_")
    declare_like_client(services.amqp_url, queue)
    conn_id = set_connection(
        monkeypatch, unique("trig_badpw_"), rabbitmq_connection(services, password="nope")
    )
    payload = await first_event(StudioQueueTrigger(queue, rabbitmq_conn_id=conn_id))
    assert payload["status"] == "error"
    assert "refused the login of user 'guest'" in payload["message"]
    assert conn_id in payload["message"]


async def test_rabbitmq_unreachable_broker_is_an_error_event(services, monkeypatch):
    conn_id = set_connection(
        monkeypatch, unique("trig_down_"), rabbitmq_connection(services, port=closed_port())
    )
    payload = await first_event(StudioQueueTrigger("rmq_anything", rabbitmq_conn_id=conn_id))
    assert payload["status"] == "error" and "cannot reach RabbitMQ" in payload["message"]


async def test_an_undefined_connection_is_an_error_event():
    payload = await first_event(StudioQueueTrigger("rmq_anything", rabbitmq_conn_id="no_such_connection"))
    assert payload["status"] == "error" and "no_such_connection" in payload["message"]


async def test_a_queue_name_without_a_known_prefix_is_an_error_event():
    payload = await first_event(StudioQueueTrigger("local_queue"))
    assert payload["status"] == "error"
    assert "'rmq_'" in payload["message"] and "'sqs_'" in payload["message"]


# --- SQS (moto server, reached through the aws connection's endpoint_url) ---------------------------------
async def test_sqs_fires_once_enough_requests_arrive(monkeypatch, aws_conn_id, sqs):
    queue = unique("sqs_trig_")
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    bodies = [studio_request("sqs_a", gpus=1, gpuCount=1, cpus=2), studio_request("sqs_b")]
    looked = count_looks(monkeypatch, queue_module, "sqs_queue_state")
    trigger = StudioQueueTrigger(queue, 2, aws_conn_id=aws_conn_id, poll_interval=0.2)

    def publish() -> None:
        for body in bodies:
            sqs.send_message(QueueUrl=url, MessageBody=body.decode())

    payload = await fire_after_first_look(trigger, looked, publish)

    assert payload["status"] == "success" and payload["queue"] == queue and payload["depth"] == 2
    assert payload["resources"] == summarise_requests(bodies)
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "2"  # peeking left them visible


async def test_sqs_missing_queue_is_an_error_event(aws_conn_id):
    payload = await first_event(StudioQueueTrigger("sqs_never_created", aws_conn_id=aws_conn_id))
    assert payload["status"] == "error"
    assert "SQS queue 'sqs_never_created' does not exist" in payload["message"]
    assert "start the StudioML client" in payload["message"]


async def test_sqs_missing_queue_can_be_waited_for(monkeypatch, aws_conn_id, sqs):
    queue = unique("sqs_later_")
    looked = count_looks(monkeypatch, queue_module, "sqs_queue_state")
    trigger = StudioQueueTrigger(queue, aws_conn_id=aws_conn_id, poll_interval=0.2, missing_queue="wait")

    def create_and_publish() -> None:
        url = sqs.create_queue(QueueName=queue)["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody=studio_request("sqs_first").decode())

    payload = await fire_after_first_look(trigger, looked, create_and_publish)
    assert payload["status"] == "success" and payload["depth"] == 1
    assert payload["resources"]["requests"] == 1
