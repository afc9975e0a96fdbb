"""StudioRabbitMQHook against a real RabbitMQ, with queues and messages made the way the StudioML client makes them.

The publishing helpers here are also used by the trigger and sensor tests.
"""

from __future__ import annotations

import json

import pytest
from airflow.sdk import Connection

from airflow_provider_studio.exceptions import (
    BrokerAuthError,
    BrokerUnreachable,
    QueueNotFound,
    StudioQueueError,
)
from airflow_provider_studio.hooks.rabbitmq import BrokerSettings, QueueState, StudioRabbitMQHook
from tests.broker import declare_like_client, drain_bodies, publish_like_client, unique
from tests.provider.connections import closed_port, rabbitmq_connection, set_connection
from tests.runner.client_requests import queued_request as studio_request


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
    assert drain_bodies(services.amqp_url, queue) == bodies  # still deliverable, in the original order


def test_peek_of_an_empty_queue_is_empty(hook, queue):
    assert hook.peek(queue, limit=5) == []


async def test_async_state_reads_depth_and_peeks_without_consuming(services, hook, queue):
    bodies = [studio_request(f"exp_{i}") for i in range(3)]
    publish_like_client(services.amqp_url, queue, bodies)

    state = await hook.aqueue_state(queue, peek_limit=2)
    assert state == QueueState(queue=queue, depth=3, bodies=tuple(bodies[:2]))
    assert (await hook.aqueue_state(queue)).depth == 3
    assert drain_bodies(services.amqp_url, queue) == bodies


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
