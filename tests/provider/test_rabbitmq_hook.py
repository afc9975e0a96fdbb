"""StudioRabbitMQHook against a real RabbitMQ, with queues and messages made the way the StudioML client makes them.

The publishing helpers here are also used by the trigger and sensor tests.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterable

import pika
import pytest
from airflow.sdk import Connection

from airflow_provider_studio.exceptions import (
    BrokerAuthError,
    BrokerUnreachable,
    QueueNotFound,
    StudioQueueError,
)
from airflow_provider_studio.hooks.rabbitmq import BrokerSettings, QueueState, StudioRabbitMQHook

EXCHANGE = "StudioML.topic"


# --- helpers shared with the trigger and sensor tests -------------------------------------------
def studio_request(key: str, **resources: object) -> bytes:
    """A request shaped like the one ``studio run`` publishes (trimmed ``pythonenv``)."""
    needed = {"gpus": 0, "cpus": 1, "ram": "2g", "hdd": "3g", **resources}
    artifact_root = "s3://127.0.0.1:8333/studioml-artifacts"
    workspace_key = f"blobstore/{uuid.uuid4().hex}.tar"
    body = {
        "experiment": {
            "key": key,
            "args": ["arg1", "--flag=2"],
            "filename": "hello.py",
            "pythonenv": ["numpy==2.4.6", "pika==1.4.4", "studioml==0.0.49"],
            "project": "research",
            "pythonver": "3.11",
            "resources_needed": needed,
            "status": "waiting",
            "time_added": 1795336687.93,
            "max_duration": None,
            "owner": "guest",
            "artifacts": {
                "workspace": {
                    "unpack": True,
                    "mutable": False,
                    "key": workspace_key,
                    "qualified": f"{artifact_root}/{workspace_key}",
                    "bucket": "studioml-artifacts",
                },
                "output": {
                    "unpack": True,
                    "mutable": True,
                    "key": f"experiments/{key}/output.tar",
                    "qualified": f"{artifact_root}/experiments/{key}/output.tar",
                    "bucket": "studioml-artifacts",
                },
            },
        },
        "config": {
            "cloud": {"queue": {"rmq": "amqp://guest:guest@127.0.0.1:5672/%2f"}},
            "env": {"AWS_DEFAULT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1"},
            "experimentLifetime": "30m",
        },
    }
    return json.dumps(body).encode()


def declare_like_client(amqp_url: str, queue: str) -> None:
    """The client's own declarations: topic exchange (durable, auto-delete), plain queue, ``StudioML.<queue>`` binding."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
        channel.queue_declare(queue, durable=False)
        channel.queue_bind(queue, EXCHANGE, routing_key=f"StudioML.{queue}")
    finally:
        connection.close()


def publish_like_client(amqp_url: str, queue: str, bodies: Iterable[bytes]) -> None:
    """Publish as the client does: mandatory, with publisher confirms, so each message is queued on return."""
    declare_like_client(amqp_url, queue)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(content_type="application/json", app_id="studioml", delivery_mode=2)
        for body in bodies:
            channel.basic_publish(EXCHANGE, f"StudioML.{queue}", body, properties, mandatory=True)
    finally:
        connection.close()


