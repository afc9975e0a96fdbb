"""Grooming, interpreter selection and the virtualenv cache, with real interpreters and pip."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from studio_runner.interpreters import PythonEnvError, find_interpreter
from studio_runner.pythonenv import LAST_USED, MANIFEST, VirtualenvCache
from studio_runner.request import decode_request
from studio_runner.requirements import groom

# messages captured from the real studioml client
EXAMPLES = Path(__file__).resolve().parents[1] / "data"
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")

pytestmark = pytest.mark.timeout(300)


def pyenv_versions() -> list[str]:
    return sorted(
        (p.name for p in (PYENV_ROOT / "versions").iterdir() if (p / "bin" / "python").exists()),
        key=lambda v: tuple(int(x) for x in v.split(".")),
    )


def runner_version() -> str:
    return ".".join(str(n) for n in sys.version_info[:3])


# --- grooming --------------------------------------------------------------------------------


def test_groom_drops_noise_and_keeps_order() -> None:
    lines = groom(
        [
            "six==1.17.0",
            "",
            "   ",
            "# a comment",
            "pkg-resources==0.0.0",
            "pkg_resources==0.0.0",
            "numpy==2.4.6  # via something",
            "studioml==0.0.44.post6",
            "tensorflow==2.16.1",
        ],
        [],
        gpu=True,
    )
    # tensorflow stays tensorflow even with a GPU: tensorflow-gpu no longer exists on PyPI
    assert lines == ["six==1.17.0", "numpy==2.4.6", "studioml==0.0.44.post6", "tensorflow==2.16.1"]


def test_groom_real_client_freeze_keeps_everything_installable() -> None:
    body = json.loads((EXAMPLES / "completion_service_task.json").read_text())["body"]
    request = decode_request(body)
    lines = groom(request.experiment.pythonenv, request.config.pip)
    assert lines == request.experiment.pythonenv  # nothing to drop in a clean Linux freeze
    assert "studioml==0.0.44.post6" in lines


def test_groom_studioml_tarball_in_workspace_replaces_the_pin(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    for name in ("studioml-0.0.10.tar.gz", "studioml-0.0.9.tar.gz", "other-1.0.tar.gz"):
        (dist / name).write_bytes(b"x")
    lines = groom(["a==1", "studioml==0.0.44", "b==2"], [], workspace=tmp_path)
    # lexicographically last, as upstream sorted the glob: 0.0.9 sorts after 0.0.10
    assert lines == ["a==1", str(dist / "studioml-0.0.9.tar.gz"), "b==2"]
    assert groom(["a==1"], ["c==3"], workspace=tmp_path) == [
        "a==1",
        str(dist / "studioml-0.0.9.tar.gz"),
        "c==3",
    ]
    assert groom(["studioml==0.0.44"], [], workspace=tmp_path / "nothing-here") == ["studioml==0.0.44"]


def test_groom_config_pip_overrides_the_same_project_in_the_freeze() -> None:
    lines = groom(
        ["Six==1.16.0", "numpy==2.4.6", "studioml==0.0.44"], ["six==1.17.0", "studioml==0.0.49", "extra"]
    )
    assert lines == ["numpy==2.4.6", "six==1.17.0", "studioml==0.0.49", "extra"]


def test_groom_local_paths_vcs_and_options(tmp_path: Path) -> None:
    present = tmp_path / "present-1.0-py3-none-any.whl"
    present.write_bytes(b"x")
    project = tmp_path / "project"
    project.mkdir()
    warnings: list[str] = []
    lines = groom(
        [
            "mylib @ file:///home/someone/src/mylib",
            f"present @ file://{present}",
            "-e /home/someone/src/editable",
            f"-e {project}",
            "-e git+https://github.com/studioml/studio.git@83dc44f5d990ba78d2308270ae68bbb4d2bd61db#egg=studioml",
            "--extra-index-url https://evil.example/simple",
            "-r /etc/shadow",
            "/home/someone/wheels/x-1.0-py3-none-any.whl",
            "six==1.17.0",
        ],
        [],
        warn=warnings.append,
    )
    assert lines == [
        f"present @ file://{present}",
        str(project),
        "studioml @ git+https://github.com/studioml/studio.git@83dc44f5d990ba78d2308270ae68bbb4d2bd61db",
        "six==1.17.0",
    ]
    assert len(warnings) == 5
    assert any("/home/someone/src/mylib" in w and "does not exist" in w for w in warnings)
    assert any("--extra-index-url" in w for w in warnings)


# --- interpreters ----------------------------------------------------------------------------


def test_find_interpreter_picks_the_newest_matching_pyenv_version() -> None:
    versions = pyenv_versions()
    newest_3 = [v for v in versions if v.startswith("3.")][-1]
    found = find_interpreter("3", search_path="", pyenv_root=PYENV_ROOT)
    assert found.version == newest_3
    assert found.warning == ""
    assert found.path == PYENV_ROOT / "versions" / newest_3 / "bin" / "python"
    for version in versions:
        minor = ".".join(version.split(".")[:2])
        got = find_interpreter(minor, search_path="", pyenv_root=PYENV_ROOT)
        assert got.version.startswith(minor + "."), (minor, got)
        assert find_interpreter(version, search_path="", pyenv_root=PYENV_ROOT).version == version


def test_find_interpreter_matches_whole_components() -> None:
    # "3.1" is Python 3.1, not 3.10 to 3.13: none is installed, so the runner's own is used
    found = find_interpreter("3.1", search_path="", pyenv_root=PYENV_ROOT)
    assert found.version == runner_version()
    assert "3.1 was requested" in found.warning


def test_find_interpreter_empty_means_the_runners_own() -> None:
    found = find_interpreter("")
    assert found.version == runner_version()
    assert found.warning == ""
    assert not (found.path.parent.parent / "pyvenv.cfg").exists()  # the base, not the runner's venv


def test_find_interpreter_on_a_path_only_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {v.rsplit(".", 1)[0]: v for v in pyenv_versions()}
    other = next(
        v
        for minor, v in versions.items()
        if minor.startswith("3.") and not runner_version().startswith(minor + ".")
    )
    other_minor = other.rsplit(".", 1)[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / f"python{other_minor}").symlink_to(
        PYENV_ROOT / "versions" / other / "bin" / f"python{other_minor}"
    )
    shims = tmp_path / "shims"  # pyenv-style shims answer per caller: never trusted
    shims.mkdir()
    fake = shims / "python3.99"
    fake.write_text(
        '#!/bin/sh\necho \'{"executable": "/x", "version": "3.99.0", "info": [3, 99, 0, "final", 0], "venv": false}\'\n'
    )
    fake.chmod(0o755)
    empty = tmp_path / "no-pyenv"
    empty.mkdir()
    monkeypatch.setenv("PYENV_ROOT", str(empty))
    monkeypatch.setenv("PATH", f"{shims}:{bin_dir}:/usr/bin:/bin")

    found = find_interpreter(other_minor)
    assert (found.path, found.version, found.warning) == (bin_dir / f"python{other_minor}", other, "")

    missing = next(f"3.{n}" for n in range(5, 40) if f"3.{n}" not in versions and f"3.{n}" != other_minor)
    fallback = find_interpreter(missing)
    assert fallback.version == runner_version()
    assert f"Python {missing} was requested" in fallback.warning
    assert find_interpreter("3.99").version != "3.99.0"

    with pytest.raises(PythonEnvError, match="no Python 2"):
        find_interpreter("2.7")
    with pytest.raises(PythonEnvError, match="no Python 4"):
        find_interpreter("4")
    with pytest.raises(PythonEnvError, match="not a Python version"):
        find_interpreter("latest")


# --- the cache -------------------------------------------------------------------------------


def make_wheel(folder: Path, name: str = "tinytool", version: str = "1.0") -> Path:
    """A pure-Python wheel with a console script, written by hand so no build backend is needed."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"def main():\n    print('{name} ok')\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": f"[console_scripts]\n{name} = {name}:main\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> VirtualenvCache:
    return VirtualenvCache(tmp_path_factory.mktemp("venv-cache"))


