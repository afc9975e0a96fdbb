"""RabbitMQ as the StudioML client uses it (STUDIOML_CLIENT.md), for tests on both sides.

The client declares the topic exchange durable and auto-deleting, its queue non-durable unless
persistent, binds ``StudioML.<queue>``, and publishes mandatory messages with confirms.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import pika

from devtools.services import Endpoints

EXCHANGE = "StudioML.topic"


def unique_queue(stem: str = "rmq_t") -> str:
    return f"{stem}_{uuid.uuid4().hex[:10]}"


def unique(prefix: str) -> str:
    """A fresh name (queue, connection id, task id) for one test: ``prefix`` plus ten hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def declare_like_client(amqp_url: str, queue: str, *, persistent: bool = False) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
        channel.queue_declare(queue, durable=persistent)
        channel.queue_bind(queue, EXCHANGE, routing_key=f"StudioML.{queue}")
    finally:
        connection.close()


def publish_like_client(
    amqp_url: str, queue: str, bodies: Iterable[bytes], *, persistent: bool = False
) -> None:
    """Each message is queued when this returns (publisher confirms, mandatory routing)."""
    declare_like_client(amqp_url, queue, persistent=persistent)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(
            content_type="application/json", app_id="studioml", delivery_mode=2 if persistent else 1
        )
        for body in bodies:
            channel.basic_publish(EXCHANGE, f"StudioML.{queue}", body, properties, mandatory=True)
    finally:
        connection.close()


def drain(amqp_url: str, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Consume everything in ``queue``: ``(body, headers)`` pairs."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    messages = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((body, dict(properties.headers or {})))
    finally:
        if connection.is_open:
            connection.close()


def management(management_url: str, path: str, method: str = "GET", body: Any = None) -> Any:
    """A call to the management HTTP API (credentials taken from the URL)."""
    parts = urlsplit(management_url)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{parts.hostname}:{parts.port}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read()
    return json.loads(text) if text else None


def queue_depth(management_url: str, queue: str) -> int:
    """Ready plus unacknowledged messages, as the broker counts them now."""
    info = management(management_url, f"/api/queues/%2F/{queue}")
    return int(info.get("messages_ready", 0)) + int(info.get("messages_unacknowledged", 0))


def drain_bodies(amqp_url: str, queue: str) -> list[bytes]:
    return [body for body, _headers in drain(amqp_url, queue)]


def dead_letters(services: Endpoints, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Consume what the runner dead-lettered for ``queue``; empty until it has dead-lettered any."""
    try:
        management(services.amqp_management_url, f"/api/queues/%2F/{queue}_rejected")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return []
        raise
    return drain(services.amqp_url, f"{queue}_rejected")
