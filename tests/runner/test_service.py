"""The serve loop with small real handlers, over real directory queues, RabbitMQ and moto SQS."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from studio_runner.outcome import Outcome, Status
from studio_runner.queues.localdir import LocalDirTransport, publish
from studio_runner.queues.rabbitmq import RabbitMQTransport
from studio_runner.queues.sqs import SqsTransport
from studio_runner.service import Message, QueueMatcher, RunnerState, Service, ServiceSummary

from devtools.services import Endpoints
from tests.broker import management, publish_like_client
from tests.polling import wait_for
from tests.sqs_queues import sqs_client

pytestmark = pytest.mark.timeout(60)

FAST = {"poll_interval": 0.05, "max_poll_interval": 0.2, "refresh_interval": 0.2}


def only(*queues: str) -> QueueMatcher:
    """Match just this test's queues: the brokers are shared with every other test."""
    return QueueMatcher(match="^(" + "|".join(re.escape(q) for q in queues) + ")$")


def returning(status: Status, reason: str = "") -> Callable[..., Outcome]:
    def handler(message: Message) -> Outcome:
        return Outcome(status, reason=reason)

    return handler


class Background:
    """``service.run()`` on a thread, so the test can steer it."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.summary: ServiceSummary | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.summary = self.service.run()

    def result(self, timeout: float = 30.0) -> ServiceSummary:
        self.thread.join(timeout)
        assert self.summary is not None, "run() did not return"
        return self.summary


def waiting(root: Path, queue: str) -> list[Path]:
    folder = root / queue
    return (
        sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if folder.exists()
        else []
    )


# --- matcher ------------------------------------------------------------------------------------
def test_matcher_follows_queue_match_and_mismatch() -> None:
    matcher = QueueMatcher()
    assert all(matcher(q) for q in ("rmq_a", "sqs_b", "local_c"))
    assert not any(matcher(q) for q in ("amq.gen-1", "other_rmq_a", "rmq_a_response", "sqs_b_rejected"))
    assert not QueueMatcher(mismatch="^rmq_test")("rmq_test_1")
    assert QueueMatcher(mismatch="^rmq_test")("rmq_prod_1")
    assert QueueMatcher(match="gpu")("rmq_gpu_big")  # unanchored, like upstream's Go regexp
    with pytest.raises(ValueError, match="--queue-match"):
        QueueMatcher(match="(")


# --- outcomes and settling ----------------------------------------------------------------------
def test_successes_are_acked_and_limit_tasks_ends_the_run(tmp_path: Path) -> None:
    for n in range(3):
        publish(tmp_path, "local_ok", f"m{n}")
    service = Service(
        [LocalDirTransport(tmp_path)], QueueMatcher(), returning(Status.SUCCEEDED), limit_tasks=3, **FAST
    )
    summary = service.run()
    assert (summary.ended_by, summary.handled, summary.statuses) == ("limit_tasks", 3, {"succeeded": 3})
    assert waiting(tmp_path, "local_ok") == []


def test_failures_retry_until_max_attempts_then_dead_letter(tmp_path: Path) -> None:
    publish(tmp_path, "local_fails", b"request")
    seen: list[int] = []

    def handler(message: Message) -> Outcome:
        seen.append(message.attempts)
        return Outcome(Status.FAILED, reason="exit code 1")

    service = Service(
        [LocalDirTransport(tmp_path)], QueueMatcher(), handler, max_attempts=3, limit_tasks=3, **FAST
    )
    summary = service.run()
    assert seen == [1, 2, 3]
    assert summary.statuses == {"failed": 3}
    assert waiting(tmp_path, "local_fails") == []
    dead = LocalDirTransport(tmp_path).get("local_fails_rejected")
    assert dead.body == b"request"
    assert dead.headers["reason"] == "failed after 3 attempts: failed: exit code 1"


def test_invalid_requests_are_dead_lettered_at_once(tmp_path: Path) -> None:
    publish(tmp_path, "local_bad", b"not json")
    service = Service(
        [LocalDirTransport(tmp_path)],
        QueueMatcher(),
        returning(Status.INVALID, "body is not JSON"),
        limit_tasks=1,
        **FAST,
    )
    assert service.run().statuses == {"invalid": 1}
    assert (
        LocalDirTransport(tmp_path).get("local_bad_rejected").headers["reason"] == "invalid: body is not JSON"
    )


def test_a_handler_exception_is_an_infrastructure_error_and_the_service_carries_on(tmp_path: Path) -> None:
    publish(tmp_path, "local_flaky", b"request")
    calls: list[int] = []

    def handler(message: Message) -> Outcome:
        calls.append(message.attempts)
        if len(calls) == 1:
            raise OSError("disk full")
        return Outcome(Status.SUCCEEDED)

    service = Service([LocalDirTransport(tmp_path)], QueueMatcher(), handler, limit_tasks=2, **FAST)
    summary = service.run()
    assert calls == [1, 2]  # counted as an attempt, then retried
    assert summary.statuses == {"infrastructure_error": 1, "succeeded": 1}
    assert waiting(tmp_path, "local_flaky") == []


# --- stopping and limits ------------------------------------------------------------------------
def test_stop_cancels_running_work_and_interrupted_work_goes_back(tmp_path: Path) -> None:
    publish(tmp_path, "local_long", b"request")
    started = threading.Event()

    def handler(message: Message) -> Outcome:
        started.set()
        message.cancel.wait()
        return Outcome(Status.INTERRUPTED, reason="runner stopping")

    service = Service([LocalDirTransport(tmp_path)], QueueMatcher(), handler, **FAST)
    background = Background(service)
    assert started.wait(10)
    service.stop(grace_seconds=10)
    summary = background.result()
    assert (summary.ended_by, summary.statuses, summary.abandoned) == ("stopped", {"interrupted": 1}, 0)
    again = LocalDirTransport(tmp_path).get("local_long")
    assert (again.body, again.attempts) == (b"request", 1)  # requeued, not counted


def test_work_that_ignores_cancel_is_given_back_after_the_grace_period(tmp_path: Path) -> None:
    publish(tmp_path, "local_stuck", b"request")
    started, release = threading.Event(), threading.Event()

    def handler(message: Message) -> Outcome:
        started.set()
        release.wait(30)
        return Outcome(Status.SUCCEEDED)

    service = Service([LocalDirTransport(tmp_path)], QueueMatcher(), handler, **FAST)
    background = Background(service)
    try:
        assert started.wait(10)
        service.stop(grace_seconds=0.5)
        summary = background.result()
    finally:
        release.set()
    assert (summary.ended_by, summary.abandoned, summary.statuses) == ("stopped", 1, {})
    assert LocalDirTransport(tmp_path).get("local_stuck").body == b"request"


def test_limit_idle_returns_when_nothing_arrives(tmp_path: Path) -> None:
    (tmp_path / "local_quiet").mkdir()
    service = Service(
        [LocalDirTransport(tmp_path)],
        QueueMatcher(),
        returning(Status.SUCCEEDED),
        limit_idle_seconds=0.5,
        **FAST,
    )
    assert service.run().ended_by == "limit_idle"


def test_drain_lets_running_work_finish_and_takes_no_more(tmp_path: Path) -> None:
    publish(tmp_path, "local_drain", b"first")
    publish(tmp_path, "local_drain", b"second")
    started, release = threading.Event(), threading.Event()

    def handler(message: Message) -> Outcome:
        started.set()
        release.wait(30)
        return Outcome(Status.INTERRUPTED if message.cancel.is_set() else Status.SUCCEEDED)

    service = Service([LocalDirTransport(tmp_path)], QueueMatcher(), handler, **FAST)
    background = Background(service)
    assert started.wait(10)
    service.drain()
    release.set()
    summary = background.result()
    assert (summary.ended_by, summary.statuses) == ("drained", {"succeeded": 1})
    assert [p.read_bytes() for p in waiting(tmp_path, "local_drain")] == [b"second"]


def test_kubernetes_states_suspend_resume_and_terminate(tmp_path: Path) -> None:
    handled = threading.Event()

    def handler(message: Message) -> Outcome:
        handled.set()
        return Outcome(Status.SUCCEEDED)

    service = Service([LocalDirTransport(tmp_path)], QueueMatcher(), handler, **FAST)
    service.set_state("DrainAndSuspend")
    publish(tmp_path, "local_k8s", b"request")
    background = Background(service)
    assert not handled.wait(1.0)  # suspended: the message waits
    assert len(waiting(tmp_path, "local_k8s")) == 1
    service.set_state(RunnerState.RUNNING)
    assert handled.wait(10)
    service.set_state("DrainAndTerminate")
    summary = background.result()
    assert (summary.ended_by, summary.statuses) == ("drain_and_terminate", {"succeeded": 1})
    with pytest.raises(ValueError, match="DrainAndSuspend"):
        service.set_state("Paused")


# --- concurrency --------------------------------------------------------------------------------
def test_one_message_in_flight_per_queue(tmp_path: Path) -> None:
    for n in range(4):
        publish(tmp_path, "local_serial", f"m{n}")
    lock = threading.Lock()
    running, most = [0], [0]

    def handler(message: Message) -> Outcome:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        message.cancel.wait(0.1)  # long enough for a second fetch to overlap, if the service allowed one
        with lock:
            running[0] -= 1
        return Outcome(Status.SUCCEEDED)

    summary = Service([LocalDirTransport(tmp_path)], QueueMatcher(), handler, limit_tasks=4, **FAST).run()
    assert summary.statuses == {"succeeded": 4}
    assert most[0] == 1


def test_queues_of_every_transport_are_serviced_concurrently(tmp_path: Path, services: Endpoints) -> None:
    rmq_queue, sqs_queue = f"rmq_svc_{uuid.uuid4().hex[:8]}", f"sqs_svc_{uuid.uuid4().hex[:8]}"
    publish_like_client(services.amqp_url, rmq_queue, [b"via rabbitmq"])
    sqs = SqsTransport(endpoint_url=services.sqs_endpoint, region=services.region, wait_seconds=0)
    client = sqs_client(services)
    client.send_message(QueueUrl=client.create_queue(QueueName=sqs_queue)["QueueUrl"], MessageBody="via sqs")
    publish(tmp_path, "local_svc", b"via directory")
    blocked = "local_svc_blocked"
    publish(tmp_path, blocked, b"does not fit")

    everyone = threading.Barrier(3, timeout=20)
    bodies: dict[str, bytes] = {}

    def handler(message: Message) -> Outcome:
        bodies[message.queue] = message.body
        everyone.wait()  # only passes if all three run at the same time
        return Outcome(Status.SUCCEEDED)

    transports = [
        RabbitMQTransport(services.amqp_url, services.amqp_management_url),
        sqs,
        LocalDirTransport(tmp_path),
    ]
    service = Service(
        transports,
        only(rmq_queue, sqs_queue, "local_svc", blocked),
        handler,
        limit_tasks=3,
        capacity=lambda queue: queue != blocked,
        **FAST,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        summary = service.run()
    assert summary.statuses == {"succeeded": 3}
    assert bodies == {rmq_queue: b"via rabbitmq", sqs_queue: b"via sqs", "local_svc": b"via directory"}
    assert len(waiting(tmp_path, blocked)) == 1  # the capacity check kept it waiting


def test_a_failed_settle_loses_nothing(services: Endpoints) -> None:
    queue = f"rmq_settle_{uuid.uuid4().hex[:8]}"
    publish_like_client(services.amqp_url, queue, [b"precious"], persistent=True)
    first_run, carry_on = threading.Event(), threading.Event()
    bodies: list[bytes] = []

    def handler(message: Message) -> Outcome:
        bodies.append(message.body)
        first_run.set()
        carry_on.wait(20)
        return Outcome(Status.SUCCEEDED)

    transport = RabbitMQTransport(services.amqp_url, services.amqp_management_url)
    service = Service([transport], only(queue), handler, limit_tasks=2, **FAST)
    background = Background(service)
    assert first_run.wait(10)

    def holding_connections() -> list[str]:
        return [
            c["name"]
            for c in management(services.amqp_management_url, "/api/connections")
            if c.get("client_properties", {}).get("connection_name") == f"studio-runner {queue}"
        ]

    names = wait_for(holding_connections, 15, "the connection holding the message")
    assert names
    for name in names:  # the broker drops the connection that holds the message
        management(services.amqp_management_url, f"/api/connections/{quote(name, safe='')}", method="DELETE")
    carry_on.set()
    summary = background.result()
    assert bodies == [b"precious", b"precious"]  # redelivered, run again, then acked
    assert (summary.handled, summary.settle_failures, summary.statuses) == (2, 1, {"succeeded": 2})
    assert transport.get(queue) is None