def leftovers(cache: VirtualenvCache) -> list[str]:
    return sorted(p.name for p in cache.venvs_dir.iterdir() if p.name.startswith("."))


def test_build_once_then_reuse(cache: VirtualenvCache, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    log: list[str] = []
    venv = cache.ensure("3.11", ["six==1.17.0", str(wheel)], log.append)
    assert venv.built and venv.warnings == ()
    assert venv.path == cache.venvs_dir / venv.key and (venv.path / MANIFEST).is_file()
    assert any(line.startswith("Successfully installed") and "six-1.17.0" in line for line in log)
    assert leftovers(cache) == []

    probe = "import six, sys, tinytool; print(six.__version__, sys.version_info[:2] == (3, 11))"
    out = subprocess.run([venv.python, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1.17.0", "True"]
    # the console script was written in the build folder and still runs after the rename
    assert (
        subprocess.run([venv.path / "bin" / "tinytool"], capture_output=True, text=True, check=True).stdout
        == "tinytool ok\n"
    )
    # the runner's own packages are not visible to the workload's interpreter
    isolated = subprocess.run([venv.python, "-c", "import pydantic"], capture_output=True, text=True)
    assert isolated.returncode != 0 and "No module named 'pydantic'" in isolated.stderr

    # same wheel from another attempt's workspace: keyed by content, so the cache hits
    other = tmp_path / "attempt2"
    other.mkdir()
    shutil.copy(wheel, other / wheel.name)
    again: list[str] = []
    reused = cache.ensure("3.11", ["six==1.17.0", str(other / wheel.name)], again.append)
    assert (reused.built, reused.path, reused.key) == (False, venv.path, venv.key)
    assert again == []


def test_a_different_requirement_list_is_a_different_environment(cache: VirtualenvCache) -> None:
    first = cache.ensure("3.11", [], lambda line: None)
    second = cache.ensure("3.12", [], lambda line: None)
    assert first.key != second.key
    assert "3.12" in subprocess.run([second.python, "--version"], capture_output=True, text=True).stdout


def test_two_threads_asking_for_one_environment_build_it_once(cache: VirtualenvCache) -> None:
    barrier = threading.Barrier(2)
    results = []
    errors = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(cache.ensure("3.11", ["six==1.16.0"], lambda line: None))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.built for r in results) == [False, True]
    assert results[0].path == results[1].path


def test_runner_processes_sharing_the_cache_build_once(cache: VirtualenvCache) -> None:
    program = (
        "import sys\n"
        "from pathlib import Path\n"
        "from studio_runner.pythonenv import VirtualenvCache\n"
        "venv = VirtualenvCache(Path(sys.argv[1])).ensure('3.11', ['six==1.15.0'], lambda line: None)\n"
        "print(venv.built, venv.key)\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", program, str(cache.root)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    answers = sorted(p.communicate()[0].split() for p in processes)
    assert [p.returncode for p in processes] == [0, 0]
    assert [a[0] for a in answers] == ["False", "True"] and answers[0][1] == answers[1][1]


def test_a_failed_build_raises_with_pips_reason_and_leaves_nothing(cache: VirtualenvCache) -> None:
    before = sorted(p.name for p in cache.venvs_dir.iterdir())
    log: list[str] = []
    with pytest.raises(PythonEnvError) as raised:
        cache.ensure("3.11", ["six==1.17.0", "studio-runner-no-such-package-x7q==1.0"], log.append)
    message = str(raised.value)
    assert "pip install for Python 3.11" in message and "exited with status 1" in message
    assert "studio-runner-no-such-package-x7q" in message and "No matching distribution" in message
    assert sorted(p.name for p in cache.venvs_dir.iterdir()) == before
    assert any("No matching distribution" in line for line in log)


def test_interpreter_fallback_is_reported_as_a_warning(cache: VirtualenvCache) -> None:
    installed = {v.rsplit(".", 1)[0] for v in pyenv_versions()}
    missing = next(f"3.{n}" for n in range(5, 40) if f"3.{n}" not in installed)
    venv = cache.ensure(missing, [], lambda line: None)
    assert len(venv.warnings) == 1 and f"Python {missing} was requested" in venv.warnings[0]
    out = subprocess.run([venv.python, "--version"], capture_output=True, text=True).stdout
    assert out.split()[-1] == runner_version()


def test_an_interpreter_too_old_for_the_runners_pip_uses_its_own(cache: VirtualenvCache) -> None:
    old = next((v for v in pyenv_versions() if v.startswith("3.6.")), None)
    assert old is not None, "this test needs pyenv's Python 3.6"
    log: list[str] = []
    venv = cache.ensure("3.6", ["six==1.16.0"], log.append)
    assert any(
        " -m pip install" in line and str(sys.executable) not in line for line in log if line.startswith("$ ")
    )
    out = subprocess.run(
        [venv.python, "-c", "import six; print(six.__version__)"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "1.16.0"


def test_python_2_is_refused_with_a_reason(cache: VirtualenvCache) -> None:
    with pytest.raises(PythonEnvError, match="Python 2"):
        cache.ensure("2.7", [], lambda line: None)


def test_prune_removes_only_unused_unlocked_environments(tmp_path: Path) -> None:
    cache = VirtualenvCache(tmp_path, max_unused_days=1.0)
    minors = [m for m in dict.fromkeys(v.rsplit(".", 1)[0] for v in pyenv_versions()) if m.startswith("3.")][
        -3:
    ]
    stale, held, fresh = (cache.ensure(m, [], lambda line: None) for m in minors)
    old = time.time() - 2 * 86400
    for venv in (stale, held):
        os.utime(venv.path / LAST_USED, (old, old))
    (cache.venvs_dir / f".{'0' * 24}.building").mkdir()  # a build that died with its process
    with cache.in_use(held):
        os.utime(held.path / LAST_USED, (old, old))
        assert cache.prune() == [stale.key]
    assert not stale.path.exists() and held.path.exists() and fresh.path.exists()
    assert leftovers(cache) == []
    # a pruned environment is simply built again
    assert cache.ensure(minors[0], [], lambda line: None).built
