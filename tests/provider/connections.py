"""Airflow connections for provider tests, given as ``AIRFLOW_CONN_<ID>`` environment JSON."""

from __future__ import annotations

import json
import socket

import pika
import pytest

from devtools.services import Endpoints


def rabbitmq_connection(
    services: Endpoints, *, password: str = "guest", port: int | None = None, vhost: str = "/"
) -> dict[str, object]:
    """A ``studio_rabbitmq`` connection to the session's broker (or a wrong port or password)."""
    return {
        "conn_type": "studio_rabbitmq",
        "host": "127.0.0.1",
        "port": port or pika.URLParameters(services.amqp_url).port,
        "login": "guest",
        "password": password,
        "schema": vhost,
        "extra": {"management_url": services.amqp_management_url},
    }


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, definition: dict[str, object]) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(definition))
    return conn_id


def closed_port() -> int:
    """A loopback port nothing listens on, for an unreachable broker."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
