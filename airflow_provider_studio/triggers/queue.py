"""Wait in the triggerer until a StudioML queue holds enough requests, then say what they ask for.

Everything in ``run()`` is async (:meth:`QueueInspector.alook
<airflow_provider_studio.hooks.queue.QueueInspector.alook>`), because one blocking call stalls
every trigger in the triggerer. Nothing is consumed, so it is safe to kill and re-create at any
time. Errors are yielded as events, not raised, so the task fails with the message rather than a
triggerer traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_studio.exceptions import QueueNotFound, StudioQueueError
from airflow_provider_studio.hooks.queue import QueueInspector, check_wait, summarise_requests
from airflow_provider_studio.hooks.rabbitmq import StudioRabbitMQHook


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
        check_wait(min_messages=min_messages, peek=peek, missing_queue=missing_queue)
        if float(poll_interval) <= 0:
            raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval}")
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
            queue = QueueInspector(
                self.queue_name, rabbitmq_conn_id=self.rabbitmq_conn_id, aws_conn_id=self.aws_conn_id
            )
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
                state = await queue.alook(self.min_messages, self.peek)
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

    def _error(self, message: str) -> TriggerEvent:
        return TriggerEvent({"status": "error", "queue": self.queue_name, "message": message})
