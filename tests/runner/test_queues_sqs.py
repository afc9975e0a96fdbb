"""SQS transport against a real moto server, with credential sets laid out as ``--sqs-certs`` expects.

What every transport does (hold, settle, retry, dead-letter, discover) is test_transport_contract.py;
here is what only SQS does: the sqs_ listing, credential sets, visibility timeouts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from studio_runner.queues.sqs import (
    SqsTransport,
)

from devtools.services import Endpoints
from tests.broker import unique_queue
from tests.sqs_queues import credential_set, sqs_client


@pytest.fixture
def certs(tmp_path: Path, services: Endpoints) -> Path:
    folder = tmp_path / "certs"
    credential_set(folder, "main", services.region)
    return folder


@pytest.fixture
def transport(services: Endpoints, certs: Path) -> SqsTransport:
    return SqsTransport(certs_dir=certs, endpoint_url=services.sqs_endpoint, wait_seconds=0)


@pytest.fixture
def queue(services: Endpoints) -> str:
    name = unique_queue("sqs_t")
    sqs_client(services).create_queue(QueueName=name)
    return name


def send(services: Endpoints, queue: str, body: str, region: str | None = None) -> None:
    client = sqs_client(services, region)
    client.send_message(QueueUrl=client.get_queue_url(QueueName=queue)["QueueUrl"], MessageBody=body)


def test_discovery_lists_only_sqs_prefixed_queues(
    services: Endpoints, transport: SqsTransport, queue: str
) -> None:
    sqs_client(services).create_queue(QueueName=f"other_{queue}")
    names = set(transport.discover())
    assert queue in names
    assert f"other_{queue}" not in names  # listed with the sqs_ prefix only


def test_credential_sets_are_rescanned_and_each_account_is_served(
    services: Endpoints, transport: SqsTransport, certs: Path
) -> None:
    name = unique_queue("sqs_t")
    sqs_client(services).create_queue(QueueName=name)
    sqs_client(services, "eu-west-1").create_queue(QueueName=name)
    send(services, name, "from us-east-1")
    send(services, name, "from eu-west-1", region="eu-west-1")

    assert name in transport.discover()
    first = transport.get(name)
    assert first.body == b"from us-east-1"
    first.ack()
    assert transport.get(name) is None  # the second set is not known yet

    credential_set(certs, "europe", "eu-west-1")
    assert name in transport.discover()
    bodies = set()
    for _ in range(2):
        if (delivery := transport.get(name)) is not None:
            bodies.add(delivery.body)
            delivery.ack()
    assert bodies == {b"from eu-west-1"}


def test_default_credential_chain(services: Endpoints, queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    transport = SqsTransport(endpoint_url=services.sqs_endpoint, region=services.region, wait_seconds=0)
    assert queue in transport.discover()


def _receive_while(services: Endpoints, queue: str, until: threading.Event) -> list[str]:
    """What another runner would receive from ``queue`` while ``until`` is not set."""
    client = sqs_client(services)
    url = client.get_queue_url(QueueName=queue)["QueueUrl"]
    seen = []
    while not until.is_set():
        answer = client.receive_message(QueueUrl=url, VisibilityTimeout=0, WaitTimeSeconds=0)
        seen += [m["Body"] for m in answer.get("Messages", [])]
        time.sleep(0.2)
    return seen


def test_holding_extends_visibility_past_the_timeout(services: Endpoints, certs: Path, queue: str) -> None:
    transport = SqsTransport(
        certs_dir=certs, endpoint_url=services.sqs_endpoint, visibility_timeout=2, wait_seconds=0
    )
    send(services, queue, "long run")
    delivery = transport.get(queue)
    done = threading.Event()
    threading.Timer(5.0, done.set).start()  # 2.5 visibility timeouts
    seen: list[str] = []
    watcher = threading.Thread(target=lambda: seen.extend(_receive_while(services, queue, done)))
    watcher.start()
    delivery.hold_until(done)
    watcher.join()
    assert seen == []
    delivery.ack()
    assert transport.get(queue) is None


def test_holding_stops_extending_at_the_hold_limit(services: Endpoints, certs: Path, queue: str) -> None:
    transport = SqsTransport(
        certs_dir=certs,
        endpoint_url=services.sqs_endpoint,
        visibility_timeout=1,
        wait_seconds=0,
        max_hold_seconds=0.5,
    )
    send(services, queue, "too long")
    delivery = transport.get(queue)
    done = threading.Event()
    holder = threading.Thread(target=delivery.hold_until, args=(done,))
    holder.start()
    client = sqs_client(services)
    url = client.get_queue_url(QueueName=queue)["QueueUrl"]
    deadline = time.monotonic() + 10
    bodies: list[str] = []
    while not bodies and time.monotonic() < deadline:
        bodies = [
            m["Body"] for m in client.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", [])
        ]
    done.set()
    holder.join()
    assert bodies == ["too long"]
