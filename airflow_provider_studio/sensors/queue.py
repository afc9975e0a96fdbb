"""Wait until a StudioML queue holds enough experiment requests, and report what they ask for.

Deferrable by default (``deferrable=False`` polls on a worker): waiting for external clients can
take hours, and in the triggerer it costs no worker slot. Both modes return the same XCom, ``{"queue", "depth",
"resources"}``, so a capacity task downstream (how many GPU runners to start) does not care how
the sensor waited. Nothing is consumed from the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowException

from airflow_provider_studio.exceptions import QueueNotFound
from airflow_provider_studio.hooks.queue import QueueInspector, check_wait, summarise_requests
from airflow_provider_studio.hooks.rabbitmq import StudioRabbitMQHook
from airflow_provider_studio.triggers.queue import StudioQueueTrigger


class StudioQueueSensor(BaseSensorOperator):
    """Succeeds once ``queue_name`` holds at least ``min_messages`` requests ready for a runner.

    Returns (pushes as XCom) ``{"queue": name, "depth": n, "resources": {...}}``, where
    ``resources`` sums cpus, gpus, cards, ram_bytes and hdd_bytes over the first ``peek``
    requests and counts those that are not runnable requests as ``undecodable``.

    :param queue_name: ``rmq_…`` (RabbitMQ) or ``sqs_…`` (SQS) StudioML queue. Templated.
    :param min_messages: (templated) how many ready requests to wait for.
    :param rabbitmq_conn_id: ``studio_rabbitmq`` connection for ``rmq_`` queues.
    :param aws_conn_id: AWS connection for ``sqs_`` queues (its ``endpoint_url`` extra is honoured).
    :param peek: how many requests to read for the resources summary; they stay in the queue
        (0: none; SQS: at most 10).
    :param poll_interval: seconds between checks in both modes; sets ``poke_interval``.
    :param deferrable: wait in the triggerer instead of on a worker.
    :param missing_queue: ``fail`` on a queue that does not exist, or ``wait`` until a StudioML
        client creates it.
    """

    template_fields: Sequence[str] = ("queue_name", "min_messages")
    ui_color = "#c9e7f5"

    def __init__(
        self,
        *,
        queue_name: str,
        min_messages: int | str = 1,
        rabbitmq_conn_id: str = StudioRabbitMQHook.default_conn_name,
        aws_conn_id: str | None = "aws_default",
        peek: int = 10,
        poll_interval: float | None = None,
        deferrable: bool = True,
        missing_queue: str = "fail",
        **kwargs: Any,
    ) -> None:
        if poll_interval is not None:
            kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        # a template is checked once rendered
        check_wait(
            min_messages=None if isinstance(min_messages, str) else min_messages,
            peek=peek,
            missing_queue=missing_queue,
        )
        self.queue_name = queue_name
        self.min_messages = min_messages
        self.rabbitmq_conn_id = rabbitmq_conn_id
        self.aws_conn_id = aws_conn_id
        self.peek = int(peek)
        self.deferrable = deferrable
        self.missing_queue = missing_queue

    # --- deferrable path -------------------------------------------------------------------
    def execute(self, context: Context) -> Any:
        self._queue()  # a queue name without rmq_/sqs_ fails here, before any waiting
        self.min_messages = int(self.min_messages)  # rendered from a template, e.g. a trigger-form param
        check_wait(min_messages=self.min_messages, peek=self.peek, missing_queue=self.missing_queue)
        if not self.deferrable:
            return super().execute(context)
        self.defer(
            trigger=StudioQueueTrigger(
                queue_name=self.queue_name,
                min_messages=self.min_messages,
                rabbitmq_conn_id=self.rabbitmq_conn_id,
                aws_conn_id=self.aws_conn_id,
                peek=self.peek,
                poll_interval=max(self.poke_interval, 0.1),
                missing_queue=self.missing_queue,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resumed from the trigger: its error message becomes the task's, its findings the XCom."""
        status = event.get("status") if isinstance(event, dict) else None
        if status == "error":
            raise AirflowException(
                str(event.get("message") or f"queue '{self.queue_name}' could not be checked")
            )
        try:
            if status != "success":
                raise KeyError("status")
            result = {"queue": event["queue"], "depth": event["depth"], "resources": event["resources"]}
        except KeyError:
            raise AirflowException(
                f"StudioQueueTrigger sent an event this sensor cannot read: {event!r}"
            ) from None
        self.log.info("Queue '%s' holds %s request(s)", result["queue"], result["depth"])
        return result

    # --- poke path -------------------------------------------------------------------------
    def poke(self, context: Context) -> bool | PokeReturnValue:
        try:
            state = self._queue().look(self.min_messages, self.peek)
        except QueueNotFound as error:
            if self.missing_queue == "fail":
                raise
            self.log.info("%s; waiting for it to be created (missing_queue='wait')", error)
            return False
        if state.depth < self.min_messages:
            self.log.info(
                "Queue '%s' holds %d of %d request(s)", self.queue_name, state.depth, self.min_messages
            )
            return False
        self.log.info("Queue '%s' holds %d request(s)", self.queue_name, state.depth)
        resources = summarise_requests(state.bodies)
        return PokeReturnValue(
            is_done=True, xcom_value={"queue": self.queue_name, "depth": state.depth, "resources": resources}
        )

    def _queue(self) -> QueueInspector:
        try:
            return QueueInspector(
                self.queue_name, rabbitmq_conn_id=self.rabbitmq_conn_id, aws_conn_id=self.aws_conn_id
            )
        except ValueError as error:
            raise AirflowException(str(error)) from None
