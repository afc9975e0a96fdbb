"""Queue transports behind one interface: RabbitMQ (``rmq_``), SQS (``sqs_``) and directories (``local_``)."""

from __future__ import annotations

from .base import (
    DEAD_LETTER_SUFFIX,
    NON_WORK_SUFFIXES,
    RESPONSE_SUFFIX,
    Delivery,
    DeliveryLost,
    QueueError,
    Transport,
    dead_letter_queue,
)

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "NON_WORK_SUFFIXES",
    "RESPONSE_SUFFIX",
    "Delivery",
    "DeliveryLost",
    "QueueError",
    "Transport",
    "dead_letter_queue",
]
