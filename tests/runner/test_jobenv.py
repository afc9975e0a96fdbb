"""The job environment: an allow-list of the runner's environment, never all of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from studio_runner.jobenv import job_environment, job_script_exports
from studio_runner.layout import ExperimentLayout
from studio_runner.pythonenv import Virtualenv
from studio_runner.request import Request, decode_request

RUNNER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/home/runner",
    "USER": "runner",
    "LOGNAME": "runner",
    "TZ": "UTC",
    "AMQP_URL": "amqp://runner:s3cret@rabbit:5672/%2f",
    "AWS_SECRET_ACCESS_KEY": "runner-sqs-secret",
    "STUDIO_RUNNER_KEY_FILE": "/secrets/private.pem",
    "HTTPS_PROXY": "http://proxy:3128",
}


def make_request(env: dict[str, str]) -> Request:
    return decode_request({"experiment": {"key": "exp-1", "filename": "train.py"}, "config": {"env": env}})


@pytest.fixture
def layout(tmp_path: Path) -> ExperimentLayout:
    return ExperimentLayout.create(tmp_path / "root", "exp-1")


@pytest.fixture
def venv(tmp_path: Path) -> Virtualenv:
    path = tmp_path / "venvs" / "abc"
    return Virtualenv(path=path, python=path / "bin" / "python", key="abc", built=False, seconds=0.0)


def build(request: Request, layout: ExperimentLayout, venv: Virtualenv, **kwargs) -> dict[str, str]:
    kwargs.setdefault("allocation_env", {})
    kwargs.setdefault("base_env", RUNNER_ENV)
    return job_environment(request, layout, venv=venv, **kwargs)


def test_runner_secrets_do_not_reach_the_job(layout: ExperimentLayout, venv: Virtualenv) -> None:
    env = build(make_request({}), layout, venv)
    assert set(env) == {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TZ",
        "LANG",
        "LC_ALL",
        "STUDIOML_EXPERIMENT",
        "STUDIOML_HOME",
        "TMPDIR",
        "VIRTUAL_ENV",
        "PYTHONUNBUFFERED",
    }
    assert not any("s3cret" in v or "runner-sqs-secret" in v or "private.pem" in v for v in env.values())


def test_the_default_base_is_the_runners_environment_but_only_allow_listed_names(
    layout: ExperimentLayout, venv: Virtualenv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://runner:s3cret@rabbit/")
    monkeypatch.setenv("HOME", "/home/from-os")
    env = job_environment(make_request({}), layout, venv=venv, allocation_env={})
    assert "AMQP_URL" not in env
    assert env["HOME"] == "/home/from-os"


def test_percent_tokens_expand_only_from_the_clean_base(layout: ExperimentLayout, venv: Virtualenv) -> None:
    request = make_request(
        {
            "DATA": "%HOME%/data",
            "LEAK": "%AMQP_URL%",
            "KEY": "%STUDIO_RUNNER_KEY_FILE%",
            "UNSET": "%NOT_SET_ANYWHERE%",
            "PROXY": "%HTTPS_PROXY%",
        }
    )
    env = build(request, layout, venv)
    assert env["DATA"] == "/home/runner/data"
    assert env["LEAK"] == "%AMQP_URL%"
    assert env["KEY"] == "%STUDIO_RUNNER_KEY_FILE%"
    assert env["UNSET"] == "%NOT_SET_ANYWHERE%"
    assert env["PROXY"] == "%HTTPS_PROXY%"
    # an operator can allow a name explicitly
    allowed = build(request, layout, venv, passthrough=["HTTPS_PROXY"])
    assert allowed["PROXY"] == allowed["HTTPS_PROXY"] == "http://proxy:3128"


def test_runner_owned_names_and_defaults(layout: ExperimentLayout, venv: Virtualenv) -> None:
    request = make_request(
        {
            "AWS_ACCESS_KEY_ID": "client-key",
            "TMPDIR": "/elsewhere",
            "STUDIOML_HOME": "/elsewhere",
            "CUDA_VISIBLE_DEVICES": "0,1,2,3",
            "LANG": "en_US.UTF-8",
        }
    )
    env = build(
        request, layout, venv, allocation_env={"CUDA_VISIBLE_DEVICES": "GPU-1234", "OMP_NUM_THREADS": "3"}
    )
    assert env["AWS_ACCESS_KEY_ID"] == "client-key"  # the client's own keys are the client's business
    assert env["LANG"] == "en_US.UTF-8" and env["LC_ALL"] == "C.UTF-8"
    assert env["STUDIOML_EXPERIMENT"] == layout.name
    assert env["STUDIOML_HOME"] == str(layout.root)
    assert env["TMPDIR"] == str(layout.tmp_dir)
    assert env["VIRTUAL_ENV"] == str(venv.path)
    assert env["PATH"] == f"{venv.path}/bin:/usr/local/bin:/usr/bin:/bin"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234"  # a request cannot widen its allocation
    assert env["OMP_NUM_THREADS"] == "3"


def test_config_env_may_set_pythonunbuffered_and_path(layout: ExperimentLayout, venv: Virtualenv) -> None:
    env = build(make_request({"PYTHONUNBUFFERED": "", "PATH": "/opt/tools/bin:/usr/bin"}), layout, venv)
    assert env["PYTHONUNBUFFERED"] == ""
    assert env["PATH"] == f"{venv.path}/bin:/opt/tools/bin:/usr/bin"


def test_missing_locale_and_path_get_defaults(layout: ExperimentLayout, venv: Virtualenv) -> None:
    env = build(make_request({}), layout, venv, base_env={})
    assert env["LANG"] == env["LC_ALL"] == "C.UTF-8"
    assert env["PATH"].startswith(f"{venv.path}/bin:")
    assert "HOME" not in env


def test_dollar_values_are_left_to_the_job_script(layout: ExperimentLayout, venv: Virtualenv) -> None:
    request = make_request(
        {
            "PATH": "$PATH:/opt/extra",
            "GREETING": "hello $USER from %HOME%",
            "PLAIN": "no dollars",
            "TMPDIR": "$HOME/tmp",
            "bad-name": "$X",
        }
    )
    env = build(request, layout, venv)
    assert "GREETING" not in env and env["PATH"].endswith(":/usr/bin:/bin")
    assert env["TMPDIR"] == str(layout.tmp_dir)
    exports = job_script_exports(request, base_env=RUNNER_ENV)
    assert exports == {"PATH": "$PATH:/opt/extra", "GREETING": "hello $USER from /home/runner"}
    assert "CUDA_VISIBLE_DEVICES" not in job_script_exports(
        make_request({"CUDA_VISIBLE_DEVICES": "$ALL"}), allocation_env={"CUDA_VISIBLE_DEVICES": "-1"}
    )
