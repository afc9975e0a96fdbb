"""One rule for a virtualenv that does not build, with the real pip and uv.

A requirement the index does not have is permanent (the request is refused, INVALID); an index
that cannot be reached is not (the request is retried, INFRASTRUCTURE). The unreachable index is
a loopback port nothing listens on; the installers' own configuration files are set aside so
that no other index or local wheel folder answers instead.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from studio_runner.interpreters import PythonEnvError
from studio_runner.outcome import Disposition, Outcome, Status
from studio_runner.pythonenv import UNREACHABLE, UNRESOLVABLE, VirtualenvCache, install_trouble

pytestmark = pytest.mark.timeout(300)

UV = Path(sys.executable).parent / "uv"
INSTALLERS = ["pip", "uv"]


def make_cache(root: Path, installer: str) -> VirtualenvCache:
    assert installer == "pip" or UV.exists(), "the dev extra installs uv beside the interpreter"
    return VirtualenvCache(root, uv=UV if installer == "uv" else None)


def closed_port() -> int:
    """A loopback port that refuses connections (bound for a moment, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_failure(cache: VirtualenvCache, requirements: list[str]) -> PythonEnvError:
    log: list[str] = []
    with pytest.raises(PythonEnvError) as raised:
        cache.ensure("3.11", requirements, log.append)
    assert [p.name for p in cache.venvs_dir.iterdir()] == []  # nothing half-built is kept
    assert not list(cache.root.glob(".*.pip-debug.log"))
    return raised.value


@pytest.mark.parametrize("installer", INSTALLERS)
@pytest.mark.parametrize(
    ("requirement", "name"),
    [
        ("studio-runner-no-such-package-x7q==1.0", "studio-runner-no-such-package-x7q"),  # no such package
        ("six==0.0.999", "six"),  # no such version
    ],
)
def test_a_requirement_the_index_does_not_have_is_permanent(
    tmp_path: Path, installer: str, requirement: str, name: str
) -> None:
    error = build_failure(make_cache(tmp_path, installer), [requirement])
    assert error.permanent, str(error)
    assert "cannot be resolved" in str(error) and name in str(error)
    outcome = Outcome(Status.INVALID if error.permanent else Status.INFRASTRUCTURE, reason=str(error))
    assert outcome.disposition is Disposition.REJECT  # dead-lettered with the reason, not retried


@pytest.mark.parametrize("installer", INSTALLERS)
def test_an_unreachable_index_is_retried(
    tmp_path: Path, installer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = f"http://127.0.0.1:{closed_port()}/simple"
    for name in [n for n in os.environ if n.startswith(("PIP_", "UV_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no extra indexes or find-links from pip.conf
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setenv("UV_NO_CONFIG", "1")
    monkeypatch.setenv("UV_INDEX_URL", index)
    error = build_failure(make_cache(tmp_path, installer), ["six==1.17.0"])
    assert not error.permanent, str(error)
    assert "could not be reached" in str(error)
    outcome = Outcome(Status.INVALID if error.permanent else Status.INFRASTRUCTURE, reason=str(error))
    assert outcome.disposition is Disposition.RETRY


def test_an_unreachable_index_is_retried_even_when_pip_retries_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``retries = 0`` pip's console only says "No matching distribution": its debug log tells."""
    index = f"http://127.0.0.1:{closed_port()}/simple"
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setenv("PIP_RETRIES", "0")
    error = build_failure(make_cache(tmp_path, "pip"), ["six==1.17.0"])
    assert "No matching distribution" in str(error)  # what the console said
    assert not error.permanent, str(error)


@pytest.mark.parametrize(
    ("line", "signs"),
    [
        ("ERROR: No matching distribution found for x==1", {UNRESOLVABLE}),
        ("  cause: Because there is no version of six==0.0.999 and you require six==0.0.999, we can", set()),
        ("error: No solution found when resolving dependencies", {UNRESOLVABLE}),
        ("Could not fetch URL https://pypi.org/simple/x/: 404 Client Error: Not Found for url", set()),
        (
            "Could not fetch URL http://127.0.0.1:9/simple/six/: connection error: HTTPConnectionPool",
            {UNREACHABLE},
        ),
        ("  cause: Connection refused (os error 111)", {UNREACHABLE}),
        ("Collecting six==1.17.0", set()),
    ],
)
def test_install_trouble_reads_one_line(line: str, signs: set[str]) -> None:
    assert install_trouble(line) == signs
