"""Wait in the triggerer until every experiment of a queued generation reached a final state.

A look reads the scrape documents of the generation's keys (one listing of the bucket's
``metadata/``, then only documents whose ETag changed) and peeks at ``<queue>_rejected``. The S3
work is blocking boto3, so it runs in a thread; the dead-letter peek uses the async queue look.
The trigger holds only its constructor's arguments, so a triggerer that restarts rebuilds it from
:meth:`serialize` and starts again with a fresh look: nothing is lost, since every look is a
complete reading of the store. Progress (n of N finished) is logged at each change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from airflow_provider_studio.exceptions import QueueNotFound, StudioQueueError
from airflow_provider_studio.generation import (
    Standing,
    dead_lettered_keys,
    discount_earlier_attempts,
    standing,
)
from airflow_provider_studio.hooks.queue import QueueInspector
from airflow_provider_studio.hooks.rabbitmq import StudioRabbitMQHook
from airflow_provider_studio.scrape_collection import ScrapeCollector, Wanted, scrape_client

DEAD_LETTER_PEEK_LIMIT = 10_000
"""At most this many dead letters are read per look (RabbitMQ and SQS alike)."""


class StudioGenerationTrigger(BaseTrigger):
    """Fires when all ``keys`` succeeded or were dead-lettered, or when ``timeout`` passes.

    :param keys: the generation's experiment keys (all of them, also those already succeeded).
    :param bucket: the results bucket whose ``metadata/`` folder the runners write to.
    :param queue_name: the ``rmq_``/``sqs_`` queue the requests went to; its ``_rejected`` twin
        holds the dead letters.
    :param deadline: epoch seconds after which the trigger reports what finished so far.
    :param published_after: epoch seconds before this run published; older dead letters
        (an earlier run's) do not count.
    :param attempts_before: key → attempts it had before this run published it again; until
        it has more, its latest attempt is an earlier run's and does not count.
    """

    def __init__(
        self,
        keys: list[str],
        bucket: str,
        queue_name: str,
        *,
        aws_conn_id: str | None = "aws_default",
        rabbitmq_conn_id: str = StudioRabbitMQHook.default_conn_name,
        poll_interval: float = 30.0,
        deadline: float | None = None,
        published_after: float | None = None,
        attempts_before: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if float(poll_interval) <= 0:
            raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval}")
        self.keys = list(keys)
        self.bucket = bucket
        self.queue_name = queue_name
        self.aws_conn_id = aws_conn_id
        self.rabbitmq_conn_id = rabbitmq_conn_id
        self.poll_interval = float(poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.published_after = None if published_after is None else float(published_after)
        self.attempts_before = {str(key): int(count) for key, count in (attempts_before or {}).items()}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "keys": list(self.keys),
                "bucket": self.bucket,
                "queue_name": self.queue_name,
                "aws_conn_id": self.aws_conn_id,
                "rabbitmq_conn_id": self.rabbitmq_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "published_after": self.published_after,
                "attempts_before": dict(self.attempts_before),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            rejected = QueueInspector(
                f"{self.queue_name}_rejected",
                rabbitmq_conn_id=self.rabbitmq_conn_id,
                aws_conn_id=self.aws_conn_id,
            )
            client = await sync_to_async(self._s3_client)()
        except Exception as error:  # a bad queue name or AWS connection: the task says why
            yield self._event("error", None, f"cannot watch the generation: {error}")
            return
        wanted = [Wanted(key=key) for key in self.keys]
        last: Standing | None = None
        with ScrapeCollector(client, fields=()) as collector:
            while True:
                try:
                    dead = await self._dead_letters(rejected)
                    table = await asyncio.to_thread(collector.collect, wanted, bucket=self.bucket)
                except StudioQueueError as error:
                    yield self._event("error", last, str(error))
                    return
                discount_earlier_attempts(table.rows, self.attempts_before)
                now = standing(table, dead)
                if now != last:
                    self.log.info("%s (queue %s)", now.line(), self.queue_name)
                    last = now
                if now.done:
                    yield self._event("done", now)
                    return
                if self.deadline is not None and time.time() >= self.deadline:
                    yield self._event("timeout", now)
                    return
                await asyncio.sleep(self.poll_interval)

    def _s3_client(self) -> Any:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return scrape_client(S3Hook(aws_conn_id=self.aws_conn_id), max_workers=8)

    async def _dead_letters(self, rejected: QueueInspector) -> set[str]:
        """Our keys among the dead letters; none while the runner has dead-lettered nothing."""
        try:
            depth = (await rejected.astate(0)).depth
            if not depth:
                return set()
            state = await rejected.astate(min(depth, DEAD_LETTER_PEEK_LIMIT))
        except QueueNotFound:
            return set()
        return dead_lettered_keys(state.bodies, self.keys, self.published_after)

    def _event(self, status: str, now: Standing | None, message: str | None = None) -> TriggerEvent:
        payload: dict[str, Any] = {"status": status, "queue": self.queue_name, "total": len(self.keys)}
        if now is not None:
            payload.update(
                succeeded=now.succeeded, dead_lettered=now.dead_lettered, dead_keys=list(now.dead_keys)
            )
        if message is not None:
            payload["message"] = message
        return TriggerEvent(payload)