def drain(amqp_url: str, queue: str) -> list[bytes]:
    """Consume (ack) everything in the queue, as a runner eventually would."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    bodies = []
    try:
        channel = connection.channel()
        while True:
            method, _properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)
    finally:
        connection.close()


def rabbitmq_connection(
    services, *, password: str = "guest", port: int | None = None, vhost: str = "/"
) -> dict[str, object]:
    """A ``studio_rabbitmq`` connection in the JSON form ``AIRFLOW_CONN_<ID>`` takes."""
    amqp_port = pika.URLParameters(services.amqp_url).port
    return {
        "conn_type": "studio_rabbitmq",
        "host": "127.0.0.1",
        "port": port or amqp_port,
        "login": "guest",
        "password": password,
        "schema": vhost,
        "extra": {"management_url": services.amqp_management_url},
    }


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, definition: dict[str, object]) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(definition))
    return conn_id


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def queue(services) -> str:
    name = unique("rmq_hook_")
    declare_like_client(services.amqp_url, name)
    return name


@pytest.fixture
def hook(services, monkeypatch) -> StudioRabbitMQHook:
    return StudioRabbitMQHook(set_connection(monkeypatch, unique("rmq_ok_"), rabbitmq_connection(services)))


@pytest.fixture
def bad_password_hook(services, monkeypatch) -> StudioRabbitMQHook:
    conn_id = set_connection(
        monkeypatch, unique("rmq_badpw_"), rabbitmq_connection(services, password="wrong")
    )
    return StudioRabbitMQHook(conn_id)


@pytest.fixture
def unreachable_hook(services, monkeypatch) -> StudioRabbitMQHook:
    conn_id = set_connection(
        monkeypatch, unique("rmq_down_"), rabbitmq_connection(services, port=closed_port())
    )
    return StudioRabbitMQHook(conn_id, timeout=5)


# --- depth and peek ----------------------------------------------------------------------------------
def test_depth_counts_the_requests_waiting(services, hook, queue):
    assert hook.queue_depth(queue) == 0
    publish_like_client(services.amqp_url, queue, [studio_request(f"exp_{i}") for i in range(3)])
    assert hook.queue_depth(queue) == 3


def test_peek_leaves_every_message_in_place(services, hook, queue):
    bodies = [studio_request(f"exp_{i}") for i in range(4)]
    publish_like_client(services.amqp_url, queue, bodies)

    assert hook.peek(queue, limit=2) == bodies[:2]
    assert hook.peek(queue, limit=10) == bodies  # asking for more than is there is fine
    assert hook.queue_depth(queue) == 4
    assert drain(services.amqp_url, queue) == bodies  # still deliverable, in the original order


def test_peek_of_an_empty_queue_is_empty(hook, queue):
    assert hook.peek(queue, limit=5) == []


async def test_async_state_reads_depth_and_peeks_without_consuming(services, hook, queue):
    bodies = [studio_request(f"exp_{i}") for i in range(3)]
    publish_like_client(services.amqp_url, queue, bodies)

    state = await hook.aqueue_state(queue, peek_limit=2)
    assert state == QueueState(queue=queue, depth=3, bodies=tuple(bodies[:2]))
    assert (await hook.aqueue_state(queue)).depth == 3
    assert drain(services.amqp_url, queue) == bodies


# --- the three failures, each its own exception with what to fix -----------------------------------
def test_missing_queue(hook):
    with pytest.raises(QueueNotFound) as raised:
        hook.queue_depth("rmq_nobody_made_this")
    message = str(raised.value)
    assert "rmq_nobody_made_this" in message
    assert "vhost '/'" in message
    assert "start the StudioML client" in message


async def test_missing_queue_async(hook):
    with pytest.raises(QueueNotFound, match=r"rmq_nobody_made_this.*check the queue name"):
        await hook.aqueue_state("rmq_nobody_made_this", peek_limit=3)


def test_bad_password(bad_password_hook, queue):
    with pytest.raises(BrokerAuthError) as raised:
        bad_password_hook.queue_depth(queue)
    message = str(raised.value)
    assert "refused the login of user 'guest'" in message
    assert bad_password_hook.rabbitmq_conn_id in message
    assert "wrong" not in message  # never the password


async def test_bad_password_async(bad_password_hook, queue):
    with pytest.raises(BrokerAuthError, match="refused the login"):
        await bad_password_hook.aqueue_state(queue)


def test_unknown_vhost_is_an_access_error(services, monkeypatch, queue):
    conn_id = set_connection(
        monkeypatch, unique("rmq_vhost_"), rabbitmq_connection(services, vhost="no_such_vhost")
    )
    with pytest.raises(BrokerAuthError, match=r"vhost 'no_such_vhost'.*exists"):
        StudioRabbitMQHook(conn_id).queue_depth(queue)


def test_unreachable_broker(unreachable_hook, queue):
    with pytest.raises(BrokerUnreachable) as raised:
        unreachable_hook.queue_depth(queue)
    message = str(raised.value)
    assert "cannot reach RabbitMQ at 127.0.0.1:" in message
    assert "Connection refused" in message
    assert "check the host and port" in message


async def test_unreachable_broker_async(unreachable_hook, queue):
    with pytest.raises(BrokerUnreachable, match="cannot reach RabbitMQ"):
        await unreachable_hook.aqueue_state(queue)


def test_the_three_failures_are_told_apart():
    kinds = [QueueNotFound, BrokerAuthError, BrokerUnreachable]
    for kind in kinds:
        assert issubclass(kind, StudioQueueError)
        assert not any(issubclass(kind, other) for other in kinds if other is not kind)


# --- the UI's Test button ------------------------------------------------------------------------------
def test_test_connection_reports_broker_and_management_api(hook):
    ok, message = hook.test_connection()
    assert ok, message
    assert "Connected to RabbitMQ" in message
    assert "management API" in message and "answers (RabbitMQ" in message
    assert "guest:guest" not in message


def test_test_connection_fails_with_the_reason(bad_password_hook, unreachable_hook):
    ok, message = bad_password_hook.test_connection()
    assert not ok and "refused the login" in message
    ok, message = unreachable_hook.test_connection()
    assert not ok and "cannot reach RabbitMQ" in message


def test_test_connection_passes_but_warns_without_management_api(services, monkeypatch):
    definition = rabbitmq_connection(services)
    definition["extra"] = {"management_url": f"http://127.0.0.1:{closed_port()}"}
    ok, message = StudioRabbitMQHook(
        set_connection(monkeypatch, unique("rmq_nomgmt_"), definition)
    ).test_connection()
    assert ok
    assert "did not answer" in message and "management_url" in message


# --- reading the connection ----------------------------------------------------------------------------
def test_settings_from_a_minimal_connection():
    settings = BrokerSettings.from_connection(
        Connection(conn_id="c", conn_type="studio_rabbitmq", host="mq.example")
    )
    assert (settings.port, settings.vhost, settings.login, settings.ssl) == (5672, "/", "guest", False)
    assert settings.management_url == "http://mq.example:15672"


def test_settings_with_tls_vhost_and_management_url():
    conn = Connection(
        conn_id="c",
        conn_type="studio_rabbitmq",
        host="mq.example",
        login="studio",
        password="p@ss/word",
        schema="research",
        extra=json.dumps({"ssl": "true"}),
    )
    settings = BrokerSettings.from_connection(conn)
    assert (settings.port, settings.ssl, settings.vhost) == (5671, True, "research")
    assert settings.management_url == "https://mq.example:15671"
    assert settings.amqp_url() == "amqps://studio:p%40ss%2Fword@mq.example:5671/research"
    assert "p@ss" not in repr(settings)


def test_management_url_is_shown_without_credentials(services, monkeypatch):
    definition = rabbitmq_connection(services)
    definition["extra"] = {"management_url": "https://admin:secret@mgmt.example/"}
    hook = StudioRabbitMQHook(set_connection(monkeypatch, unique("rmq_mgmt_"), definition))
    assert hook.management_url == "https://mgmt.example"


def test_a_connection_without_host_says_so():
    with pytest.raises(BrokerUnreachable, match="names no host"):
        BrokerSettings.from_connection(Connection(conn_id="c", conn_type="studio_rabbitmq"))


def test_hook_is_found_from_the_connection_type(services, monkeypatch):
    conn_id = set_connection(monkeypatch, unique("rmq_lookup_"), rabbitmq_connection(services))
    hook = StudioRabbitMQHook.get_hook(conn_id)
    assert isinstance(hook, StudioRabbitMQHook)
    assert hook.rabbitmq_conn_id == conn_id
