"""Wait in the triggerer until a StudioML queue holds enough requests, then say what they ask for.

Everything in ``run()`` is async (aio-pika for ``rmq_`` queues, aiobotocore through the amazon
provider's ``SqsHook`` for ``sqs_`` queues), because one blocking call stalls every trigger in
the triggerer. Nothing is consumed: the trigger only reads the depth and peeks at the first
few requests, so it is safe to kill and re-create at any time. Errors are yielded as events,
not raised, so the task fails with the message rather than a triggerer traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
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
SQS_PEEK_LIMIT = 10
"""SQS returns at most 10 messages per receive; a second receive could return the same ones."""

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
                "role, and that it may call sqs:GetQueueUrl, sqs:GetQueueAttributes and sqs:ReceiveMessage"
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


async def sqs_queue_state(client: Any, queue: str, peek_limit: int, aws_conn_id: str | None) -> QueueState:
    """Depth (ApproximateNumberOfMessages) and up to 10 peeked bodies of an SQS queue, async.

    Peeking receives with ``VisibilityTimeout=0``, so the messages stay available to runners;
    it does raise their ApproximateReceiveCount, which only matters for a queue with a
    redrive policy (StudioML clients do not set one).
    """
    try:
        url = (await client.get_queue_url(QueueName=queue))["QueueUrl"]
        answer = await client.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        depth = int(answer.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))
        bodies: list[bytes] = []
        count = min(peek_limit, SQS_PEEK_LIMIT, depth)
        if count > 0:
            received = await client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=count, VisibilityTimeout=0, WaitTimeSeconds=0
            )
            bodies = [message["Body"].encode() for message in received.get("Messages", [])]
    except (ClientError, BotoCoreError) as error:
        raise sqs_error(queue, aws_conn_id, client, error) from error
    return QueueState(queue=queue, depth=depth, bodies=tuple(bodies))


class StudioQueueTrigger(BaseTrigger):
    """Fires once ``queue_name`` holds at least ``min_messages`` requests ready for a runner.

    :param queue_name: ``rmq_…`` (RabbitMQ) or ``sqs_…`` (SQS) StudioML queue.
    :param min_messages: how many ready requests to wait for.
    :param rabbitmq_conn_id: ``studio_rabbitmq`` connection for ``rmq_`` queues.
    :param aws_conn_id: AWS connection for ``sqs_`` queues (its ``endpoint_url`` extra is honoured).
    :param peek: how many requests to look at for the resources summary (0: none; SQS: at most 10).
    :param poll_interval: seconds between checks.
    :param missing_queue: ``fail`` on a queue that does not exist, or ``wait`` for a client to create it.
    """

    def __init__(
        self,
        queue_name: str,
        min_messages: int = 1,
        *,
        rabbitmq_conn_id: str = StudioRabbitMQHook.default_conn_name,
        aws_conn_id: str | None = "aws_default",
        peek: int = 10,
        poll_interval: float = 30.0,
        missing_queue: str = "fail",
    ) -> None:
        super().__init__()
        if int(min_messages) < 1:
            raise ValueError(f"min_messages must be 1 or more, not {min_messages}")
        if int(peek) < 0:
            raise ValueError(f"peek must be 0 or more, not {peek}")
        if float(poll_interval) <= 0:
            raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval}")
        if missing_queue not in MISSING_QUEUE_CHOICES:
            raise ValueError(f"missing_queue must be one of {MISSING_QUEUE_CHOICES}, not {missing_queue!r}")
        self.queue_name = queue_name
        self.min_messages = int(min_messages)
        self.rabbitmq_conn_id = rabbitmq_conn_id
        self.aws_conn_id = aws_conn_id
        self.peek = int(peek)
        self.poll_interval = float(poll_interval)
        self.missing_queue = missing_queue

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "queue_name": self.queue_name,
                "min_messages": self.min_messages,
                "rabbitmq_conn_id": self.rabbitmq_conn_id,
                "aws_conn_id": self.aws_conn_id,
                "peek": self.peek,
                "poll_interval": self.poll_interval,
                "missing_queue": self.missing_queue,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            look = self._looker(queue_backend(self.queue_name))
        except ValueError as error:
            yield self._error(str(error))
            return
        self.log.info(
            "Waiting for %d request(s) in queue '%s', checking every %g s",
            self.min_messages,
            self.queue_name,
            self.poll_interval,
        )
        announced_missing = False
        while True:
            try:
                state = await look(0)
                if state.depth >= self.min_messages and self.peek:
                    state = await look(self.peek)  # a second look, only once there is something to see
            except QueueNotFound as error:
                if self.missing_queue == "fail":
                    yield self._error(str(error))
                    return
                if not announced_missing:
                    self.log.info("%s; waiting for it to be created (missing_queue='wait')", error)
                    announced_missing = True
            except StudioQueueError as error:
                yield self._error(str(error))
                return
            except Exception as error:
                self.log.exception("Unexpected error while checking queue '%s'", self.queue_name)
                yield self._error(f"unexpected error while checking queue '{self.queue_name}': {error!r}")
                return
            else:
                if state.depth >= self.min_messages:
                    resources = await asyncio.to_thread(summarise_requests, state.bodies)
                    self.log.info(
                        "Queue '%s' holds %d request(s); resources %s",
                        self.queue_name,
                        state.depth,
                        resources,
                    )
                    yield TriggerEvent(
                        {
                            "status": "success",
                            "queue": self.queue_name,
                            "depth": state.depth,
                            "resources": resources,
                        }
                    )
                    return
                self.log.debug(
                    "Queue '%s' holds %d of %d request(s)", self.queue_name, state.depth, self.min_messages
                )
            await asyncio.sleep(self.poll_interval)

    def _looker(self, backend: str) -> Callable[[int], Awaitable[QueueState]]:
        """One async look at the queue, ``peek_limit -> QueueState``; clients are rebuilt per look."""
        if backend == "rmq":
            hook = StudioRabbitMQHook(self.rabbitmq_conn_id)

            async def look_rabbitmq(peek_limit: int) -> QueueState:
                return await hook.aqueue_state(self.queue_name, peek_limit)

            return look_rabbitmq

        from airflow.providers.amazon.aws.hooks.sqs import SqsHook

        sqs = SqsHook(aws_conn_id=self.aws_conn_id)

        async def look_sqs(peek_limit: int) -> QueueState:
            try:
                client_context = await sqs.get_async_conn()
            except (ClientError, BotoCoreError) as error:
                raise sqs_error(self.queue_name, self.aws_conn_id, None, error) from error
            async with client_context as client:
                return await sqs_queue_state(client, self.queue_name, peek_limit, self.aws_conn_id)

        return look_sqs

    def _error(self, message: str) -> TriggerEvent:
        return TriggerEvent({"status": "error", "queue": self.queue_name, "message": message})
