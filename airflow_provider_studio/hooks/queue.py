"""One StudioML queue's state, RabbitMQ or SQS by its name's prefix, for a worker or the triggerer.

:class:`~airflow_provider_studio.sensors.queue.StudioQueueSensor` pokes with the sync look and
:class:`~airflow_provider_studio.triggers.queue.StudioQueueTrigger` waits with the async one;
both only wait, and everything about reaching a queue, reading it and checking the wait's
settings lives here. Nothing is consumed: a look reads the depth and peeks at the first few
requests, which stay where they were.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from studio_runner.request import decode_request

from airflow_provider_studio.exceptions import (
    BrokerAuthError,
    BrokerUnreachable,
    QueueNotFound,
    StudioQueueError,
)
from airflow_provider_studio.hooks.rabbitmq import QueueState, StudioRabbitMQHook

RABBITMQ_PREFIX = "rmq_"
SQS_PREFIX = "sqs_"
MISSING_QUEUE_CHOICES = ("fail", "wait")
SQS_RECEIVE_LIMIT = 10
"""SQS returns at most 10 messages per receive."""
SQS_PEEK_HIDE_SECONDS = 30
"""How long a peek beyond one receive hides what it received, so the next receive returns others;
they are made visible again as soon as the peek ends, and this bounds the delay if that fails."""

log = logging.getLogger(__name__)
_SQS_MISSING = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_SQS_REFUSED = {
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
}


def queue_backend(queue_name: str) -> str:
    """``rmq`` or ``sqs`` from the StudioML queue-name prefix (runner spec §2.1)."""
    if queue_name.startswith(RABBITMQ_PREFIX):
        return "rmq"
    if queue_name.startswith(SQS_PREFIX):
        return "sqs"
    raise ValueError(
        f"queue name {queue_name!r} does not say where the queue lives: StudioML queue names start with "
        f"'{RABBITMQ_PREFIX}' (RabbitMQ) or '{SQS_PREFIX}' (SQS)"
    )


def check_wait(*, min_messages: int | None, peek: int, missing_queue: str) -> None:
    """ValueError saying which of a wait's settings is wrong; ``min_messages`` None while it is
    still a template (a sensor checks it again once rendered)."""
    if min_messages is not None and int(min_messages) < 1:
        raise ValueError(f"min_messages must be 1 or more, not {min_messages}")
    if int(peek) < 0:
        raise ValueError(f"peek must be 0 or more, not {peek}")
    if missing_queue not in MISSING_QUEUE_CHOICES:
        raise ValueError(f"missing_queue must be one of {MISSING_QUEUE_CHOICES}, not {missing_queue!r}")


def summarise_requests(bodies: Iterable[bytes]) -> dict[str, int]:
    """Resources asked for by the peeked requests; bodies that are not runnable requests are only counted."""
    summary = {
        "peeked": 0,
        "requests": 0,
        "undecodable": 0,
        "cpus": 0,
        "gpus": 0,
        "cards": 0,
        "ram_bytes": 0,
        "hdd_bytes": 0,
    }
    for body in bodies:
        summary["peeked"] += 1
        try:
            resources = decode_request(body).experiment.resources_needed
            needs = {
                "cpus": resources.cpus,
                "gpus": resources.gpus,
                "cards": resources.cards,
                "ram_bytes": resources.ram_bytes,
                "hdd_bytes": resources.hdd_bytes,
            }
        except ValueError:  # RequestError, or a size the model let through but cannot parse
            summary["undecodable"] += 1
            continue
        summary["requests"] += 1
        for key, value in needs.items():
            summary[key] += value
    return summary


class QueueInspector:
    """Looks at one queue, through the connections that reach it; clients are built per look,
    so an inspector holds nothing open and survives a triggerer restart as plain settings."""

    def __init__(
        self,
        queue_name: str,
        *,
        rabbitmq_conn_id: str = StudioRabbitMQHook.default_conn_name,
        aws_conn_id: str | None = "aws_default",
    ) -> None:
        self.queue_name = queue_name
        self.backend = queue_backend(queue_name)
        self.rabbitmq_conn_id = rabbitmq_conn_id
        self.aws_conn_id = aws_conn_id

    def look(self, min_messages: int, peek: int) -> QueueState:
        """Depth, and once it reaches ``min_messages`` up to ``peek`` bodies (a second look)."""
        state = self.state(0)
        if state.depth >= min_messages and peek:
            state = self.state(peek)
        return state

    async def alook(self, min_messages: int, peek: int) -> QueueState:
        """Async twin of :meth:`look`, for the triggerer's event loop."""
        state = await self.astate(0)
        if state.depth >= min_messages and peek:
            state = await self.astate(peek)
        return state

    def state(self, peek_limit: int) -> QueueState:
        if self.backend == "rmq":
            return StudioRabbitMQHook(self.rabbitmq_conn_id).queue_state(self.queue_name, peek_limit)
        from airflow.providers.amazon.aws.hooks.sqs import SqsHook

        client = None
        try:
            client = SqsHook(aws_conn_id=self.aws_conn_id).get_conn()
            url = client.get_queue_url(QueueName=self.queue_name)["QueueUrl"]
            answer = client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
            depth = int(answer.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))
            peek = SqsPeek(peek_limit if depth else 0)
            while (receive := peek.next_receive()) is not None:
                peek.take(client.receive_message(QueueUrl=url, **receive))
        except (ClientError, BotoCoreError) as error:
            raise sqs_error(self.queue_name, self.aws_conn_id, client, error) from error
        for entries in peek.release_batches():
            try:
                peek.released(client.change_message_visibility_batch(QueueUrl=url, Entries=entries))
            except (ClientError, BotoCoreError) as error:
                peek.released(error)
        return QueueState(queue=self.queue_name, depth=depth, bodies=peek.bodies)

    async def astate(self, peek_limit: int) -> QueueState:
        if self.backend == "rmq":
            return await StudioRabbitMQHook(self.rabbitmq_conn_id).aqueue_state(self.queue_name, peek_limit)
        from airflow.providers.amazon.aws.hooks.sqs import SqsHook

        try:
            client_context = await SqsHook(aws_conn_id=self.aws_conn_id).get_async_conn()
        except (ClientError, BotoCoreError) as error:
            raise sqs_error(self.queue_name, self.aws_conn_id, None, error) from error
        async with client_context as client:
            return await sqs_queue_state(client, self.queue_name, peek_limit, self.aws_conn_id)


