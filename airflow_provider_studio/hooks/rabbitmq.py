"""StudioML's RabbitMQ broker as an Airflow connection: how many requests wait in a queue, and what they ask for.

Everything here only looks, except :meth:`StudioRabbitMQHook.publish`, which queues requests as
the ``studioml`` client does (a queued generation's one task publishes its experiments). The depth comes from a passive declare, because the StudioML client
owns its queues and a declare with other flags would fail with PRECONDITION_FAILED. Peeked
messages are taken unacknowledged and rejected back with requeue, so no request is consumed
(RabbitMQ puts them back in their original places; a runner polling in that millisecond simply
sees fewer messages). The sync side (pika) serves poke mode and tests; the async side (aio-pika)
serves the trigger, which must never block the triggerer's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import httpx
import pika
import pika.exceptions
from airflow.sdk import BaseHook
from pika.adapters.blocking_connection import BlockingChannel
from studio_runner.amqp_urls import (
    DEFAULT_PORT,
    DEFAULT_TLS_PORT,
    amqp_url,
    host_port,
    management_api_url,
    without_userinfo,
)

from airflow_provider_studio.exceptions import (
    BrokerAuthError,
    BrokerUnreachable,
    QueueNotFound,
    StudioQueueError,
)

log = logging.getLogger(__name__)
if logging.getLogger("pika").level == logging.NOTSET:
    # pika narrates every connection at INFO; keep task logs to what matters unless a user chose otherwise.
    logging.getLogger("pika").setLevel(logging.WARNING)

DEFAULT_TIMEOUT = 10.0
EXCHANGE = "StudioML.topic"
ROUTING_PREFIX = "StudioML."


@dataclass(frozen=True)
class QueueState:
    """One look at a queue: messages ready for delivery (unacked ones are already being worked
    on) and the bodies of the first few, oldest first."""

    queue: str
    depth: int
    bodies: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to reach the broker, read from an Airflow connection of type ``studio_rabbitmq``."""

    conn_id: str
    host: str
    port: int
    vhost: str
    login: str
    password: str = field(repr=False)
    ssl: bool = False
    management_url: str = ""

    @classmethod
    def from_connection(cls, conn: Any, extra: Mapping[str, Any] | None = None) -> BrokerSettings:
        """``extra`` is the decoded extras when the caller already has them (async callers must)."""
        extra = conn.extra_dejson if extra is None else extra
        use_ssl = _as_bool(extra.get("ssl", False))
        if not conn.host:
            raise BrokerUnreachable(
                f"Airflow connection '{conn.conn_id}' names no host: set it to the RabbitMQ host name"
            )
        port = int(conn.port or (DEFAULT_TLS_PORT if use_ssl else DEFAULT_PORT))
        login = conn.login or "guest"
        password = conn.password if conn.password is not None else ("guest" if not conn.login else "")
        management_url = str(extra.get("management_url") or "").strip().rstrip("/")
        if not management_url:
            management_url = management_api_url(conn.host, port, secure=use_ssl)
        return cls(
            conn_id=conn.conn_id,
            host=conn.host,
            port=port,
            vhost=conn.schema or "/",
            login=login,
            password=password or "",
            ssl=use_ssl,
            management_url=management_url,
        )

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def amqp_url(self, *, include_password: bool = True) -> str:
        """The URL a StudioML client or runner is configured with (``AMQP_URL``); with the password
        unless told otherwise (a runner pod gets that from a Secret)."""
        password = self.password if include_password else None
        return amqp_url(self.host, self.port, self.vhost, self.login, password, secure=self.ssl)

    def pika_parameters(self, purpose: str, timeout: float) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.login, self.password),
            ssl_options=pika.SSLOptions(_tls_context(), self.host) if self.ssl else None,
            connection_attempts=1,
            socket_timeout=timeout,
            stack_timeout=timeout,
            blocked_connection_timeout=timeout,
            client_properties={"connection_name": f"airflow studio {purpose}"},
        )

    def aio_pika_arguments(self, purpose: str, timeout: float) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "virtualhost": self.vhost,
            "login": self.login,
            "password": self.password,
            "ssl": self.ssl,
            "ssl_context": _tls_context() if self.ssl else None,
            "timeout": timeout,
            "client_properties": {"connection_name": f"airflow studio {purpose}"},
        }


