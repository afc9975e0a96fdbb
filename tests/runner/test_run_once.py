"""A request runs once, however long it runs (issue 9 item 2).

The broker's claim on a message can end while the run goes on: RabbitMQ closes the channel
after ``consumer_timeout``, SQS shows the message again at its visibility ceiling. The second
runner that takes the copy finds the first attempt's lease alive, gives the copy back until
that attempt ends, and then acks it as already done. These tests make the claim end after a
few seconds (a private RabbitMQ with ``consumer_timeout`` 3 s, an SQS ceiling of 4 s), run a
job several times longer with two runners, and count the workload's starts.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from studio_runner.lease import LeaseKeeper, LeaseRecord, read_lease
from studio_runner.queues.rabbitmq import (
    CONSUMER_TIMEOUT_ARGUMENT,
    consumer_arguments,
    consumer_timeout_ms,
    server_version,
)
from studio_runner.request import decode_request
from studio_runner.storage import Storage

from devtools.services import Endpoints, Ports, ServiceSet
from tests.broker import dead_letters, management, publish_like_client, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar

pytestmark = pytest.mark.timeout(300)

CONSUMER_TIMEOUT_MS = 3000
JOB_SECONDS = 15  # five consumer timeouts
SCRAPE_PREFIX = "metadata/scrape-host-"

WORKLOAD = """\
import json, os, sys, time, uuid
key, starts, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
token = uuid.uuid4().hex
open(os.path.join(starts, token), "w").close()  # one file per start of the workload
print(f"start {key} token {token}", flush=True)
time.sleep(seconds)
os.makedirs("../modeldir", exist_ok=True)
with open("../modeldir/weights.json", "w") as out:
    json.dump({"key": key, "token": token}, out)
