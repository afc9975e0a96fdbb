"""RabbitMQ queues as the StudioML client sets them up (spec §2.2), consumed with pika.

Threading: pika's ``BlockingConnection`` must only ever be used by one thread. Each thread
that calls ``get`` gets its own connection (kept between calls, so a queue's worker reuses
one), and a message it returns keeps that connection (and the thread) for its whole life:
``hold_until`` services heartbeats on it while the experiment runs on another thread, and the
settle happens on it afterwards. Every delivery method checks the thread, so misuse fails
loudly instead of corrupting frames. A runner that dies drops the connection, and the broker
redelivers the unacked message; a delivery closed unsettled closes its channel, which does the same.

Work is pushed: ``get`` opens a consumer (prefetch 1, manual ack) and waits for the broker to
deliver, so a message is taken the moment it is published. New and deleted queues are learnt
from the broker's event exchange (``watch``), with the management API's listing as the fallback.

The client declares the exchange and its queues; we only declare passively, or with the
client's exact flags when something is missing, so we never cause PRECONDITION_FAILED.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from ..amqp_urls import management_url_for
from ..request import redact
from .base import Delivery, DeliveryLost, QueueError, Transport, dead_letter_queue, utc_now_text

log = logging.getLogger(__name__)

EXCHANGE = "StudioML.topic"
ROUTING_PREFIX = "StudioML."
ATTEMPTS_HEADER = "x-studio-attempts"
LAST_FAILURE_HEADER = "x-studio-last-failure"
REASON_HEADER = "x-studio-reject-reason"
REJECTED_QUEUE_HEADER = "x-studio-rejected-queue"
REJECTED_AT_HEADER = "x-studio-rejected-at"

PERSISTENT = 2
HOLD_TICK_SECONDS = 1.0
"""The longest ``hold_until`` services the connection between looks at its event; setting the
event wakes it at once (a thread-safe callback), so an ack never waits for the tick."""
BLOCKED_CONNECTION_TIMEOUT = 300.0
"""A broker under a resource alarm blocks publishers; give up (and keep the message) after this."""
CONSUMER_TIMEOUT_ARGUMENT = "x-consumer-timeout"
CONSUMER_TIMEOUT_SINCE = (3, 12)
"""The first RabbitMQ release that honours ``x-consumer-timeout`` on ``basic.consume``."""
CONSUME_WAIT_SECONDS = 0.2
"""How long ``get`` waits by default for the broker to push a message before calling the queue empty."""
WAIT_TICK_SECONDS = 0.1
"""How often a waiting ``get`` or ``watch`` looks at its stop condition."""
IDLE_CONNECTION_SECONDS = 30.0
"""A thread's parked connection older than this is replaced: nothing serviced its heartbeats meanwhile."""
EVENT_EXCHANGE = "amq.rabbitmq.event"
"""Where the ``rabbitmq_event_exchange`` plugin publishes broker events (queue and binding changes)."""
EVENT_KEYS = ("queue.created", "queue.deleted", "binding.created")


def consumer_timeout_ms(limit_seconds: float, grace_seconds: float, upload_seconds: float) -> int:
    """The per-consumer timeout that outlasts a run: its time limit, the stopping workload's grace
    period and the final upload, in the milliseconds RabbitMQ counts in."""
    if min(limit_seconds, grace_seconds, upload_seconds) < 0:
        raise ValueError("time limit, grace and upload allowance must not be negative")
    return math.ceil((limit_seconds + grace_seconds + upload_seconds) * 1000)


def server_version(server_properties: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    """``(3, 12, 1)`` from the broker's ``connection.start`` properties; None when it says nothing usable."""
    raw = (server_properties or {}).get("version")
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    numbers = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(n) for n in numbers.groups() if n is not None) if numbers else None


def consumer_arguments(version: tuple[int, ...] | None, timeout_ms: int | None) -> dict[str, Any] | None:
    """The ``basic.consume`` arguments that carry our timeout, or None where the broker cannot take
    them (older than 3.12, or unknown): there the broker's own ``consumer_timeout`` applies."""
    if timeout_ms is None or version is None or version < CONSUMER_TIMEOUT_SINCE:
        return None
    return {CONSUMER_TIMEOUT_ARGUMENT: timeout_ms}


def routing_key(queue: str) -> str:
    return f"{ROUTING_PREFIX}{queue}"


