"""Directory queues on real directories, including a runner process killed while it holds a message.

What every transport does (hold, settle, retry, dead-letter, discover) is test_transport_contract.py;
here is what only directories do: their listing, order, locks and files.
"""

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


def test_settled_messages_leave_no_file_behind(root: Path, transport: LocalDirTransport) -> None:
    publish(root, "local_q", b"the request")
    transport.get("local_q").ack()
    assert os.listdir(root / "local_q" / INFLIGHT) == []
    publish(root, "local_q", b"the request")
    transport.get("local_q").reject("invalid: no experiment key")
    transport.get("local_q_rejected").ack()  # a rejected message taken for good: its record goes with it
    assert [p for p in (root / "local_q_rejected").iterdir() if p.name != INFLIGHT] == []
    assert os.listdir(root / "local_q" / INFLIGHT) == []


def test_messages_come_oldest_first(root: Path, transport: LocalDirTransport) -> None:
    for n in range(3):
        publish(root, "local_q", f"m{n}")
    bodies = []
    while (delivery := transport.get("local_q")) is not None:
        bodies.append(delivery.body)
        delivery.ack()
    assert bodies == [b"m0", b"m1", b"m2"]


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