print(f"done {key} token {token}", flush=True)
"""


# --- the consumer timeout: derivation, and which brokers get it ----------------------------------
def test_the_consumer_timeout_covers_the_run_its_grace_and_its_upload() -> None:
    assert consumer_timeout_ms(3600, 30, 60) == 3_690_000
    assert consumer_timeout_ms(0.0004, 0, 0) == 1  # rounded up, never zero
    with pytest.raises(ValueError, match="negative"):
        consumer_timeout_ms(-1, 30, 60)


def test_only_rabbitmq_3_12_and_later_get_the_argument() -> None:
    assert server_version({"version": b"3.10.8"}) == (3, 10, 8)
    assert server_version({"version": "4.0.2-rc.1"}) == (4, 0, 2)
    assert server_version({}) is None and server_version({"version": b"unknown"}) is None
    assert consumer_arguments((3, 10, 8), 5000) is None
    assert consumer_arguments((3, 11, 99), 5000) is None
    assert consumer_arguments((3, 12, 0), 5000) == {CONSUMER_TIMEOUT_ARGUMENT: 5000}
    assert consumer_arguments((4, 1), 5000) == {CONSUMER_TIMEOUT_ARGUMENT: 5000}
    assert consumer_arguments(None, 5000) is None  # unknown broker: basic.get, as before
    assert consumer_arguments((4, 1), None) is None


def test_the_local_broker_is_3_10_and_gets_no_argument(services: Endpoints) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(services.amqp_url))
    try:
        version = server_version(connection._impl.server_properties)
    finally:
        connection.close()
    assert version is not None and version[:2] == (3, 10)
    assert consumer_arguments(version, consumer_timeout_ms(96 * 3600, 30, 60)) is None


def test_the_consumer_path_takes_one_message_at_a_time(services: Endpoints, monkeypatch) -> None:
    """The 3.12+ path, run on the local 3.10 broker (which ignores the argument): one message per
    take, and the consumer ends before the ack, so the next message is not pushed, then requeued
    and flagged redelivered when the connection closes."""
    import studio_runner.queues.rabbitmq as rabbitmq

    queue = unique_queue("rmq_consume")
    publish_like_client(services.amqp_url, queue, [b"one", b"two"])
    monkeypatch.setattr(rabbitmq, "server_version", lambda properties: (3, 12, 0))
    transport = rabbitmq.RabbitMQTransport(
        services.amqp_url, services.amqp_management_url, consumer_timeout_ms=600_000
    )
    taken = []
    for _ in range(2):
        delivery = transport.get(queue)
        assert delivery is not None
        taken.append((delivery.body, delivery.redelivered))
        delivery.ack()
    assert taken == [(b"one", False), (b"two", False)]
    assert transport.get(queue) is None
    assert queue_depth(services.amqp_management_url, queue) == 0


# --- the lease ---------------------------------------------------------------------------------------
def lease(**changes: Any) -> LeaseRecord:
    fields: dict[str, Any] = {
        "key": "k",
        "holder": "another-host",
        "accession": "another-host-1",
        "pid": 1,
        "pid_namespace": "pid:[1]",
        "process_started": 1,
        "renewed": time.time(),
        "period": 30.0,
    }
    return LeaseRecord(**{**fields, **changes})


def test_a_lease_is_alive_while_renewed_and_not_ended() -> None:
    assert lease().alive()
    assert not lease(ended="succeeded").alive()
    assert not lease(renewed=time.time() - 121).alive()  # four periods without renewal: the holder died
    this_host = {"holder": socket.gethostname(), "pid_namespace": os.readlink("/proc/self/ns/pid")}
    assert lease(**this_host, pid=os.getpid(), process_started=_started(os.getpid())).alive()
    assert not lease(**this_host, pid=os.getpid(), process_started=1).alive()  # the PID was reused


def _started(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def test_the_lease_is_written_renewed_and_ended_in_storage(
    services: Endpoints, s3_client, bucket: str
) -> None:
    request = decode_request(client_request(services, bucket, "lease-key", "blobstore/none.tar"))
    storage = Storage()
    assert read_lease(request, storage) is None
    with LeaseKeeper(request, storage, accession="h-1", host="h", period=0.2) as keeper:
        first = read_lease(request, storage)
        assert first is not None and first.alive() and first.accession == "h-1"
        wait_for(lambda: read_lease(request, storage).renewed > first.renewed, 10, "a renewal")
        keeper.end("succeeded")
    ended = read_lease(request, storage)
    assert ended is not None and ended.ended == "succeeded" and not ended.alive()
    key = "experiments/lease-key/_metadata.tar.lease.json"
    assert json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())["ended"] == "succeeded"


# --- end to end: two runners, a job longer than the broker's claim ---------------------------------
@pytest.fixture(scope="module")
def short_claim_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """A private RabbitMQ whose consumer_timeout is 3 s (checked every second)."""
    broker = ServiceSet(
        data_dir=tmp_path_factory.mktemp("short-claim-broker"),
        ports=Ports.free(),
        rabbitmq_consumer_timeout_ms=CONSUMER_TIMEOUT_MS,
    )
    try:
        yield broker.start_broker()
    finally:
        broker.stop()


def request_body(services: Endpoints, s3, bucket: str, key: str, starts: Path) -> bytes:
    workspace_key = upload_blob(s3, bucket, workspace_tar({"train.py": WORKLOAD.encode()}))
    args = (key, shlex.quote(str(starts)), str(JOB_SECONDS))
    return json.dumps(client_request(services, bucket, key, workspace_key, args=args)).encode()


def scrape_statuses(s3, bucket: str, key: str) -> list[str]:
    statuses = []
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=SCRAPE_PREFIX).get("Contents", []):
        document = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
        if document.get("studioml", {}).get("experiment", {}).get("key") == key:
            statuses.append(document["studioml"]["status"])
    return statuses


def tar_text(s3, bucket: str, key: str, member: str) -> str:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        return archive.extractfile(member).read().decode()  # type: ignore[union-attr]


def said(runners: list[Any], words: str) -> list[int]:
    """Which runners (by index) logged a line containing ``words``."""
    return [n for n, runner in enumerate(runners) if any(words in e.get("msg", "") for e in runner.events())]


def check_ran_once(s3, bucket: str, key: str, starts: Path) -> None:
    assert len(list(starts.iterdir())) == 1, "the workload started more than once"
    assert scrape_statuses(s3, bucket, key) == ["succeeded"]
    output = tar_text(s3, bucket, f"experiments/{key}/output.tar", "./output")
    token = output.split(f"done {key} token ", 1)[1].split()[0]
    model = json.loads(tar_text(s3, bucket, f"experiments/{key}/modeldir.tar", "./weights.json"))
    assert model == {"key": key, "token": token}  # the results are the one run's, complete
    assert (starts / token).exists()


def test_a_run_longer_than_rabbitmqs_consumer_timeout_runs_once(
    short_claim_broker: Endpoints,
    services: Endpoints,
    s3_client,
    bucket: str,
    serve_runner: Callable[..., Any],
    tmp_path: Path,
) -> None:
    broker = short_claim_broker
    queue = unique_queue("rmq_once")
    key = f"once_{queue}"
    starts = tmp_path / "starts"
    starts.mkdir()
    publish_like_client(
        broker.amqp_url, queue, [request_body(services, s3_client, bucket, key, starts)], persistent=True
    )
    options = ("--amqp-url", broker.amqp_url, "--amqp-mgt-url", broker.amqp_management_url)
    runners = [serve_runner(*options, "--queue-match", f"^{queue}$") for _ in range(2)]
    wait_for(
        lambda: (
            scrape_statuses(s3_client, bucket, key) and queue_depth(broker.amqp_management_url, queue) == 0
        ),
        240,
        "the request to succeed and its queue to empty",
        interval=1.0,
    )
    check_ran_once(s3_client, bucket, key, starts)
    assert dead_letters(broker, queue) == []
    assert management(broker.amqp_management_url, f"/api/queues/%2F/{queue}")["messages"] == 0
    # the broker really did take the claim away mid-run, and the copy really did wait
    assert said(runners, "RabbitMQ closed the channel holding a message"), "the consumer timeout never fired"
    assert said(runners, "LOST ACK"), "the first attempt's lost ack was not reported"
    assert said(runners, "an earlier attempt still runs"), "no copy was handed out while the run went on"
    assert said(runners, "already stored its results"), "the copy was not acked as already done"


def test_a_run_longer_than_the_sqs_visibility_ceiling_runs_once(
    services: Endpoints, s3_client, bucket: str, serve_runner: Callable[..., Any], tmp_path: Path
) -> None:
    import boto3

    queue = f"sqs_once_{uuid.uuid4().hex[:10]}"
    key = f"once_{queue}"
    starts = tmp_path / "starts"
    starts.mkdir()
    sqs = boto3.client(
        "sqs",
        endpoint_url=services.sqs_endpoint,
        region_name=services.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    sqs.send_message(
        QueueUrl=url, MessageBody=request_body(services, s3_client, bucket, key, starts).decode()
    )
    options = (
        "--sqs-endpoint",
        services.sqs_endpoint,
        "--sqs-region",
        services.region,
        "--sqs-visibility-ceiling",
        "4s",
        "--queue-match",
        f"^{queue}$",
    )
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    runners = [serve_runner(*options, env=env) for _ in range(2)]

    def queue_empty() -> bool:
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return all(
            attributes[name] == "0"
            for name in ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
        )

    wait_for(
        lambda: scrape_statuses(s3_client, bucket, key) and queue_empty(),
        240,
        "the request to succeed and its queue to empty",
        interval=1.0,
    )
    check_ran_once(s3_client, bucket, key, starts)
    rejected = f"{queue}_rejected"
    assert rejected not in {u.rsplit("/", 1)[-1] for u in sqs.list_queues().get("QueueUrls", [])}
    assert said(runners, "at SQS's visibility ceiling"), "the ceiling never ended the claim"
    assert said(runners, "an earlier attempt still runs"), "no copy was handed out while the run went on"
