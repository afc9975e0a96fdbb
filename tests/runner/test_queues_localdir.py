"""Directory queues on real directories, including a runner process killed while it holds a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from studio_runner.queues.localdir import INFLIGHT, LocalDirTransport, publish
from studio_runner.service import QueueMatcher


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "queues"


@pytest.fixture
def transport(root: Path) -> LocalDirTransport:
    return LocalDirTransport(root)


def test_discovery_lists_directories_and_the_matcher_picks_work_queues(
    root: Path, transport: LocalDirTransport
) -> None:
    assert transport.discover() == []  # the root does not exist yet
    for name in ("local_a", "local_a_response", "local_a_rejected", "local_b", "other", ".hidden"):
        (root / name).mkdir(parents=True)
    (root / "local_file").write_text("a file is not a queue")

    names = transport.discover()
    assert names == ["local_a", "local_a_rejected", "local_a_response", "local_b", "other"]
    assert [n for n in names if QueueMatcher()(n)] == ["local_a", "local_b"]
    assert [n for n in names if QueueMatcher(mismatch="_b$")(n)] == ["local_a"]
    assert transport.exists("local_a") and not transport.exists("local_c")


def test_get_then_ack_removes_the_message(root: Path, transport: LocalDirTransport) -> None:
    publish(root, "local_q", b'{"experiment": {"key": "k1"}}')
    delivery = transport.get("local_q")
    assert delivery is not None
    assert (delivery.queue, delivery.body, delivery.attempts, delivery.redelivered) == (
        "local_q",
        b'{"experiment": {"key": "k1"}}',
        1,
        False,
    )
    assert transport.get("local_q") is None  # held: nobody else sees it
    delivery.ack()
    assert transport.get("local_q") is None
    assert os.listdir(root / "local_q" / INFLIGHT) == []


def test_messages_come_oldest_first(root: Path, transport: LocalDirTransport) -> None:
    for n in range(3):
        publish(root, "local_q", f"m{n}")
    bodies = []
    while (delivery := transport.get("local_q")) is not None:
        bodies.append(delivery.body)
        delivery.ack()
    assert bodies == [b"m0", b"m1", b"m2"]


def test_requeue_makes_it_available_again_uncounted(root: Path, transport: LocalDirTransport) -> None:
    publish(root, "local_q", "body")
    transport.get("local_q").requeue()
    again = transport.get("local_q")
    assert (again.body, again.attempts) == (b"body", 1)
    again.ack()


def test_retry_counts_attempts(root: Path, transport: LocalDirTransport) -> None:
    publish(root, "local_q", "body")
    for expected in (1, 2, 3):
        delivery = transport.get("local_q")
        assert (delivery.body, delivery.attempts) == (b"body", expected)
        delivery.retry("exit code 1")
    assert transport.get("local_q").attempts == 4


def test_reject_dead_letters_body_and_reason(root: Path, transport: LocalDirTransport) -> None:
    publish(root, "local_q", b"the request")
    delivery = transport.get("local_q")
    delivery.reject("invalid: no experiment key")

    assert transport.get("local_q") is None
    rejected = transport.get("local_q_rejected")
    assert rejected.body == b"the request"
    assert rejected.headers["reason"] == "invalid: no experiment key"
    assert rejected.headers["queue"] == "local_q"
    assert rejected.headers["rejected_at"]
    rejected.ack()
    assert [p for p in (root / "local_q_rejected").iterdir() if p.name != INFLIGHT] == []


def test_a_settled_delivery_cannot_be_settled_again(root: Path, transport: LocalDirTransport) -> None:
    publish(root, "local_q", "body")
    delivery = transport.get("local_q")
    delivery.ack()
    with pytest.raises(RuntimeError, match="already settled"):
        delivery.requeue()


def test_closing_an_unsettled_delivery_gives_it_back(root: Path, transport: LocalDirTransport) -> None:
    publish(root, "local_q", "body")
    with transport.get("local_q"):
        pass
    delivery = transport.get("local_q")
    assert delivery.body == b"body"
    delivery.ack()


def test_concurrent_runners_take_each_message_exactly_once(root: Path) -> None:
    for n in range(40):
        publish(root, "local_q", f"m{n}")
    taken: list[bytes] = []

    def runner() -> None:
        transport = LocalDirTransport(root)
        while (delivery := transport.get("local_q")) is not None:
            taken.append(delivery.body)
            delivery.ack()

    threads = [threading.Thread(target=runner) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(f"m{n}".encode() for n in range(40))


HOLDER = textwrap.dedent(
    """
    import sys, time
    from studio_runner.queues.localdir import LocalDirTransport
    delivery = LocalDirTransport(sys.argv[1]).get("local_q")
    print("held" if delivery else "empty", flush=True)
    time.sleep(120)
    """
)


def test_a_killed_holder_loses_its_claim_and_the_message_is_recovered(
    root: Path, transport: LocalDirTransport
) -> None:
    publish(root, "local_q", b"survives a crash")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert transport.get("local_q") is None  # the live holder's lock protects it
        assert os.listdir(root / "local_q" / INFLIGHT) != []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()

    delivery = transport.get("local_q")
    assert delivery is not None and delivery.body == b"survives a crash"
    delivery.ack()
    assert os.listdir(root / "local_q" / INFLIGHT) == []