def queue_event(routing: str, headers: Mapping[str, Any] | None, vhost: str) -> tuple[str, str] | None:
    """``("created" | "deleted", queue)`` from one event-exchange message, or None when it is not
    about a queue of ``vhost`` that could hold work. A binding to ``StudioML.topic`` counts as a
    creation too: the client declares, then binds, and the listing only shows bound queues."""
    fields = {key: _text(value) for key, value in (headers or {}).items()}
    if fields.get("vhost") != vhost:
        return None
    if routing in ("queue.created", "queue.deleted") and fields.get("name"):
        return routing.split(".", 1)[1], fields["name"]
    if (
        routing == "binding.created"
        and fields.get("source_name") == EXCHANGE
        and fields.get("destination_kind") == "queue"
        and fields.get("routing_key", "").startswith(ROUTING_PREFIX)
        and fields.get("destination_name")
    ):
        return "created", fields["destination_name"]
    return None


class RabbitMQTransport(Transport):
    """One broker (one vhost): queues learnt from broker events and the management API, work pushed
    to a consumer."""

    kind = "rmq"
    waits_for_messages = True
    has_events = True

    def __init__(
        self,
        amqp_url: str,
        management_url: str | None = None,
        *,
        http_timeout: float = 10.0,
        connection_name: str = "studio-runner",
        consumer_timeout_ms: int | None = None,
    ) -> None:
        """``consumer_timeout_ms``: on RabbitMQ 3.12 or later, take messages with a consumer that
        carries this ``x-consumer-timeout``, so a long run keeps its claim past the broker's
        ``consumer_timeout``; older brokers get a consumer without it and the broker's own setting."""
        self._amqp_url = amqp_url
        self.consumer_timeout_ms = consumer_timeout_ms
        parameters = pika.URLParameters(amqp_url)  # validates the URL once, here
        self._vhost = parameters.virtual_host
        self._http_timeout = http_timeout
        self._connection_name = connection_name
        self._api_base, self._api_auth = _split_credentials(
            management_url or management_url_for(amqp_url),
            fallback=(
                getattr(parameters.credentials, "username", ""),
                getattr(parameters.credentials, "password", ""),
            ),
        )
        self._parked = threading.local()

    def describe(self) -> str:
        return f"rmq {redact(self._amqp_url)}"

    # --- management API ---------------------------------------------------------------------
    def discover(self) -> list[str]:
        """Queues bound to ``StudioML.topic`` with a ``StudioML.`` routing key (upstream ``Refresh``)."""
        path = f"/api/exchanges/{quote(self._vhost, safe='')}/{quote(EXCHANGE, safe='')}/bindings/source"
        bindings = self._api(path)
        if bindings is None:  # no exchange yet: no client has published
            return []
        return sorted(
            {
                binding["destination"]
                for binding in bindings
                if binding.get("destination_type") == "queue"
                and str(binding.get("routing_key", "")).startswith(ROUTING_PREFIX)
            }
        )

    def exists(self, queue: str) -> bool:
        return self._api(f"/api/queues/{quote(self._vhost, safe='')}/{quote(queue, safe='')}") is not None

    def _api(self, path: str) -> Any:
        """GET a management API document; None for 404."""
        request = urllib.request.Request(self._api_base + path, headers={"Accept": "application/json"})
        if self._api_auth:
            request.add_header("Authorization", self._api_auth)
        try:
            with urllib.request.urlopen(request, timeout=self._http_timeout) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise QueueError(
                f"RabbitMQ management API {self._api_base}{path} answered {error.code} {error.reason}; "
                "check --amqp-mgt-url and that the user has the monitoring tag"
            ) from error
        except (OSError, ValueError) as error:
            raise QueueError(
                f"RabbitMQ management API at {self._api_base} is unreachable ({error}); "
                "check --amqp-mgt-url (default: AMQP port + 10000) and that the management plugin is enabled"
            ) from error

    # --- AMQP -------------------------------------------------------------------------------
    def connect(self, purpose: str) -> pika.BlockingConnection:
        """A new connection owned by the calling thread, named so operators can tell ours apart."""
        parameters = pika.URLParameters(self._amqp_url)
        parameters.client_properties = {"connection_name": f"{self._connection_name} {purpose}"}
        if parameters.blocked_connection_timeout is None:
            parameters.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT
        try:
            return pika.BlockingConnection(parameters)
        except pika.exceptions.AMQPError as error:
            raise QueueError(
                f"cannot connect to RabbitMQ at {redact(self._amqp_url)}: {error!r}; check --amqp-url"
            ) from error

    def get(
        self, queue: str, wait: float | None = None, stop: Callable[[], bool] | None = None
    ) -> RabbitMQDelivery | None:
        """Consume one message (prefetch 1, manual ack), waiting up to ``wait`` seconds (default
        ``CONSUME_WAIT_SECONDS``) for the broker to push one, or until ``stop()`` says so."""
        connection = self._connection(queue)
        arguments = consumer_arguments(
            server_version(connection._impl.server_properties),  # pika keeps them on the impl only
            self.consumer_timeout_ms,
        )
        channel: BlockingChannel | None = None
        try:
            channel = connection.channel()
            consumer, (method, properties, body) = _consume_one(
                connection, channel, queue, arguments, CONSUME_WAIT_SECONDS if wait is None else wait, stop
            )
        except pika.exceptions.ChannelClosedByBroker as error:
            self._park(queue, connection)  # only the channel is gone
            if error.reply_code == 404:
                return None  # the client deleted its queue: nothing to do
            raise QueueError(
                f"RabbitMQ refused to give a message from {queue!r}: {error.reply_text}"
            ) from error
        except pika.exceptions.AMQPError as error:
            _close_quietly(connection)
            raise QueueError(f"taking a message from RabbitMQ queue {queue!r} failed: {error!r}") from error
        if method is None:
            _close_channel(channel)
            self._park(queue, connection)
            return None
        return RabbitMQDelivery(
            queue,
            connection,
            channel,
            method,
            properties,
            body,
            consumer=consumer,
            release=functools.partial(self._park, queue),
        )

    def _connection(self, queue: str) -> pika.BlockingConnection:
        """This thread's parked connection for ``queue`` if it is fresh and open, else a new one
        (named after the queue, so operators can tell which queue a connection serves)."""
        parked = self._parked_here().pop(queue, None)
        if parked is not None:
            connection, since = parked
            if connection.is_open and time.monotonic() - since < IDLE_CONNECTION_SECONDS:
                return connection
            _close_quietly(connection)
        return self.connect(queue)

    def _parked_here(self) -> dict[str, tuple[pika.BlockingConnection, float]]:
        parked = getattr(self._parked, "connections", None)
        if parked is None:
            parked = self._parked.connections = {}
        return parked

    def _park(self, queue: str, connection: pika.BlockingConnection) -> None:
        """Keep an open connection for this thread's next ``get`` from ``queue``; one is enough."""
        parked = self._parked_here()
        if connection.is_closed or (queue in parked and parked[queue][0] is not connection):
            _close_quietly(connection)
            return
        parked[queue] = (connection, time.monotonic())

    def release_thread(self) -> None:
        parked = self._parked_here()
        while parked:
            _close_quietly(parked.popitem()[1][0])

    def watch(
        self, on_change: Callable[[str, str], None], stop: threading.Event, ready: Callable[[], None]
    ) -> None:
        """Report queue creations and deletions of this vhost as the broker publishes them, until
        ``stop`` is set; ``ready()`` once subscribed. Raises QueueError when the events cannot be had."""
        connection = self.connect("queue events")
        try:
            channel = connection.channel()
            private = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            for key in EVENT_KEYS:
                channel.queue_bind(private, EVENT_EXCHANGE, routing_key=key)

            def deliver(
                _channel: BlockingChannel, method: Any, properties: BasicProperties, _body: bytes
            ) -> None:
                change = queue_event(method.routing_key, properties.headers, self._vhost)
                if change is not None:
                    on_change(*change)

            channel.basic_consume(private, deliver, auto_ack=True)
            ready()
            while not stop.is_set():
                connection.process_data_events(time_limit=WAIT_TICK_SECONDS)
        except pika.exceptions.ChannelClosedByBroker as error:
            hint = (
                "; enable the rabbitmq_event_exchange plugin (see docs/brokers.md)"
                if error.reply_code == 404
                else ""
            )
            raise QueueError(f"RabbitMQ queue events are unavailable: {error.reply_text}{hint}") from error
        except pika.exceptions.AMQPError as error:
            raise QueueError(f"RabbitMQ queue events stopped: {error!r}") from error
        finally:
            _close_quietly(connection)