async def sqs_queue_state(client: Any, queue: str, peek_limit: int, aws_conn_id: str | None) -> QueueState:
    """Depth (ApproximateNumberOfMessages) and up to ``peek_limit`` peeked bodies of an SQS queue, async.

    How a peek leaves the messages is :class:`SqsPeek`'s to say. It raises their
    ApproximateReceiveCount, which only matters for a queue with a redrive policy (StudioML
    clients do not set one).
    """
    try:
        url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
        answer = await client.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        depth = int(answer.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))
        peek = SqsPeek(peek_limit if depth else 0)
        while (receive := peek.next_receive()) is not None:
            peek.take(await client.receive_message(QueueUrl=url, **receive))
    except (ClientError, BotoCoreError) as error:
        raise sqs_error(queue, aws_conn_id, client, error) from error
    for entries in peek.release_batches():
        try:
            peek.released(await client.change_message_visibility_batch(QueueUrl=url, Entries=entries))
        except (ClientError, BotoCoreError) as error:
            peek.released(error)
    return QueueState(queue=queue, depth=depth, bodies=peek.bodies)


class SqsPeek:
    """The receives of one SQS peek of up to ``limit`` messages, for the sync and the async client.

    Up to 10 (one receive) the peek receives with ``VisibilityTimeout=0``: the messages stay
    available to runners. SQS has no peek beyond that: a second receive may return the same
    messages again. So a larger peek (a generation's dead letters, thousands of them) hides
    each batch for :data:`SQS_PEEK_HIDE_SECONDS` while it receives the next, with a 1 s long
    poll (a short poll may miss messages on some SQS servers), deduplicates by ``MessageId``,
    stops at the first receive with nothing new, and then makes every message it hid visible
    again; should that fail, the hiding lapses by itself.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self.single = self.limit <= SQS_RECEIVE_LIMIT
        self._bodies: dict[str, bytes] = {}
        self._handles: dict[str, str] = {}
        self._done = self.limit == 0

    @property
    def bodies(self) -> tuple[bytes, ...]:
        return tuple(self._bodies.values())

    def next_receive(self) -> dict[str, int] | None:
        """The next ``receive_message`` arguments, or None when the peek is complete."""
        if self._done or len(self._bodies) >= self.limit:
            return None
        count = min(SQS_RECEIVE_LIMIT, self.limit - len(self._bodies))
        if self.single:
            return {"MaxNumberOfMessages": count, "VisibilityTimeout": 0, "WaitTimeSeconds": 0}
        return {
            "MaxNumberOfMessages": count,
            "VisibilityTimeout": SQS_PEEK_HIDE_SECONDS,
            "WaitTimeSeconds": 1,
        }

    def take(self, received: Any) -> None:
        new = 0
        for message in received.get("Messages", []):
            if len(self._bodies) >= self.limit:
                break
            if message["MessageId"] not in self._bodies:
                new += 1
                self._bodies[message["MessageId"]] = message["Body"].encode()
            if not self.single:
                self._handles[message["MessageId"]] = message["ReceiptHandle"]  # the latest receive's
        self._done = self.single or new == 0

    def release_batches(self) -> list[list[dict[str, Any]]]:
        """``change_message_visibility_batch`` entries (10 a call) that show the hidden messages again."""
        entries = [
            {"Id": str(index), "ReceiptHandle": handle, "VisibilityTimeout": 0}
            for index, handle in enumerate(self._handles.values())
        ]
        return [
            entries[start : start + SQS_RECEIVE_LIMIT] for start in range(0, len(entries), SQS_RECEIVE_LIMIT)
        ]

    def released(self, answer: Any) -> None:
        """Log what could not be shown again (it shows again when the hiding lapses); never raises."""
        if isinstance(answer, Exception):
            log.warning("peeked SQS messages stay hidden for up to %d s: %s", SQS_PEEK_HIDE_SECONDS, answer)
        elif answer.get("Failed"):
            log.warning(
                "%d peeked SQS messages stay hidden for up to %d s: %s",
                len(answer["Failed"]),
                SQS_PEEK_HIDE_SECONDS,
                answer["Failed"][0].get("Message") or answer["Failed"][0].get("Code"),
            )


def sqs_error(queue: str, aws_conn_id: str | None, client: Any, error: Exception) -> StudioQueueError:
    """A botocore error (sync or async client) as the queue error a person can act on."""
    region = getattr(getattr(client, "meta", None), "region_name", None) or "(no region)"
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or "the default endpoint"
    connection = f"Airflow connection '{aws_conn_id}'" if aws_conn_id else "the default AWS credential chain"
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        detail = str(error.response.get("Error", {}).get("Message", "")) or code
        if code in _SQS_MISSING:
            return QueueNotFound(
                f"SQS queue '{queue}' does not exist in region {region} at {endpoint}: check the queue "
                "name or start the StudioML client first"
            )
        if code in _SQS_REFUSED:
            return BrokerAuthError(
                f"AWS refused {connection} for SQS queue '{queue}' ({code}: {detail}): check its keys or "
                "role, and that it may call sqs:GetQueueUrl, sqs:GetQueueAttributes and sqs:ReceiveMessage (and sqs:ChangeMessageVisibility for peeks over 10)"
            )
        return StudioQueueError(
            f"SQS refused to inspect queue '{queue}' in region {region}: {code}: {detail}"
        )
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return BrokerAuthError(f"no usable AWS credentials in {connection} for SQS queue '{queue}': {error}")
    return BrokerUnreachable(
        f"cannot reach SQS at {endpoint} in region {region} ({error}): check the region and the "
        f"endpoint_url extra of {connection}, and the network"
    )
