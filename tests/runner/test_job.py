"""Running workloads: the job script, exit codes, time limits, cancels and output capture."""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from studio_runner.job import bash_double_quoted, run_job, write_job_script
from studio_runner.jobenv import job_environment, job_script_exports
from studio_runner.layout import ExperimentLayout
from studio_runner.pythonenv import Virtualenv
from studio_runner.request import decode_request

pytestmark = pytest.mark.timeout(60)

BASE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.sh"
    path.write_text(text)
    return path


def run(tmp_path: Path, text: str, **kwargs):
    lines: list[str] = []
    kwargs.setdefault("on_line", lines.append)
    result = run_job(
        script(tmp_path, text),
        env=kwargs.pop("env", BASE_ENV),
        cwd=tmp_path,
        output_file=tmp_path / "output",
        deadline=kwargs.pop("deadline", None),
        cancel=kwargs.pop("cancel", None),
        **kwargs,
    )
    return result, lines, (tmp_path / "output").read_text()


def gone(pid: int) -> bool:
    """Dead, or a zombie waiting for whoever adopted it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


# --- run_job ---------------------------------------------------------------------------------


def test_exit_codes(tmp_path: Path) -> None:
    assert run(tmp_path, "exit 0\n")[0].exit_code == 0
    assert run(tmp_path, "exit 3\n")[0].exit_code == 3
    killed = run(tmp_path, "kill -KILL $$\n")[0]
    assert killed.exit_code == -9 and not killed.timed_out and not killed.cancelled


def test_stdout_and_stderr_are_combined_in_order_and_appended(tmp_path: Path) -> None:
    (tmp_path / "output").write_text("earlier attempt\n")
    result, lines, output = run(
        tmp_path,
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done\nprintf 'no newline at the end'\n",
    )
    expected = ["out1", "err1", "out2", "err2", "out3", "err3", "no newline at the end"]
    assert lines == expected
    assert output == "earlier attempt\n" + "\n".join(expected)
    assert result.exit_code == 0
    assert result.started_at <= result.first_output_at <= result.ended_at


def test_the_output_file_sees_lines_while_the_job_runs(tmp_path: Path) -> None:
    seen_in_file: list[str] = []

    def on_line(line: str) -> None:
        if line == "first":
            seen_in_file.append((tmp_path / "output").read_text())

    run(tmp_path, "echo first\nsleep 0.2\necho second\n", on_line=on_line)
    assert seen_in_file == ["first\n"]


def test_a_failing_line_consumer_does_not_stop_the_job(tmp_path: Path) -> None:
    def on_line(line: str) -> None:
        raise RuntimeError("response queue down")

    result, _, output = run(tmp_path, "echo a\necho b\nexit 4\n", on_line=on_line)
    assert result.exit_code == 4 and output == "a\nb\n"


def test_timeout_kills_the_group_including_a_grandchild_that_traps_sigterm(tmp_path: Path) -> None:
    result, lines, _ = run(
        tmp_path,
        "bash -c 'trap \"\" TERM; echo $$ > grandchild.pid; while true; do sleep 0.05; done' &\n"
        "trap 'echo got TERM' TERM\n"
        "while [ ! -s grandchild.pid ]; do sleep 0.01; done\n"
        "echo started\n"
        "while true; do sleep 0.05; done\n",
        deadline=time.monotonic() + 0.5,
        grace_seconds=0.5,
    )
    assert result.timed_out and not result.cancelled
    assert result.exit_code == -9  # ignored SIGTERM (the trap only prints), so SIGKILL
    assert lines[0] == "started" and "got TERM" in lines
    assert gone(int((tmp_path / "grandchild.pid").read_text()))


def test_a_flood_of_output_does_not_hide_the_deadline(tmp_path: Path) -> None:
    result, lines, _ = run(
        tmp_path, "while true; do echo flood; done\n", deadline=time.monotonic() + 0.3, grace_seconds=0.2
    )
    assert result.timed_out and result.exit_code == -15
    assert lines and set(lines) == {"flood"}


def test_cancel_sends_sigterm_first_so_the_job_can_stop_cleanly(tmp_path: Path) -> None:
    cancel = threading.Event()
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "ready":
            cancel.set()

    result, _, _ = run(
        tmp_path,
        "trap 'echo stopping; exit 7' TERM\necho ready\nsleep 1000 &\nwait\n",
        cancel=cancel,
        on_line=on_line,
    )
    assert result.cancelled and not result.timed_out
    assert result.exit_code == 7
    assert lines == ["ready", "stopping"]


def test_a_background_child_holding_stdout_does_not_hang_the_runner(tmp_path: Path) -> None:
    result, lines, _ = run(tmp_path, "sleep 1000 &\necho $! > child.pid\necho done\n")
    assert result.exit_code == 0 and not result.timed_out
    assert lines == ["done"]
    assert gone(int((tmp_path / "child.pid").read_text()))


def test_a_child_in_its_own_process_group_is_stopped_too(tmp_path: Path) -> None:
    result, _, _ = run(
        tmp_path,
        "set -m\nsleep 1000 &\necho $! > child.pid\nset +m\necho done\n",
    )
    assert result.exit_code == 0
    assert gone(int((tmp_path / "child.pid").read_text()))


def test_nothing_starts_after_the_deadline_or_a_cancel(tmp_path: Path) -> None:
    (tmp_path / "output").touch()
    timed_out, _, output = run(tmp_path, "touch ran\n", deadline=time.monotonic() - 1)
    assert (timed_out.exit_code, timed_out.timed_out) == (None, True)
    cancel = threading.Event()
    cancel.set()
    cancelled, _, _ = run(tmp_path, "touch ran\n", cancel=cancel)
    assert (cancelled.exit_code, cancelled.cancelled) == (None, True)
    assert not (tmp_path / "ran").exists() and output == ""


# --- the job script --------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> ExperimentLayout:
    layout = ExperimentLayout.create(tmp_path / "root", "exp-1")
    layout.workspace_dir.mkdir()
    return layout


@pytest.fixture
def venv() -> Virtualenv:
    """The runner's own venv stands in for a cached one: these tests need no pip."""
    return Virtualenv(Path(sys.prefix), Path(sys.executable), key="runner", built=False, seconds=0.0)


