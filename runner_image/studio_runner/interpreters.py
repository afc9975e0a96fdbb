"""Which installed Python a request's ``pythonver`` means, found once per process.

Candidates are the ``python3.X`` files on ``PATH``, pyenv's versions and the runner's own
interpreter; each is asked its version once (a subprocess), then remembered by file identity.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_PROBE = (
    "import sys, json, platform, sysconfig\n"
    "base = getattr(sys, 'base_prefix', getattr(sys, 'real_prefix', sys.prefix))\n"
    "print(json.dumps({'executable': sys.executable, 'version': platform.python_version(),"
    " 'info': list(sys.version_info[:5]),"
    " 'abi': [platform.python_implementation(), sysconfig.get_config_var('SOABI'),"
    " sysconfig.get_platform(), list(platform.libc_ver())],"
    " 'venv': sys.prefix != base or hasattr(sys, 'real_prefix')}))\n"
)
_PATH_PYTHON = re.compile(r"^python(\d+)\.(\d+)$")
_PYTHONVER = re.compile(r"^\d+(\.\d+){0,2}$")
_LEVELS = {"alpha": 0, "beta": 1, "candidate": 2, "final": 3}


class PythonEnvError(RuntimeError):
    """No usable interpreter, or the requested environment could not be built.

    ``permanent``: the request itself cannot work (a Python or a requirement nobody can
    provide), so it is refused and dead-lettered; otherwise another attempt may succeed.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Interpreter:
    """A Python to build environments from; ``warning`` is set when it is a stand-in."""

    path: Path
    version: str
    warning: str = ""
    abi: str = ""
    """Implementation, SOABI, platform and libc: what a built environment depends on besides
    the version, so a packed one is only shared between interpreters that can run it."""


@dataclass(frozen=True)
class _Found:
    path: Path
    real: str
    version: str
    order: tuple
    abi: str = ""


_probe_cache: dict[tuple, _Found | None] = {}
_probe_lock = threading.Lock()


def find_interpreter(
    pythonver: str,
    *,
    search_path: str | None = None,
    pyenv_root: Path | None = None,
) -> Interpreter:
    """The newest installed Python whose version starts with ``pythonver`` (by components).

    ``"3.11"`` matches 3.11.7 but not 3.1; ``"3"`` the newest 3.x. Candidates are ``python3.X``
    files on ``PATH`` (shim folders such as pyenv's ``shims`` are skipped: their answer depends
    on the caller's environment), ``$PYENV_ROOT/versions/*/bin/python`` and the runner's own
    interpreter; virtualenvs are never candidates. An empty ``pythonver`` is the runner's own.
    With no match but the runner's major version, the runner's interpreter is returned with a
    ``warning``; a major version nobody here has is refused. Each executable is asked its
    version once per process, so repeated calls run no subprocess.
    """
    wanted = pythonver.strip()
    if wanted.lower().startswith("python"):
        wanted = wanted[len("python") :]
    own = _runner_interpreter()
    if not wanted:
        return own
    if not _PYTHONVER.match(wanted):
        raise PythonEnvError(
            f"pythonver {pythonver!r} is not a Python version such as '3.11' or '3.11.7'", permanent=True
        )
    parts = wanted.split(".")
    candidates = _candidates(search_path, pyenv_root)
    matching = [c for c in candidates if c.version.split(".")[: len(parts)] == parts]
    if matching:
        best = max(matching, key=lambda c: c.order)
        return Interpreter(path=best.path, version=best.version, abi=best.abi)
    installed = ", ".join(sorted({c.version for c in candidates}, key=_version_order)) or own.version
    if parts[0] == own.version.split(".")[0]:
        return Interpreter(
            path=own.path,
            version=own.version,
            abi=own.abi,
            warning=(
                f"Python {wanted} was requested but is not installed on this runner "
                f"(installed: {installed}); running with Python {own.version} instead"
            ),
        )
    raise PythonEnvError(
        f"Python {wanted} was requested but this runner has no Python {parts[0]} "
        f"(installed: {installed}); send the request with a pythonver of an installed "
        "version or route it to a runner image that has that Python",
        permanent=True,
    )


def _version_order(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.a-z]+", version) if p)


