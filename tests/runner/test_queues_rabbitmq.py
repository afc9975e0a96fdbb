"""RabbitMQ transport against a real broker, with queues set up exactly as the StudioML client does.

What every transport does (hold, settle, retry, dead-letter, discover) is test_transport_contract.py;
here is what only RabbitMQ does: routing keys, the client's declarations, threads, heartbeats.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from urllib.parse import quote

import pika
import pytest
from studio_runner.queues.base import DeliveryLost
from studio_runner.queues.rabbitmq import (
    ATTEMPTS_HEADER,
    RabbitMQTransport,
    management_url_for,
)

from devtools.services import Endpoints
from tests.broker import EXCHANGE, management, publish_like_client, unique_queue
from tests.polling import wait_for


@pytest.fixture(scope="module")
def transport(services: Endpoints) -> RabbitMQTransport:
    return RabbitMQTransport(services.amqp_url, services.amqp_management_url)


# --- discovery ----------------------------------------------------------------------------------
def test_discovery_lists_only_queues_bound_with_the_studio_routing_key(
    services: Endpoints, transport: RabbitMQTransport
) -> None:
    """What every transport discovers is in test_transport_contract.py; this is RabbitMQ's own rule."""
    work = unique_queue()
    publish_like_client(services.amqp_url, work, [b"{}"])
    # bound with another routing-key prefix, or not bound at all: not StudioML queues
    connection = pika.BlockingConnection(pika.URLParameters(services.amqp_url))
    channel = connection.channel()
    channel.queue_declare(f"{work}_elsewhere")
    channel.queue_bind(f"{work}_elsewhere", EXCHANGE, routing_key=f"Other.{work}_elsewhere")
    channel.queue_declare(f"{work}_unbound")
    connection.close()

    names = set(transport.discover())
    assert work in names
    assert f"{work}_elsewhere" not in names and f"{work}_unbound" not in names


def test_management_url_is_derived_from_the_amqp_url() -> None:
    assert management_url_for("amqp://u:p@host:5672/%2f") == "http://u:p@host:15672"
    assert management_url_for("amqps://u:p@host/vh") == "https://u:p@host:15671"


# --- settling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
def test_settling_keeps_the_clients_properties_and_declarations(
    services: Endpoints, transport: RabbitMQTransport, persistent: bool
) -> None:
    """Counting and dead-lettering are the transport contract's; here, what RabbitMQ must keep."""
    queue = unique_queue()
    publish_like_client(services.amqp_url, queue, [b"request"], persistent=persistent)
    delivery = transport.get(queue)
    assert delivery.properties.app_id == "studioml"
    delivery.requeue()
    transport.get(queue).retry("failed: exit code 1")
    retried = transport.get(queue)
    assert retried.properties.content_type == "application/json"
    retried.reject("failed after 2 attempts: failed: exit code 1")
    dead = transport.get(f"{queue}_rejected")
    assert dead.body == b"request" and dead.headers[ATTEMPTS_HEADER] == 2
    dead.ack()

    # the client re-declares on every submit; it must still find its own flags
    publish_like_client(services.amqp_url, queue, [b"next"], persistent=persistent)
    info = management(services.amqp_management_url, f"/api/queues/%2F/{quote(queue)}")
    assert (info["durable"], info["auto_delete"], info["arguments"]) == (persistent, False, {})
    exchange = management(services.amqp_management_url, f"/api/exchanges/%2F/{EXCHANGE}")
    assert (exchange["type"], exchange["durable"], exchange["auto_delete"]) == ("topic", True, True)
    dead_letter = management(services.amqp_management_url, f"/api/queues/%2F/{quote(queue)}_rejected")
    assert dead_letter["durable"] is True
    transport.get(queue).ack()


def test_a_delivery_belongs_to_the_thread_that_received_it(
    services: Endpoints, transport: RabbitMQTransport
) -> None:
    queue = unique_queue()
    publish_like_client(services.amqp_url, queue, [b"x"])
    delivery = transport.get(queue)
    errors: list[BaseException] = []

    def settle_elsewhere() -> None:
        try:
            delivery.ack()
        except BaseException as error:
            errors.append(error)

    other = threading.Thread(target=settle_elsewhere)
    other.start()
    other.join()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "thread" in str(errors[0])
    delivery.ack()
    assert transport.get(queue) is None


# --- holding ------------------------------------------------------------------------------------
def test_a_held_delivery_outlives_the_heartbeat_interval(services: Endpoints) -> None:
    transport = RabbitMQTransport(services.amqp_url + "?heartbeat=2", services.amqp_management_url)
    queue = unique_queue()
    publish_like_client(services.amqp_url, queue, [b"long run"])
    delivery = transport.get(queue)
    done = threading.Event()
    timer = threading.Timer(6.0, done.set)  # three heartbeat intervals
    timer.start()
    delivery.hold_until(done)
    delivery.ack()  # raises if the broker had dropped the connection
    assert transport.get(queue) is None


def test_a_lost_connection_fails_the_settle_and_the_message_returns(
    services: Endpoints, transport: RabbitMQTransport
) -> None:
    queue = unique_queue()
    publish_like_client(services.amqp_url, queue, [b"keep me"])
    delivery = transport.get(queue)

    def ours() -> list[str]:
        return [
            c["name"]
            for c in management(services.amqp_management_url, "/api/connections")
            if c.get("client_properties", {}).get("connection_name") == f"studio-runner {queue}"
        ]

    names = wait_for(ours, 15, "the delivery's connection in the management API")
    assert names, "the delivery's connection should show up in the management API"
    for name in names:
        management(services.amqp_management_url, f"/api/connections/{quote(name, safe='')}", method="DELETE")
    done = threading.Event()
    threading.Timer(1.0, done.set).start()
    delivery.hold_until(done)
    with pytest.raises(DeliveryLost):
        delivery.ack()
    delivery.close()

    again = wait_for(lambda: transport.get(queue), 15, "the message to come back")
    assert again.body == b"keep me" and again.redelivered
    again.ack()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from studio_runner.queues.rabbitmq import RabbitMQTransport
    delivery = RabbitMQTransport(sys.argv[1], sys.argv[2]).get(sys.argv[3])
    print("held" if delivery else "empty", flush=True)
    time.sleep(120)
    """
)


def test_a_killed_holder_makes_the_message_redeliverable(
    services: Endpoints, transport: RabbitMQTransport
) -> None:
    queue = unique_queue()
    publish_like_client(services.amqp_url, queue, [b"survives a crash"], persistent=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, services.amqp_url, services.amqp_management_url, queue],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert transport.get(queue) is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    delivery = wait_for(lambda: transport.get(queue), 15, "the message to come back")
    assert delivery is not None
    assert (delivery.body, delivery.redelivered, delivery.attempts) == (b"survives a crash", True, 1)
    delivery.ack()