def start(
    layout: ExperimentLayout, venv: Virtualenv, experiment: dict, env: dict | None = None, base_env=None
):
    request = decode_request({"experiment": {"key": "exp-1", **experiment}, "config": {"env": env or {}}})
    base_env = base_env if base_env is not None else {"PATH": os.environ["PATH"], "HOME": "/home/tester"}
    job_env = job_environment(
        request, layout, venv=venv, allocation_env={"OMP_NUM_THREADS": "1"}, base_env=base_env
    )
    exports = job_script_exports(request, allocation_env={"OMP_NUM_THREADS": "1"}, base_env=base_env)
    path = write_job_script(layout, request, python=venv.python, exports=exports)
    lines: list[str] = []
    result = run_job(
        path,
        env=job_env,
        cwd=layout.runner_dir,
        output_file=layout.output_file,
        deadline=None,
        cancel=None,
        on_line=lines.append,
    )
    return path, result, lines


def test_script_runs_the_file_in_the_workspace_with_client_quoted_args(
    layout: ExperimentLayout, venv: Virtualenv
) -> None:
    (layout.workspace_dir / "show.py").write_text(
        "import json, os, sys\nprint(json.dumps([os.getcwd(), sys.argv[1:]]))\nsys.exit(5)\n"
    )
    raw = ["plain", "two words", "it's", 'say "hi"', "$HOME", "a;b", "*", ""]
    path, result, lines = start(layout, venv, {"filename": "show.py", "args": [shlex.quote(a) for a in raw]})
    assert result.exit_code == 5
    assert json.loads(lines[0]) == [str(layout.workspace_dir), raw]
    assert path == layout.runner_dir / "runner.sh"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_module_form(layout: ExperimentLayout, venv: Virtualenv) -> None:
    package = layout.workspace_dir / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("import sys\nprint(__name__, sys.argv[1:])\n")
    _, result, lines = start(layout, venv, {"filename": "-m", "args": ["pkg.mod", shlex.quote("x y")]})
    assert result.exit_code == 0
    assert lines == ["__main__ ['x y']"]


def test_job_environment_end_to_end(layout: ExperimentLayout, venv: Virtualenv) -> None:
    (layout.workspace_dir / "env.py").write_text(
        "import json, os\n"
        "names = ['AMQP_URL', 'DATA', 'LEAK', 'GREETING', 'PATH', 'QUOTED', 'LITERAL', 'OMP_NUM_THREADS',\n"
        "         'STUDIOML_EXPERIMENT', 'TMPDIR', 'PYTHONUNBUFFERED']\n"
        "print(json.dumps({n: os.environ.get(n) for n in names}))\n"
    )
    runner_env = {
        "PATH": os.environ["PATH"],
        "HOME": "/home/tester",
        "USER": "tester",
        "AMQP_URL": "amqp://u:s3cret@h/",
    }
    config_env = {
        "DATA": "%HOME%/data",
        "LEAK": "%AMQP_URL%",
        "GREETING": "hi $USER",
        "PATH": "$PATH:/opt/extra",
        "QUOTED": 'say "hi" `id` \\ $(id) ${USER}',
        "LITERAL": "costs \\$5",
        "OMP_NUM_THREADS": "$NPROC",
    }
    _, result, lines = start(layout, venv, {"filename": "env.py"}, env=config_env, base_env=runner_env)
    assert result.exit_code == 0, lines
    seen = json.loads(lines[0])
    assert seen["AMQP_URL"] is None
    assert seen["DATA"] == "/home/tester/data"
    assert seen["LEAK"] == "%AMQP_URL%"
    assert seen["GREETING"] == "hi tester"
    assert seen["PATH"] == f"{venv.path}/bin:{os.environ['PATH']}:/opt/extra"
    assert seen["QUOTED"] == 'say "hi" `id` \\ $(id) tester'
    assert seen["LITERAL"] == "costs $5"
    assert seen["OMP_NUM_THREADS"] == "1"
    assert seen["STUDIOML_EXPERIMENT"] == layout.name
    assert seen["TMPDIR"] == str(layout.tmp_dir)
    assert seen["PYTHONUNBUFFERED"] == "1"


def test_bash_double_quoted() -> None:
    assert bash_double_quoted('a"b\\c`d$e$(f)\\$g') == 'a\\"b\\\\c\\`d$e\\$(f)\\$g'