def _runner_interpreter() -> Interpreter:
    """The interpreter the runner runs on, outside any virtualenv the runner itself lives in."""
    base = getattr(sys, "_base_executable", "") or sys.executable
    if sys.prefix != sys.base_prefix and base == sys.executable:
        major, minor = sys.version_info[:2]
        for name in (f"python{major}.{minor}", f"python{major}", "python"):
            candidate = Path(sys.base_prefix) / "bin" / name
            if candidate.exists():
                base = str(candidate)
                break
    return Interpreter(path=Path(base), version=platform.python_version(), abi=_own_abi())


def _own_abi() -> str:
    return _abi_text(
        [
            platform.python_implementation(),
            sysconfig.get_config_var("SOABI"),
            sysconfig.get_platform(),
            list(platform.libc_ver()),
        ]
    )


def _abi_text(parts: object) -> str:
    return json.dumps(parts, separators=(",", ":"))


def _candidates(search_path: str | None, pyenv_root: Path | None) -> list[_Found]:
    paths: list[Path] = []
    folders = (search_path if search_path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    for folder in dict.fromkeys(folders):
        if folder and os.path.basename(folder.rstrip("/")) != "shims":
            paths.extend(Path(folder, name) for name in _listing(folder, _is_path_python))
    root = (
        pyenv_root if pyenv_root is not None else Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    )
    versions = root / "versions"
    paths.extend(versions / name / "bin" / "python" for name in _listing(str(versions), _is_real_dir))
    own = _runner_interpreter()
    own_found = _Found(
        own.path, os.path.realpath(own.path), own.version, _info_order(list(sys.version_info[:5])), own.abi
    )
    found: dict[str, _Found] = {own_found.real: own_found}
    for path in paths:
        probed = _probe(path)
        if probed is not None and probed.real not in found:
            found[probed.real] = probed
    return list(found.values())


_listing_cache: dict[tuple[str, str], tuple[int, list[str]]] = {}


def _listing(folder: str, wanted: Callable[[os.DirEntry], bool]) -> list[str]:
    """Names in ``folder`` that ``wanted`` accepts, rescanned only when the folder changes."""
    try:
        changed = os.stat(folder).st_mtime_ns
    except OSError:
        return []
    token = (folder, wanted.__name__)
    cached = _listing_cache.get(token)
    if cached is not None and cached[0] == changed:
        return cached[1]
    try:
        names = sorted(e.name for e in os.scandir(folder) if wanted(e))
    except OSError:
        return []
    _listing_cache[token] = (changed, names)
    return names


def _is_path_python(entry: os.DirEntry) -> bool:
    return _PATH_PYTHON.match(entry.name) is not None


def _is_real_dir(entry: os.DirEntry) -> bool:
    """pyenv-virtualenv lists its environments in ``versions/`` as symlinks: not interpreters."""
    return entry.is_dir(follow_symlinks=False)


def _info_order(info: list) -> tuple:
    major, minor, micro, level, serial = ([*list(info), 0, 0, 0, "final", 0])[:5]
    return (int(major), int(minor), int(micro), _LEVELS.get(str(level), 3), int(serial))


def _probe(path: Path) -> _Found | None:
    """Version of one executable, asked once per (file, size, mtime) for the process's life."""
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    if not os.access(real, os.X_OK):
        return None
    token = (real, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _probe_lock:
        if token in _probe_cache:
            cached = _probe_cache[token]
            return (
                None
                if cached is None
                else _Found(path, cached.real, cached.version, cached.order, cached.abi)
            )
    result: _Found | None = None
    try:
        completed = subprocess.run(
            [str(path), "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=20,
            env=plain_env(os.environ),
            stdin=subprocess.DEVNULL,
        )
        if completed.returncode == 0:
            answer = json.loads(completed.stdout.strip().splitlines()[-1])
            if not answer["venv"]:
                result = _Found(
                    path,
                    real,
                    str(answer["version"]),
                    _info_order(answer["info"]),
                    _abi_text(answer.get("abi")),
                )
        else:
            logger.debug("%s does not run: %s", path, completed.stderr.strip()[-300:])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as error:
        logger.debug("cannot ask %s for its version: %s", path, error)
    with _probe_lock:
        _probe_cache[token] = result
    return result


def plain_env(env: Mapping[str, str]) -> dict[str, str]:
    """An environment in which a Python sees only its own installation."""
    dropped = {
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "VIRTUAL_ENV",
        "__PYVENV_LAUNCHER__",
    }
    return {k: v for k, v in env.items() if k not in dropped}