class StudioRabbitMQHook(BaseHook):
    """Read-only access to the StudioML queues on one RabbitMQ broker and virtual host.

    :param rabbitmq_conn_id: Airflow connection of type ``studio_rabbitmq``; the schema field is the
        virtual host, extras ``management_url`` and ``ssl``.
    :param timeout: seconds allowed for connecting and for each broker operation.
    """

    conn_name_attr = "rabbitmq_conn_id"
    default_conn_name = "studio_rabbitmq_default"
    conn_type = "studio_rabbitmq"
    hook_name = "StudioML RabbitMQ"

    def __init__(
        self, rabbitmq_conn_id: str = default_conn_name, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.rabbitmq_conn_id = rabbitmq_conn_id
        self.timeout = timeout
        self._settings: BrokerSettings | None = None

    # --- connection settings ---------------------------------------------------------------
    def settings(self) -> BrokerSettings:
        if self._settings is None:
            self._settings = BrokerSettings.from_connection(self.get_connection(self.rabbitmq_conn_id))
        return self._settings

    async def asettings(self) -> BrokerSettings:
        if self._settings is None:
            conn = await self.aget_connection(self.rabbitmq_conn_id)
            # The sync extra_dejson would report secrets to the supervisor with a blocking send.
            aextra = getattr(conn, "aextra_dejson", None)
            extra = await aextra() if aextra is not None else conn.extra_dejson
            self._settings = BrokerSettings.from_connection(conn, extra)
        return self._settings

    @property
    def management_url(self) -> str:
        """The management API the runners discover queues through (``AMQP_MGT_URL``), without credentials."""
        return without_userinfo(self.settings().management_url)

    # --- sync side (pika) ------------------------------------------------------------------
    def get_conn(self) -> pika.BlockingConnection:
        """A new blocking connection; the caller closes it, on the thread that opened it."""
        settings = self.settings()
        try:
            return pika.BlockingConnection(settings.pika_parameters("hook", self.timeout))
        except pika.exceptions.AMQPError as error:
            raise _pika_error(error, settings) from error

    @contextlib.contextmanager
    def _channel(self) -> Iterator[BlockingChannel]:
        connection = self.get_conn()
        try:
            yield connection.channel()
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def queue_state(self, queue: str, peek_limit: int = 0) -> QueueState:
        """Depth of ``queue`` and up to ``peek_limit`` bodies, over one connection."""
        settings = self.settings()
        try:
            with self._channel() as channel:
                depth = channel.queue_declare(queue, passive=True).method.message_count
                bodies = _peek_blocking(channel, queue, min(peek_limit, depth))
        except pika.exceptions.AMQPError as error:
            raise _pika_error(error, settings, queue) from error
        return QueueState(queue=queue, depth=depth, bodies=tuple(bodies))

    def publish(self, queue: str, bodies: Iterable[bytes]) -> int:
        """Queue request bodies as the StudioML client does (STUDIOML_CLIENT.md); returns the count.

        The client's own flags: the topic exchange durable and auto-deleting, the queue
        non-durable, bound as ``StudioML.<queue>``; messages mandatory, with publisher confirms,
        so each one is in the queue when this returns (an unroutable one raises).
        """
        settings = self.settings()
        sent = 0
        connection = self.get_conn()
        try:
            channel = connection.channel()
            channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
            try:  # a queue a persistent client made is durable: keep its flags
                channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                channel = connection.channel()
                channel.queue_declare(queue, durable=False)
            channel.queue_bind(queue, EXCHANGE, routing_key=f"{ROUTING_PREFIX}{queue}")
            channel.confirm_delivery()
            properties = pika.BasicProperties(content_type="application/json", app_id="studioml")
            for body in bodies:
                channel.basic_publish(EXCHANGE, f"{ROUTING_PREFIX}{queue}", body, properties, mandatory=True)
                sent += 1
        except pika.exceptions.AMQPError as error:
            raise _pika_error(error, settings, queue) from error
        finally:
            with contextlib.suppress(Exception):
                connection.close()
        return sent

    def queue_depth(self, queue: str) -> int:
        """Messages ready for delivery in ``queue``; QueueNotFound if it does not exist."""
        return self.queue_state(queue).depth

    def peek(self, queue: str, limit: int = 10) -> list[bytes]:
        """Bodies of the first ``limit`` ready messages, left in the queue in their order."""
        return list(self.queue_state(queue, peek_limit=limit).bodies)

    def test_connection(self) -> tuple[bool, str]:
        """What the UI's Test button shows: the AMQP login, then whether the management API answers."""
        try:
            settings = self.settings()
            connection = self.get_conn()
        except StudioQueueError as error:
            return False, str(error)
        except Exception as error:
            return False, f"cannot use Airflow connection '{self.rabbitmq_conn_id}': {error}"
        with contextlib.suppress(Exception):
            connection.close()
        reached = (
            f"Connected to RabbitMQ at {settings.address}, vhost '{settings.vhost}', as '{settings.login}'"
        )
        management = without_userinfo(settings.management_url)
        try:
            version = _management_version(settings, self.timeout)
        except Exception as error:
            return True, (
                f"{reached}; the management API at {management} did not answer ({error}). Sensors do "
                "not need it, but StudioML runners discover queues through it: set the connection's "
                "management_url if it is elsewhere."
            )
        return True, f"{reached}; management API at {management} answers (RabbitMQ {version})."

    # --- async side (aio-pika) -------------------------------------------------------------
    async def aqueue_state(self, queue: str, peek_limit: int = 0) -> QueueState:
        """Async twin of :meth:`queue_state` for triggers: one short-lived connection per call."""
        settings = await self.asettings()
        try:
            connection = await aio_pika.connect(**settings.aio_pika_arguments("trigger", self.timeout))
        except Exception as error:
            raise _aio_connect_error(error, settings) from error
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True, timeout=self.timeout)
            depth = declared.declaration_result.message_count or 0
            bodies = await _peek_async(declared, min(peek_limit, depth), self.timeout)
        except (aiormq.exceptions.AMQPError, OSError, asyncio.TimeoutError) as error:
            raise _aio_operation_error(error, settings, queue) from error
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self.timeout)
        return QueueState(queue=queue, depth=depth, bodies=tuple(bodies))


