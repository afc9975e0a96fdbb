"""A generation's SQS dead letters, past SQS's 10 messages a receive, against moto's SQS server.

SQS has no peek: one receive returns at most 10 messages, and a second may return the same ones.
The queue look (``hooks/queue.py``) hides what it received while it receives more, and shows it
again at the end, so a generation with 25 dead letters sees all 25 and the queue keeps them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from airflow_provider_studio.hooks.queue import QueueInspector
from airflow_provider_studio.triggers.generation import StudioGenerationTrigger
from tests.broker import unique
from tests.provider.connections import set_connection
from tests.runner.client_requests import queued_request
from tests.sqs_queues import sqs_client

DEAD = 25
EVENT_TIMEOUT = 120.0
"""Only a guard against a hung test; nothing here measures speed."""


@pytest.fixture
def aws_conn_id(services, monkeypatch: pytest.MonkeyPatch) -> str:
    """One AWS connection for both stores, as a deployment's would be: S3 at SeaweedFS, SQS at moto."""
    definition = {
        "conn_type": "aws",
        "login": services.s3_access_key,
        "password": services.s3_secret_key,
        "extra": {
            "endpoint_url": services.s3_endpoint,
            "region_name": services.region,
            "service_config": {"sqs": {"endpoint_url": services.sqs_endpoint}},
        },
    }
    return set_connection(monkeypatch, unique("dlq_aws_"), definition)


def dead_letter_queue(services, keys: list[str]) -> tuple[str, Any, str]:
    """A generation queue's ``_rejected`` twin holding one dead letter per key."""
    queue = unique("sqs_gen_")
    sqs = sqs_client(services)
    url = sqs.create_queue(QueueName=f"{queue}_rejected")["QueueUrl"]
    for start in range(0, len(keys), 10):
        entries = [
            {"Id": str(index), "MessageBody": queued_request(key).decode()}
            for index, key in enumerate(keys[start : start + 10])
        ]
        assert not sqs.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")
    return queue, sqs, url


def counts(sqs: Any, url: str) -> tuple[int, int]:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return int(attributes[names[0]]), int(attributes[names[1]])


def keys_of(bodies: tuple[bytes, ...]) -> list[str]:
    return sorted(json.loads(body)["experiment"]["key"] for body in bodies)


async def test_a_look_sees_every_dead_letter_and_leaves_them_all_visible(services, aws_conn_id) -> None:
    keys = sorted(f"dead-{index:02d}" for index in range(DEAD))
    queue, sqs, url = dead_letter_queue(services, keys)
    inspector = QueueInspector(f"{queue}_rejected", aws_conn_id=aws_conn_id)

    state = inspector.state(10_000)
    assert state.depth == DEAD and keys_of(state.bodies) == keys, "each once, none missing"
    assert counts(sqs, url) == (DEAD, 0), "shown again at once, not after the hiding lapses"

    state = await inspector.astate(10_000)
    assert keys_of(state.bodies) == keys
    assert counts(sqs, url) == (DEAD, 0)

    assert len(inspector.state(12).bodies) == 12, "a limit over 10 is still a limit"
    assert len((await inspector.astate(7)).bodies) == 7
    assert counts(sqs, url) == (DEAD, 0)


async def test_the_generation_trigger_counts_all_25_sqs_dead_letters(services, aws_conn_id, bucket) -> None:
    keys = [f"gen-{index:02d}" for index in range(DEAD)]
    # and 5 dead letters of another generation sharing the queue, which must not count
    queue, sqs, url = dead_letter_queue(services, [*keys, *(f"other-{index}" for index in range(5))])
    trigger = StudioGenerationTrigger(keys, bucket, queue, aws_conn_id=aws_conn_id, poll_interval=0.5)
    events = trigger.run()
    try:
        event = (await asyncio.wait_for(anext(events), EVENT_TIMEOUT)).payload
    finally:
        await events.aclose()
    assert event["status"] == "done", event
    assert (event["succeeded"], event["dead_lettered"]) == (0, DEAD)
    assert sorted(event["dead_keys"]) == keys
    assert counts(sqs, url) == (DEAD + 5, 0)
