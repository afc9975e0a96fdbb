"""LocalRunnerProcess and the local runner's command: real child processes, no stand-ins.

The children are small Python scripts that behave as a runner does (console on stdout, JSON
events on stderr, SIGTERM handling), and once the real ``studio-runner``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_studio.operators.local_runner import (
    LocalRunnerProcess,
    local_command,
    read_summary,
    runner_command,
    worker_environment,
)

LOG = logging.getLogger("tests.local_runner")


def child(script: str, *, grace: float = 30.0) -> LocalRunnerProcess:
    return LocalRunnerProcess(
        [sys.executable, "-c", script], env=dict(os.environ), log=LOG, kill_grace_period=grace
    )


def test_console_and_runner_events_reach_the_log_at_their_levels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = (
        "import json, sys\n"
        "print('epoch 1 of the workload')\n"
        "data = sys.stdin.read()\n"
        "print('stdin:', data)\n"
        "sys.stderr.write(json.dumps({'level': 'error', 'msg': 'upload failed', 'error': 'S3 said no'}) + '\\n')\n"
        "sys.stderr.write('not json at all\\n')\n"
        "sys.exit(5)\n"
    )
    runner = child(script)
    with caplog.at_level(logging.DEBUG, logger=LOG.name):
        assert runner.run(b"the request") == 5
    records = {(record.levelno, record.getMessage()) for record in caplog.records}
    assert (logging.INFO, "epoch 1 of the workload") in records
    assert (logging.INFO, "stdin: the request") in records
    assert (logging.ERROR, "studio-runner: upload failed\nS3 said no") in records
    assert (logging.WARNING, "studio-runner: not json at all") in records
    assert runner.last_lines() == "upload failed\nS3 said no\nnot json at all"


def test_stop_sends_sigterm_and_the_runner_saves_its_work(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    started = tmp_path / "started"
    script = (
        "import pathlib, signal, sys, time\n"
        f"def stop(*_):\n    pathlib.Path({str(saved)!r}).write_text('saved')\n    sys.exit(6)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(started)!r}).write_text('1')\n"
        "time.sleep(600)\n"
    )
    assert stopped_once_started(child(script), started) == 6
    assert saved.read_text() == "saved"


def test_a_runner_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = (
        "import pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(started)!r}).write_text('1')\n"
        "time.sleep(600)\n"
    )
    assert stopped_once_started(child(script, grace=0.5), started) == -9


def test_the_worker_environment_loses_airflow_settings_and_reserved_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://u:secret@db/airflow")
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "x")
    monkeypatch.setenv("AMQP_URL", "amqp://developer@laptop/")
    monkeypatch.setenv("KEEP_ME", "1")
    env = worker_environment({"AMQP_URL"})
    assert env["KEEP_ME"] == "1"
    assert not [name for name in env if "AIRFLOW" in name] and "AMQP_URL" not in env


def test_the_local_command_is_the_real_runner_with_the_workers_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__STUDIO__LOCAL_WORKING_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("AIRFLOW__STUDIO__LOCAL_CACHE_DIR", str(tmp_path / "cache"))
    result = tmp_path / "summary.json"
    command = local_command("run", result, "--request-json", "{}", "--cpu-only")
    assert command[: len(runner_command())] == runner_command()
    assert command[len(runner_command()) :] == [
        "run",
        "--result-file",
        str(result),
        "--working-dir",
        str(tmp_path / "work"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-format",
        "json",
        "--request-json",
        "{}",
        "--cpu-only",
    ]
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    runner = LocalRunnerProcess(command, env=env, log=LOG, kill_grace_period=30)
    assert runner.run() == 2  # the request is refused: invalid, with a summary saying why
    summary = read_summary(result)
    assert summary is not None and summary["status"] == "invalid" and summary["reason"]


def test_a_result_file_that_is_missing_or_not_an_object_reads_as_none(tmp_path: Path) -> None:
    assert read_summary(tmp_path / "missing.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_summary(tmp_path / "list.json") is None
    (tmp_path / "torn.json").write_text('{"status": "succ')
    assert read_summary(tmp_path / "torn.json") is None


def stopped_once_started(runner: LocalRunnerProcess, started: Path) -> int | None:
    """Run ``runner`` in a thread, stop it once it has written ``started`` (its signal handlers
    are set by then); its exit status."""
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(runner.run()))
    worker.start()
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, f"the child never wrote {started}"
        time.sleep(0.05)
    runner.stop()
    worker.join(60)
    return codes[0] if codes else None