def _consume_one(
    connection: pika.BlockingConnection,
    channel: BlockingChannel,
    queue: str,
    arguments: dict[str, Any] | None,
    wait: float,
    stop: Callable[[], bool] | None,
) -> tuple[str | None, tuple[Any, Any, Any]]:
    """Take one message with a consumer (prefetch 1, so the broker pushes no second one while it is
    held); the consumer stays open while the message is held, because its timeout lives on it.
    Returns early when the broker cancels the consumer (the queue was deleted)."""
    channel.basic_qos(prefetch_count=1)
    taken: list[tuple[Any, Any, Any]] = []
    tag = channel.basic_consume(
        queue,
        lambda _channel, method, properties, body: taken.append((method, properties, body)),
        auto_ack=False,
        arguments=arguments,
    )
    deadline = time.monotonic() + max(0.0, wait)
    while not taken:
        connection.process_data_events(
            time_limit=min(WAIT_TICK_SECONDS, max(0.0, deadline - time.monotonic()))
        )
        if taken or time.monotonic() >= deadline or tag not in channel.consumer_tags or (stop and stop()):
            break
    if not taken:
        if tag in channel.consumer_tags:
            channel.basic_cancel(tag)  # pika nacks anything that arrives meanwhile back to the queue
        return None, (None, None, None)
    return tag, taken[0]


