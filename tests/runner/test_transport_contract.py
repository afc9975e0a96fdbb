"""The contract every queue transport keeps with the service, run for RabbitMQ, SQS and directories.

Each test runs once per transport against the real thing (the session's RabbitMQ and moto SQS
servers, a real directory): a held message is invisible to others, ``requeue`` gives it back
uncounted, ``retry`` counts an attempt and says why, ``reject`` dead-letters it to
``<queue>_rejected`` with the reason, discovery finds work, response and dead-letter queues, and
a request published as StudioML clients publish it is run to completion by ``studio-runner
serve`` and leaves its queue. What only one transport does (RabbitMQ's declarations and
heartbeats, SQS credential sets and visibility, directory locks) stays in test_queues_<kind>.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from studio_runner.queues import localdir
from studio_runner.queues.base import Transport
from studio_runner.queues.localdir import LocalDirTransport
from studio_runner.queues.rabbitmq import (
    ATTEMPTS_HEADER,
    LAST_FAILURE_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REJECTED_QUEUE_HEADER,
    RabbitMQTransport,
)
from studio_runner.queues.sqs import (
    ATTEMPTS_ATTRIBUTE,
    LAST_FAILURE_ATTRIBUTE,
    REASON_ATTRIBUTE,
    REJECTED_AT_ATTRIBUTE,
    REJECTED_QUEUE_ATTRIBUTE,
    SqsTransport,
)
from studio_runner.service import QueueMatcher

from devtools.services import Endpoints
from tests.broker import declare_like_client, publish_like_client, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar
from tests.runner.results import final_document, tar_members
from tests.runner.workloads import TRAIN, workspace
from tests.sqs_queues import credential_set, sqs_client

RESULTS_TIMEOUT = 240
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "moto", "AWS_SECRET_ACCESS_KEY": "moto"}


@dataclass(frozen=True)
class RejectionFields:
    """Where a transport records why and when a message was dead-lettered, and its attempts."""

    reason: str
    queue: str
    rejected_at: str
    attempts: str
    attempts_value: Callable[[int], Any]
    """How the record writes a count: RabbitMQ headers keep the int, SQS attributes are text."""


@dataclass
class Broker:
    """One transport and the means to feed it as StudioML clients do."""

    kind: str
    transport: Transport
    new_queue: Callable[[], str]
    publish: Callable[[str, bytes], None]
    create: Callable[[str], None]
    """Make an empty queue the way its clients do (RabbitMQ: declare and bind; SQS: create; a folder)."""
    drained: Callable[[str], bool]
    """Nothing left in the queue, held or waiting."""
    rejection: RejectionFields
    last_failure: str | None
    """The header that tells a retried message why its last attempt failed (None: not kept)."""
    requeue_marks_redelivered: bool
    serve_options: tuple[str, ...] = ()
    serve_env: dict[str, str] | None = None


def _rabbitmq(services: Endpoints, tmp_path: Path) -> Broker:
    return Broker(
        kind="rmq",
        transport=RabbitMQTransport(services.amqp_url, services.amqp_management_url),
        new_queue=lambda: unique_queue("rmq_t"),
        publish=lambda queue, body: publish_like_client(services.amqp_url, queue, [body]),
        create=lambda queue: declare_like_client(services.amqp_url, queue),
        drained=lambda queue: queue_depth(services.amqp_management_url, queue) == 0,
        rejection=RejectionFields(
            REASON_HEADER, REJECTED_QUEUE_HEADER, REJECTED_AT_HEADER, ATTEMPTS_HEADER, int
        ),
        last_failure=LAST_FAILURE_HEADER,
        requeue_marks_redelivered=True,
    )


def _sqs(services: Endpoints, tmp_path: Path) -> Broker:
    certs = tmp_path / "certs"
    credential_set(certs, "main", services.region)
    client = sqs_client(services)

    def new_queue() -> str:
        name = unique_queue("sqs_t")
        client.create_queue(QueueName=name)
        return name

    def publish(queue: str, body: bytes) -> None:
        client.send_message(
            QueueUrl=client.get_queue_url(QueueName=queue)["QueueUrl"], MessageBody=body.decode()
        )

    def drained(queue: str) -> bool:
        url = client.get_queue_url(QueueName=queue)["QueueUrl"]
        attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return (
            attributes["ApproximateNumberOfMessages"]
            == attributes["ApproximateNumberOfMessagesNotVisible"]
            == "0"
        )

    return Broker(
        kind="sqs",
        transport=SqsTransport(certs_dir=certs, endpoint_url=services.sqs_endpoint, wait_seconds=0),
        new_queue=new_queue,
        publish=publish,
        create=lambda queue: client.create_queue(QueueName=queue) and None,
        drained=drained,
        rejection=RejectionFields(
            REASON_ATTRIBUTE, REJECTED_QUEUE_ATTRIBUTE, REJECTED_AT_ATTRIBUTE, ATTEMPTS_ATTRIBUTE, str
        ),
        last_failure=LAST_FAILURE_ATTRIBUTE,
        requeue_marks_redelivered=True,
        serve_options=("--sqs-endpoint", services.sqs_endpoint, "--sqs-region", services.region),
        serve_env=MOTO_KEYS,
    )


def _local(services: Endpoints, tmp_path: Path) -> Broker:
    root = tmp_path / "queues"

    def publish(queue: str, body: bytes) -> None:
        localdir.publish(root, queue, body)

    def create(queue: str) -> None:
        (root / queue).mkdir(parents=True, exist_ok=True)

    def drained(queue: str) -> bool:
        return not [path for path in (root / queue).rglob("*") if path.is_file()]

    return Broker(
        kind="local",
        transport=LocalDirTransport(root),
        new_queue=lambda: f"local_{uuid.uuid4().hex[:10]}",
        publish=publish,
        create=create,
        drained=drained,
        rejection=RejectionFields("reason", "queue", "rejected_at", "attempts", int),
        last_failure=None,
        requeue_marks_redelivered=False,  # a file has no delivery history
        serve_options=("--queue-root", str(root)),
    )


@pytest.fixture(params=[_rabbitmq, _sqs, _local], ids=["rmq", "sqs", "local"])
def broker(request: pytest.FixtureRequest, services: Endpoints, tmp_path: Path) -> Broker:
    return request.param(services, tmp_path)


# --- holding and settling -----------------------------------------------------------------------
def test_a_held_message_is_invisible_and_ack_removes_it(broker: Broker) -> None:
    queue = broker.new_queue()
    broker.publish(queue, b'{"experiment": {}}')
    delivery = broker.transport.get(queue)
    assert delivery is not None
    assert (delivery.queue, delivery.body, delivery.attempts, delivery.redelivered) == (
        queue,
        b'{"experiment": {}}',
        1,
        False,
    )
    assert broker.transport.get(queue) is None  # held by us
    delivery.ack()
    assert broker.transport.get(queue) is None
    assert broker.transport.get(broker.new_queue()) is None  # an empty queue
    assert broker.transport.get(f"{queue}_never_made") is None  # a queue that does not exist is simply empty


def test_requeue_gives_it_back_uncounted(broker: Broker) -> None:
    queue = broker.new_queue()
    broker.publish(queue, b"request")
    broker.transport.get(queue).requeue()
    again = broker.transport.get(queue)
    assert (again.body, again.attempts, again.redelivered) == (
        b"request",
        1,
        broker.requeue_marks_redelivered,
    )
    again.ack()
    assert broker.transport.get(queue) is None


def test_retry_counts_attempts_and_reject_dead_letters_with_the_reason(broker: Broker) -> None:
    queue = broker.new_queue()
    broker.publish(queue, b"request")
    broker.transport.get(queue).retry("failed: exit code 1")
    retried = broker.transport.get(queue)
    assert (retried.body, retried.attempts, retried.redelivered) == (b"request", 2, False)
    if broker.last_failure is not None:
        assert retried.headers[broker.last_failure] == "failed: exit code 1"
    retried.retry("failed: exit code 1")
    third = broker.transport.get(queue)
    assert (third.body, third.attempts) == (b"request", 3)

    third.reject("failed after 3 attempts: failed: exit code 1")
    assert broker.transport.get(queue) is None
    dead = broker.transport.get(f"{queue}_rejected")
    fields = broker.rejection
    assert dead.body == b"request"
    assert dead.headers[fields.reason] == "failed after 3 attempts: failed: exit code 1"
    assert dead.headers[fields.queue] == queue
    assert dead.headers[fields.rejected_at]
    assert dead.headers[fields.attempts] == fields.attempts_value(3)
    dead.ack()
    assert broker.transport.get(f"{queue}_rejected") is None


def test_a_settled_delivery_cannot_be_settled_again(broker: Broker) -> None:
    queue = broker.new_queue()
    broker.publish(queue, b"body")
    delivery = broker.transport.get(queue)
    delivery.ack()
    with pytest.raises(RuntimeError, match="already settled"):
        delivery.requeue()


def test_closing_an_unsettled_delivery_gives_it_back(broker: Broker) -> None:
    queue = broker.new_queue()
    broker.publish(queue, b"body")
    with broker.transport.get(queue):
        pass
    delivery = wait_for(lambda: broker.transport.get(queue), 15, "the message to come back")
    assert (delivery.body, delivery.attempts) == (b"body", 1)
    delivery.ack()


# --- discovery ----------------------------------------------------------------------------------
def test_discovery_finds_work_response_and_dead_letter_queues_and_the_matcher_picks_work(
    broker: Broker,
) -> None:
    work, other = broker.new_queue(), broker.new_queue()
    broker.publish(work, b"{}")
    broker.publish(other, b"{}")
    response = f"{work}_response"
    broker.create(response)
    broker.transport.get(other).reject("makes the dead-letter queue")

    names = set(broker.transport.discover())
    assert {work, response, other, f"{other}_rejected"} <= names
    matcher = QueueMatcher()
    assert {work, other} <= {name for name in names if matcher(name)}
    assert {response, f"{other}_rejected"}.isdisjoint(name for name in names if matcher(name))
    assert work not in {name for name in names if QueueMatcher(mismatch=work)(name)}
    assert broker.transport.exists(work) and not broker.transport.exists(f"{work}_never_made")


# --- end to end ---------------------------------------------------------------------------------
def test_a_client_request_runs_to_completion_and_leaves_its_queue(
    broker: Broker, serve_runner, studio_client, s3_client, services: Endpoints, bucket: str, tmp_path: Path
) -> None:
    """RabbitMQ and SQS requests come from the real ``studio run`` (its SQS queue honours
    ``AWS_ENDPOINT_URL_SQS``); directory queues, which the client lacks, get one shaped like its."""
    serve_runner(*broker.serve_options, env=broker.serve_env)
    queue = f"{broker.kind}_e2e_{uuid.uuid4().hex[:8]}"
    key = f"core_{queue}"
    if broker.kind == "local":
        store = bucket
        blob = workspace_tar({"train.py": TRAIN.encode()})
        request = client_request(
            services, bucket, key, upload_blob(s3_client, bucket, blob), args=("arg1", "--flag=2")
        )
        broker.publish(queue, json.dumps(request).encode())
    else:
        store = studio_client.bucket
        studio_client.run(workspace(tmp_path, TRAIN), queue, "train.py", "arg1", "--flag=2", key=key)

    document = wait_for(
        lambda: final_document(s3_client, store, key), RESULTS_TIMEOUT, f"the scrape document of {key}"
    )
    assert document["studioml"]["status"] == "succeeded"
    assert document["experiment"] == {"epoch": 2, "fitness": 0.75}
    output = tar_members(s3_client, store, f"experiments/{key}/output.tar")["./output"].decode()
    assert "arguments: ['arg1', '--flag=2']" in output
    assert tar_members(s3_client, store, f"experiments/{key}/modeldir.tar") == {"./weights.txt": b"trained"}
    assert wait_for(lambda: broker.drained(queue), 30, f"the message to leave {queue}")
