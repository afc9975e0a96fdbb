"""Instant pick-up (issue 11 item 1): queues learnt from RabbitMQ's event exchange, work pushed.

Every service here lists queues only every 300 s after its first listing, so a queue served or
retired later than that first listing can only have been learnt from the broker's events. The
transport counts its listings to show that none happened in between.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable

import pika
import pytest
from studio_runner.outcome import Outcome, Status
from studio_runner.queues.rabbitmq import RabbitMQTransport, queue_event
from studio_runner.service import Message, QueueMatcher, Service, ServiceSummary

from devtools.services import Endpoints
from tests.broker import declare_like_client, drain_bodies, publish_like_client, unique_queue
from tests.polling import wait_for

pytestmark = pytest.mark.timeout(120)

SLOW_LISTING = {"refresh_interval": 300.0}


class ListingTransport(RabbitMQTransport):
    """The real transport, noting when it lists queues through the management API."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.listed_at: list[float] = []

    def discover(self) -> list[str]:
        self.listed_at.append(time.monotonic())
        return super().discover()


def only(*queues: str) -> QueueMatcher:
    return QueueMatcher(match="^(" + "|".join(re.escape(q) for q in queues) + ")$")


class Running:
    """``service.run()`` on a thread, stopped and joined by ``finish``."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.summary: ServiceSummary | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: service.following_events, 30, "the service to follow queue events")

    def _run(self) -> None:
        self.summary = self.service.run()

    def finish(self) -> ServiceSummary:
        self.service.stop(grace_seconds=5)
        self.thread.join(30)
        assert self.summary is not None, "run() did not return"
        return self.summary


def transport(services: Endpoints) -> ListingTransport:
    return ListingTransport(services.amqp_url, services.amqp_management_url)


def test_event_messages_name_the_queue_of_our_vhost_only() -> None:
    assert queue_event("queue.created", {"name": b"rmq_a", "vhost": b"/"}, "/") == ("created", "rmq_a")
    assert queue_event("queue.deleted", {"name": "rmq_a", "vhost": "/"}, "/") == ("deleted", "rmq_a")
    assert queue_event("queue.created", {"name": "rmq_a", "vhost": "other"}, "/") is None
    binding = {
        "vhost": "/",
        "source_name": "StudioML.topic",
        "destination_kind": "queue",
        "destination_name": "rmq_b",
        "routing_key": "StudioML.rmq_b",
    }
    assert queue_event("binding.created", binding, "/") == ("created", "rmq_b")
    assert queue_event("binding.created", {**binding, "source_name": "amq.topic"}, "/") is None
    assert queue_event("binding.deleted", binding, "/") is None


def test_a_queue_created_after_the_runner_started_is_served_at_once(services: Endpoints) -> None:
    queue = unique_queue()
    handled: list[bytes] = []
    served = threading.Event()

    def handler(message: Message) -> Outcome:
        handled.append(message.body)
        served.set()
        return Outcome(Status.SUCCEEDED)

    rabbit = transport(services)
    running = Running(Service([rabbit], only(queue), handler, **SLOW_LISTING))
    listings = len(rabbit.listed_at)
    assert listings >= 1 and queue not in running.service.queues()
    publish_like_client(services.amqp_url, queue, [b"first"])
    assert served.wait(30), "the first message on a new queue was not taken"
    summary = running.finish()
    assert handled == [b"first"]
    assert summary.statuses == {"succeeded": 1}
    assert len(rabbit.listed_at) == listings, "a listing, not an event, found the queue"
    assert drain_bodies(services.amqp_url, queue) == [], "a message was left in the queue"


def test_a_deleted_queue_s_worker_stops_and_its_work_is_withdrawn(services: Endpoints) -> None:
    queue = unique_queue()
    started = threading.Event()
    seen: dict[str, str] = {}

    def handler(message: Message) -> Outcome:
        started.set()
        message.cancel.wait(60)
        seen["withdrawn"] = message.cancel.withdrawn or ""
        return Outcome(Status.CANCELLED, reason=seen["withdrawn"])

    rabbit = transport(services)
    running = Running(Service([rabbit], only(queue), handler, **SLOW_LISTING))
    listings = len(rabbit.listed_at)
    publish_like_client(services.amqp_url, queue, [b"long"])
    assert started.wait(30)
    assert running.service.queues() == [queue]
    connection = pika.BlockingConnection(pika.URLParameters(services.amqp_url))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()
    wait_for(lambda: not running.service.queues(), 30, "the deleted queue's worker to stop")
    wait_for(lambda: "withdrawn" in seen, 30, "the running request to be withdrawn")
    assert seen["withdrawn"] == f"queue {queue} was deleted"
    assert running.finish().statuses == {"cancelled": 1}
    assert len(rabbit.listed_at) == listings, "a listing, not an event, retired the queue"


def test_two_runners_share_a_queue_without_taking_a_message_twice(services: Endpoints) -> None:
    queue = unique_queue()
    bodies = [f"m{n}".encode() for n in range(24)]
    taken: Counter[bytes] = Counter()
    by_runner: Counter[str] = Counter()
    lock = threading.Lock()
    everything = threading.Event()

    def handler_for(name: str) -> Callable[[Message], Outcome]:
        def handler(message: Message) -> Outcome:
            with lock:
                taken[message.body] += 1
                by_runner[name] += 1
                if sum(taken.values()) >= len(bodies):
                    everything.set()
            time.sleep(0.1)  # long enough for the other runner's consumer to be offered the next one
            return Outcome(Status.SUCCEEDED)

        return handler

    declare_like_client(services.amqp_url, queue)
    runners = [
        Running(Service([transport(services)], only(queue), handler_for(name), **SLOW_LISTING))
        for name in ("one", "two")
    ]
    for running in runners:
        wait_for(lambda r=running: r.service.queues() == [queue], 30, "both runners to serve the queue")
    publish_like_client(services.amqp_url, queue, bodies)
    assert everything.wait(60), f"only {sum(taken.values())} of {len(bodies)} messages were handled"
    summaries = [running.finish() for running in runners]
    assert taken == Counter(bodies), "a message was taken twice or never"
    assert sum(s.handled for s in summaries) == len(bodies)
    assert set(by_runner) == {"one", "two"}, f"one runner took everything: {dict(by_runner)}"
    assert drain_bodies(services.amqp_url, queue) == [], "a message was left in the queue"