# --- peeking ---------------------------------------------------------------------------------
def _peek_blocking(channel: BlockingChannel, queue: str, count: int) -> list[bytes]:
    held: list[int] = []
    bodies: list[bytes] = []
    try:
        for _ in range(count):
            method, _properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            held.append(method.delivery_tag)
            bodies.append(body)
    finally:
        if held:  # one frame puts them all back; closing the connection would too
            channel.basic_nack(delivery_tag=held[-1], multiple=True, requeue=True)
    return bodies


async def _peek_async(queue: aio_pika.abc.AbstractQueue, count: int, timeout: float) -> list[bytes]:
    held: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        for _ in range(count):
            message = await queue.get(no_ack=False, fail=False, timeout=timeout)
            if message is None:
                break
            held.append(message)
        return [message.body for message in held]
    finally:
        for message in reversed(held):
            # If the channel is gone the broker requeues them anyway when the connection closes.
            with contextlib.suppress(Exception):
                await message.reject(requeue=True)


# --- errors: what went wrong and what to change ------------------------------------------------
def _missing(settings: BrokerSettings, queue: str) -> QueueNotFound:
    return QueueNotFound(
        f"RabbitMQ queue '{queue}' does not exist on vhost '{settings.vhost}' at {settings.address}: "
        "check the queue name or start the StudioML client first"
    )


def _login_refused(settings: BrokerSettings) -> BrokerAuthError:
    return BrokerAuthError(
        f"RabbitMQ at {settings.address} refused the login of user '{settings.login}': check the login "
        f"and password of Airflow connection '{settings.conn_id}'"
    )


def _vhost_refused(settings: BrokerSettings, detail: object) -> BrokerAuthError:
    return BrokerAuthError(
        f"RabbitMQ at {settings.address} refused user '{settings.login}' on vhost '{settings.vhost}' "
        f"({detail}): check that the virtual host (the 'Virtual host' field of Airflow connection "
        f"'{settings.conn_id}') exists and that the user has permissions on it"
    )