class RabbitMQDelivery(Delivery):
    """A consumed message, unacked on a channel of a connection only its receiving thread touches."""

    def __init__(
        self,
        queue: str,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        method: Basic.GetOk,
        properties: BasicProperties,
        body: bytes,
        *,
        consumer: str | None = None,
        release: Callable[[pika.BlockingConnection], None] | None = None,
    ) -> None:
        headers = dict(properties.headers or {})
        super().__init__(
            queue,
            body,
            attempts=_as_int(headers.get(ATTEMPTS_HEADER), 1),
            redelivered=bool(method.redelivered),
            headers=headers,
        )
        self.properties = properties
        self._connection = connection
        self._channel = channel
        self._tag = method.delivery_tag
        self._owner = threading.get_ident()
        self._publisher: BlockingChannel | None = None
        self._consumer = consumer
        self._return_connection = release

    def hold_until(self, done: threading.Event) -> None:
        """Service the connection (heartbeats, channel events) until ``done``; pika needs us to."""
        self._check_thread()
        connection = self._connection

        def wake() -> None:
            done.wait()
            with contextlib.suppress(Exception):  # the connection may be gone already
                connection.add_callback_threadsafe(lambda: None)

        threading.Thread(target=wake, name=f"wake {self.queue}", daemon=True).start()
        while not done.is_set():
            try:
                self._connection.process_data_events(time_limit=HOLD_TICK_SECONDS)
            except pika.exceptions.AMQPError as error:
                log.error(
                    "lost the connection holding a message from %s (%r); RabbitMQ hands it out again. "
                    "This run goes on and stores its results; a copy taken meanwhile waits for it "
                    "(its lease) and is then acked as already done",
                    self.queue,
                    error,
                )
                break
            if self._channel.is_closed:
                log.error(
                    "RabbitMQ closed the channel holding a message from %s; it hands the message out "
                    "again. This run goes on and stores its results; a copy taken meanwhile waits for "
                    "it (its lease) and is then acked as already done. Runs longer than the broker's "
                    "consumer_timeout (30 min by default) do this on RabbitMQ before 3.12: raise "
                    "consumer_timeout (see docs/brokers.md)",
                    self.queue,
                )
                break
        done.wait()

    def _ack(self) -> None:
        with self._amqp("ack"):
            self._end_consumer()
            self._channel.basic_ack(self._tag)

    def _requeue(self) -> None:
        with self._amqp("requeue"):
            self._end_consumer()
            self._channel.basic_nack(self._tag, requeue=True)

    def _retry(self, reason: str) -> None:
        headers = {**self.headers, ATTEMPTS_HEADER: self.attempts + 1, LAST_FAILURE_HEADER: reason}
        with self._amqp("retry"):
            self._publish(routing_key(self.queue), headers)
            self._end_consumer()
            self._channel.basic_ack(self._tag)

    def _reject(self, reason: str) -> None:
        dead_letter = dead_letter_queue(self.queue)
        headers = {
            **self.headers,
            ATTEMPTS_HEADER: self.attempts,
            REASON_HEADER: reason,
            REJECTED_QUEUE_HEADER: self.queue,
            REJECTED_AT_HEADER: utc_now_text(),
        }
        with self._amqp("reject"):
            self._ensure_dead_letter_queue(dead_letter)
            self._publish(routing_key(dead_letter), headers)
            self._end_consumer()
            self._channel.basic_ack(self._tag)

    def _release(self) -> None:
        """Close our channels (an unacked message goes back to its queue) and hand the connection
        back to the thread for its next take; a connection in doubt is closed instead."""
        self._check_thread()
        for channel in (self._publisher, self._channel):
            if channel is not None and not _close_channel(channel):
                _close_quietly(self._connection)
        if self._return_connection is not None and self._connection.is_open:
            self._return_connection(self._connection)
        else:
            _close_quietly(self._connection)

    # --- helpers ------------------------------------------------------------------------------
    def _end_consumer(self) -> None:
        """Before settling a consumed message: with prefetch 1 the broker would push the next one
        the moment this one is acked, only for it to go back (flagged redelivered) on close."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None and self._channel.is_open and consumer in self._channel.consumer_tags:
            self._channel.basic_cancel(consumer)  # on a closed channel the settle itself reports the loss

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError(
                f"{self!r} was received on another thread; pika connections are not thread-safe, "
                "so hold and settle a RabbitMQ delivery on the thread that called get()"
            )

    @contextlib.contextmanager
    def _amqp(self, operation: str) -> Iterator[None]:
        self._check_thread()
        try:
            yield
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as error:
            raise QueueError(
                f"RabbitMQ did not accept the {operation} copy of a message from {self.queue}: {error!r}"
            ) from error
        except pika.exceptions.AMQPError as error:
            raise DeliveryLost(
                f"could not {operation} a message from {self.queue} ({error!r}); RabbitMQ will redeliver it"
            ) from error

    def _publish(self, key: str, headers: dict[str, Any]) -> None:
        """Publish a persistent copy with confirms and ``mandatory``; raises unless the broker took it."""
        if self._publisher is None:
            # a separate channel: a failed declare or publish closes it, never the one holding the message
            self._publisher = self._connection.channel()
            self._publisher.confirm_delivery()
        original = self.properties
        properties = BasicProperties(
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            headers=headers,
            delivery_mode=PERSISTENT,
            priority=original.priority,
            correlation_id=original.correlation_id,
            message_id=original.message_id,
            timestamp=original.timestamp,
            type=original.type,
            app_id=original.app_id,
        )
        self._publisher.basic_publish(EXCHANGE, key, self.body, properties=properties, mandatory=True)

    def _ensure_dead_letter_queue(self, dead_letter: str) -> None:
        """Our ``<queue>_rejected``: durable, bound beside the client's queue; never re-declared with other flags."""
        _declare_unless_present(
            self._connection,
            lambda channel: channel.exchange_declare(EXCHANGE, passive=True),
            # identical to the client's declaration; only reached when no client has made it yet
            lambda channel: channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=True),
        )
        channel = _declare_unless_present(
            self._connection,
            lambda channel: channel.queue_declare(dead_letter, passive=True),
            lambda channel: channel.queue_declare(dead_letter, durable=True),
        )
        channel.queue_bind(dead_letter, EXCHANGE, routing_key=routing_key(dead_letter))
        channel.close()


def _declare_unless_present(
    connection: pika.BlockingConnection,
    passive: Callable[[BlockingChannel], object],
    create: Callable[[BlockingChannel], object],
) -> BlockingChannel:
    """Run ``passive`` on a fresh channel; on 404 run ``create`` on another. Returns the open channel."""
    channel = connection.channel()
    try:
        passive(channel)
        return channel
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 404:
            raise
    channel = connection.channel()
    create(channel)
    return channel


def _split_credentials(url: str, fallback: tuple[str, str]) -> tuple[str, str | None]:
    """The URL without user info, and a Basic auth header from it (or from the AMQP URL)."""
    parts = urlsplit(url)
    user, password = (unquote(parts.username), unquote(parts.password or "")) if parts.username else fallback
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    base = urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else None
    return base, auth


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _close_channel(channel: BlockingChannel) -> bool:
    """Close a channel; False when that failed, so its connection cannot be trusted."""
    try:
        if channel.is_open:
            channel.close()
        return True
    except Exception:
        log.debug("closing a RabbitMQ channel failed", exc_info=True)
        return False


def _close_quietly(connection: pika.BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # a dead socket is already what we wanted
        log.debug("closing a RabbitMQ connection failed", exc_info=True)
