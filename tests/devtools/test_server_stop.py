"""Stopping a server stops its whole process group, also once the group's leader has exited.

``airflow standalone`` exits on SIGTERM while its scheduler may not; stopping only until the
leader was gone left schedulers running after the tests (found after a CI run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devtools.services import Server
from tests.polling import wait_for

STUBBORN_CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(1)
"""

LEADER = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
"""
"""Starts the stubborn child in its own group, then exits at once."""


def stubborn_group(tmp_path: Path) -> tuple[Server, subprocess.Popen[bytes], Path]:
    ready = tmp_path / "ready"
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER, STUBBORN_CHILD, str(ready)], start_new_session=True
    )
    server = Server.of("stubborn", leader.pid)
    wait_for(ready.exists, 30, "the child to start")
    return server, leader, ready


def group_members(group: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == group:
                members.append(int(name))
    return members


def test_a_child_that_ignores_sigterm_is_killed_after_its_leader_exited(tmp_path: Path) -> None:
    server, leader, _ = stubborn_group(tmp_path)
    leader.wait(30)
    assert group_members(server.pid), "the child should outlive its leader"

    server.stop(timeout=1)

    assert group_members(server.pid) == []


def test_a_pid_now_held_by_another_process_is_left_alone() -> None:
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        recorded = Server.of("server", other.pid)
        reused = Server(name="server", pid=other.pid, started=recorded.started - 1)
        # the PID's current process started at another time than the one recorded: not ours
        reused.stop(timeout=1)
        assert other.poll() is None, "a process that merely reuses the PID must not be signalled"
    finally:
        other.kill()
        other.wait()