def _permission_refused(settings: BrokerSettings, queue: str, detail: object) -> BrokerAuthError:
    return BrokerAuthError(
        f"RabbitMQ at {settings.address} refused user '{settings.login}' access to queue '{queue}' on "
        f"vhost '{settings.vhost}' ({detail}): grant the user read and configure permissions there"
    )


def _unreachable(settings: BrokerSettings, detail: object) -> BrokerUnreachable:
    tls = "on" if settings.ssl else "off"
    return BrokerUnreachable(
        f"cannot reach RabbitMQ at {settings.address} ({detail}): check the host and port of Airflow "
        f"connection '{settings.conn_id}', its TLS setting (now {tls}), and that the broker is running"
    )


def _pika_error(
    error: pika.exceptions.AMQPError, settings: BrokerSettings, queue: str | None = None
) -> StudioQueueError:
    if isinstance(error, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)):
        return _login_refused(settings)
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return _vhost_refused(settings, error)
    if isinstance(error, pika.exceptions.ChannelClosedByBroker) and queue is not None:
        if error.reply_code == 404:
            return _missing(settings, queue)
        if error.reply_code == 403:
            return _permission_refused(settings, queue, error.reply_text)
        return StudioQueueError(
            f"RabbitMQ at {settings.address} refused to inspect queue '{queue}' on vhost "
            f"'{settings.vhost}': {error.reply_code} {error.reply_text}"
        )
    return _unreachable(settings, _short(error))


def _aio_connect_error(error: BaseException, settings: BrokerSettings) -> StudioQueueError:
    if isinstance(
        error, (aiormq.exceptions.ProbableAuthenticationError, aiormq.exceptions.AuthenticationError)
    ):
        return _login_refused(settings)
    if isinstance(error, (OSError, asyncio.TimeoutError, aiormq.exceptions.IncompatibleProtocolError)):
        return _unreachable(settings, _short(error))
    if isinstance(error, aiormq.exceptions.AMQPError):
        # The broker answered Connection.Open with Connection.Close: vhost missing or not permitted.
        return _vhost_refused(settings, "the broker closed the connection while opening the vhost")
    return _unreachable(settings, _short(error))


def _aio_operation_error(error: BaseException, settings: BrokerSettings, queue: str) -> StudioQueueError:
    if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity):
        return _missing(settings, queue)
    if isinstance(error, aiormq.exceptions.ChannelAccessRefused):
        return _permission_refused(settings, queue, _short(error))
    if isinstance(error, aiormq.exceptions.ChannelClosed):
        return StudioQueueError(
            f"RabbitMQ at {settings.address} refused to inspect queue '{queue}' on vhost "
            f"'{settings.vhost}': {_short(error)}"
        )
    return _unreachable(settings, f"connection lost: {_short(error)}")


def _short(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, pika.exceptions.AMQPError) and error.args and text in ("", type(error).__name__):
        text = "; ".join(
            repr(arg) for arg in error.args
        )  # pika keeps the cause in args, readable only by repr
    text = text or type(error).__name__
    return text if len(text) <= 300 else text[:299] + "…"


# --- small helpers -----------------------------------------------------------------------------
@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system's trust store, loaded once: reading it per check would block the triggerer each time."""
    return ssl.create_default_context()


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _management_version(settings: BrokerSettings, timeout: float) -> str:
    """RabbitMQ's version from ``/api/overview``; credentials in the URL win over the connection's."""
    parts = urlsplit(settings.management_url)
    auth = (settings.login, settings.password)
    if parts.username is not None:
        auth = (parts.username, parts.password or "")
    response = httpx.get(
        without_userinfo(settings.management_url) + "/api/overview", auth=auth, timeout=timeout
    )
    if response.status_code in (401, 403):
        raise BrokerAuthError(
            f"answered {response.status_code}; the user needs the 'monitoring' or 'management' tag"
        )
    response.raise_for_status()
    return str(response.json().get("rabbitmq_version", "unknown version"))
