"""Python interpreters and the shared virtualenv cache the workloads run in.

A StudioML request carries the client's whole ``pip freeze``; installing it for every attempt
costs tens of seconds, so environments are built once per (interpreter, groomed requirements)
and reused by every later attempt, thread and runner process that shares the cache folder.

Build method (measured on the 75-line freeze of ``completion_service_task.json``, Python 3.11):
``python -m venv`` with ensurepip costs about 4 s before the first package, while
``python -m venv --without-pip`` takes 0.07 s and the runner's own pip then installs into it
with ``pip --python <venv python>``; the install itself (25-30 s, mostly downloads and
unpacking) is the same either way. uv installs the same set in 4-7 s but reads its own
configuration (``UV_INDEX_URL``...) rather than pip's, so it is opt-in: give the cache a ``uv``
binary (``studio-runner --installer uv``, the default when uv is installed beside the runner, as
in the runner image). The runner's pip falls back to ensurepip for interpreters too old for it.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Part of every key: bump it when the way environments are built changes."""

MANIFEST = "studio-runner-venv.json"
LAST_USED = ".studio-runner-last-used"
REQUIREMENTS = "studio-runner-requirements.txt"

_PIP_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "TZ",
        "TMPDIR",
        "TERM",
        "NETRC",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "CC",
        "CXX",
        "CFLAGS",
        "CXXFLAGS",
        "CPPFLAGS",
        "LDFLAGS",
        "MAKEFLAGS",
        "PKG_CONFIG_PATH",
        "LD_LIBRARY_PATH",
        "LIBRARY_PATH",
        "CPATH",
        "CUDA_HOME",
        "CUDA_PATH",
    }
)
_PIP_ENV_PREFIXES = ("PIP_", "UV_", "XDG_", "LC_")
_PIP_ENV_REDIRECTS = frozenset({"PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_PYTHON", "PIP_SRC"})
"""Settings that would install somewhere other than the environment being built."""
_PROXY_NAMES = frozenset({"http_proxy", "https_proxy", "no_proxy", "all_proxy"})

_PROBE = (
    "import sys, json, platform\n"
    "base = getattr(sys, 'base_prefix', getattr(sys, 'real_prefix', sys.prefix))\n"
    "print(json.dumps({'executable': sys.executable, 'version': platform.python_version(),"
    " 'info': list(sys.version_info[:5]),"
    " 'venv': sys.prefix != base or hasattr(sys, 'real_prefix')}))\n"
)
_PATH_PYTHON = re.compile(r"^python(\d+)\.(\d+)$")
_PYTHONVER = re.compile(r"^\d+(\.\d+){0,2}$")
_LEVELS = {"alpha": 0, "beta": 1, "candidate": 2, "final": 3}

_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_INLINE_COMMENT = re.compile(r"(^|(?<!\s)\s+)#.*$")  # (?<!\s): each blank run is tried once, not per blank
_VCS = re.compile(r"^(git|hg|svn|bzr)\+", re.IGNORECASE)
_PKG_RESOURCES = re.compile(r"^pkg[-_.]resources\b", re.IGNORECASE)


class PythonEnvError(RuntimeError):
    """No usable interpreter, or the requested environment could not be built."""


@dataclass(frozen=True)
class Interpreter:
    """A Python to build environments from; ``warning`` is set when it is a stand-in."""

    path: Path
    version: str
    warning: str = ""


@dataclass(frozen=True)
class Virtualenv:
    """A ready environment; ``built`` tells whether this call had to build it."""

    path: Path
    python: Path
    key: str
    built: bool
    seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# Grooming


def project_name(line: str) -> str | None:
    """The normalized (PEP 503) project a requirement line names, if it names one up front."""
    match = _NAME.match(line.strip())
    if not match:
        return None
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def groom(
    pythonenv: Sequence[str],
    pip: Sequence[str],
    *,
    workspace: Path | None = None,
    gpu: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """The requirement lines to install for a request, in install order.

    Rules (RUNNER_PROTOCOL §4.5, adapted): blank, comment and ``pkg-resources`` lines go;
    ``studioml`` stays (the CompletionService client script imports ``studio``) unless the
    workspace ships ``dist/studioml-*.tar.gz``, whose lexicographically last file replaces it.
    ``config.pip`` lines come after ``pythonenv`` and replace a ``pythonenv`` line naming the
    same project, which keeps upstream's "pip overrides the freeze" order in one pip run.

    Lines that cannot work here are dropped with a warning (passed to ``warn`` and logged):
    local paths and ``name @ file://`` URLs that do not exist on this machine (a client's own
    editable installs) and pip option lines (``-i``, ``-r``, ``--extra-index-url``...): the
    runner's pip configuration alone decides where packages come from and which files pip reads.
    ``-e``/``--editable`` is removed from VCS and existing local lines, which are installed
    normally (``-e git+URL#egg=NAME`` becomes ``NAME @ git+URL``): the environment is shared
    and cached, so it must not track a checkout; a freeze pins the commit, so the code
    installed is the same.

    ``gpu`` is accepted for callers that know about the allocation, but upstream's rewriting of
    ``tensorflow`` to ``tensorflow_gpu`` is deliberately not done: ``tensorflow-gpu`` is gone
    from PyPI and current ``tensorflow`` wheels carry GPU support themselves.
    """
    del gpu  # see the docstring: no tensorflow_gpu rewriting any more

    def warning(text: str) -> None:
        logger.warning("%s", text)
        if warn is not None:
            warn(text)

    def clean(lines: Iterable[str]) -> list[str]:
        kept = []
        for raw in lines:
            line = _INLINE_COMMENT.sub("", str(raw)).strip()
            if not line or _PKG_RESOURCES.match(line):
                continue
            line = _usable_line(line, warning)
            if line:
                kept.append(line)
        return kept

    env_lines = clean(pythonenv)
    pip_lines = clean(pip)
    overridden = {project_name(line) for line in pip_lines} - {None}
    env_lines = [line for line in env_lines if project_name(line) not in overridden]
    lines = env_lines + pip_lines

    studio = [i for i, line in enumerate(lines) if project_name(line) == "studioml"]
    tarballs = sorted(str(p) for p in (workspace / "dist").glob("studioml-*.tar.gz")) if workspace else []
    if tarballs:
        for i in reversed(studio):
            del lines[i]
        lines.insert(studio[0] if studio else len(env_lines), tarballs[-1])
    elif len(studio) > 1:
        for i in reversed(studio[:-1]):
            del lines[i]
    return lines


def _usable_line(line: str, warning: Callable[[str], None]) -> str | None:
    editable = re.match(r"^(-e|--editable)(\s+|=)(.+)$", line)
    if editable:
        target = editable.group(3).strip()
        if _VCS.match(target):
            return _vcs_requirement(target)
        local = _local_path(target)
        if local is not None and _exists(local):
            return str(local)
        warning(f"pythonenv: dropped {line!r}: an editable install of a path that is not on this runner")
        return None
    if line.startswith("-"):
        warning(
            f"pythonenv: dropped {line!r}: pip options in a request are ignored, the runner's pip configuration applies"
        )
        return None
    local = _local_path(line)
    if local is not None and not _exists(local):
        warning(
            f"pythonenv: dropped {line!r}: {local} does not exist on this runner (a local install on the client?)"
        )
        return None
    return line


def _vcs_requirement(url: str) -> str:
    """``git+URL#egg=NAME`` as the PEP 508 ``NAME @ git+URL`` that current pip expects."""
    base, _, fragment = url.partition("#")
    params = [p for p in fragment.split("&") if p]
    egg = next((p.split("=", 1)[1] for p in params if p.startswith("egg=")), "")
    rest = [p for p in params if not p.startswith("egg=")]
    target = base + ("#" + "&".join(rest) if rest else "")
    return f"{egg} @ {target}" if egg else url


def _local_path(line: str) -> Path | None:
    """The file a requirement points at, for ``/path``, ``./path``, ``file://`` and ``name @ file://``."""
    target = line
    at = re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?\s*@\s*(\S+)", line)
    if at:
        target = at.group(2)
    if target.lower().startswith("file:"):
        try:
            return Path(unquote(urlsplit(target).path))
        except ValueError:  # not a URL (file://[...): a path that is not here either
            return Path(target)
    if target.startswith(("/", "./", "../", "~")):
        path = Path(target.split(";")[0].strip())
        try:
            return path.expanduser()
        except RuntimeError:  # ~user naming no user here
            return path
    return None


def _exists(path: Path) -> bool:
    """Whether a path from a request exists; a name too long or with a NUL byte does not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Interpreters


@dataclass(frozen=True)
class _Found:
    path: Path
    real: str
    version: str
    order: tuple


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
        raise PythonEnvError(f"pythonver {pythonver!r} is not a Python version such as '3.11' or '3.11.7'")
    parts = wanted.split(".")
    candidates = _candidates(search_path, pyenv_root)
    matching = [c for c in candidates if c.version.split(".")[: len(parts)] == parts]
    if matching:
        best = max(matching, key=lambda c: c.order)
        return Interpreter(path=best.path, version=best.version)
    installed = ", ".join(sorted({c.version for c in candidates}, key=_version_order)) or own.version
    if parts[0] == own.version.split(".")[0]:
        return Interpreter(
            path=own.path,
            version=own.version,
            warning=(
                f"Python {wanted} was requested but is not installed on this runner "
                f"(installed: {installed}); running with Python {own.version} instead"
            ),
        )
    raise PythonEnvError(
        f"Python {wanted} was requested but this runner has no Python {parts[0]} "
        f"(installed: {installed}); send the request with a pythonver of an installed "
        "version or route it to a runner image that has that Python"
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
    return Interpreter(path=Path(base), version=platform.python_version())


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
        own.path, os.path.realpath(own.path), own.version, _info_order(list(sys.version_info[:5]))
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
            return None if cached is None else _Found(path, cached.real, cached.version, cached.order)
    result: _Found | None = None
    try:
        completed = subprocess.run(
            [str(path), "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=20,
            env=_plain_env(os.environ),
            stdin=subprocess.DEVNULL,
        )
        if completed.returncode == 0:
            answer = json.loads(completed.stdout.strip().splitlines()[-1])
            if not answer["venv"]:
                result = _Found(path, real, str(answer["version"]), _info_order(answer["info"]))
        else:
            logger.debug("%s does not run: %s", path, completed.stderr.strip()[-300:])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as error:
        logger.debug("cannot ask %s for its version: %s", path, error)
    with _probe_lock:
        _probe_cache[token] = result
    return result


def _plain_env(env: Mapping[str, str]) -> dict[str, str]:
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


# ---------------------------------------------------------------------------------------------
# The cache


class VirtualenvCache:
    """Virtualenvs under ``root``, one per key, shared by threads and runner processes.

    Layout: ``venvs/<key>/`` (complete environments only: they appear by an atomic rename of
    ``venvs/.<key>.building``), ``locks/<key>.lock`` (``flock``: shared while an environment is
    used or looked up, exclusive while it is built or pruned; lock files are never deleted, so
    no two processes can hold locks on different files for one key).

    pip runs with the runner's pip configuration but not the runner's environment: only the
    names installs need (``PATH``, ``HOME``, ``PIP_*``, proxies, certificates, compiler flags,
    plus ``passthrough``) reach it, because sdists run arbitrary code at install time.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_unused_days: float = 3.0,
        build_timeout: float = 3600.0,
        passthrough: Iterable[str] = (),
        uv: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.uv = uv
        self.max_unused_days = max_unused_days
        self.build_timeout = build_timeout
        self.passthrough = frozenset(passthrough)
        self.venvs_dir = self.root / "venvs"
        self.locks_dir = self.root / "locks"
        self.venvs_dir.mkdir(parents=True, exist_ok=True)
        self.locks_dir.mkdir(parents=True, exist_ok=True)

    # -- public -----------------------------------------------------------------------------

    def key(self, interpreter: Interpreter, requirements: Sequence[str]) -> str:
        """Stable name of the environment; local files count by content, not by path."""
        material = json.dumps(
            [
                CACHE_FORMAT,
                interpreter.version,
                os.path.realpath(interpreter.path),
                [_key_part(r) for r in requirements],
            ],
            separators=(",", ":"),
        )
        return hashlib.blake2b(material.encode(), digest_size=12).hexdigest()

    def ensure(self, pythonver: str, requirements: Sequence[str], log: Callable[[str], None]) -> Virtualenv:
        """The environment for these (already groomed) requirements, built on first use."""
        started = time.monotonic()
        interpreter = find_interpreter(pythonver)
        warnings = (interpreter.warning,) if interpreter.warning else ()
        requirements = list(requirements)
        key = self.key(interpreter, requirements)
        final = self.venvs_dir / key
        with self._locked(key, fcntl.LOCK_SH):
            if self._complete(final):
                self._touch(final)
                return Virtualenv(
                    final, final / "bin" / "python", key, False, time.monotonic() - started, warnings
                )
        with self._locked(key, fcntl.LOCK_EX):
            if self._complete(final):
                self._touch(final)
                return Virtualenv(
                    final, final / "bin" / "python", key, False, time.monotonic() - started, warnings
                )
            self._build(interpreter, requirements, key, log)
            self._touch(final)
        seconds = time.monotonic() - started
        log(f"virtualenv {key} ready in {seconds:.1f} s")
        return Virtualenv(final, final / "bin" / "python", key, True, seconds, warnings)

    @contextmanager
    def in_use(self, venv: Virtualenv) -> Iterator[None]:
        """Hold ``venv`` against ``prune`` while a job runs in it."""
        with self._locked(venv.key, fcntl.LOCK_SH):
            self._touch(venv.path)
            yield
            self._touch(venv.path)

    def prune(self) -> list[str]:
        """Remove environments unused for longer than ``max_unused_days`` and not locked."""
        cutoff = time.time() - self.max_unused_days * 86400.0
        removed = []
        try:
            entries = list(os.scandir(self.venvs_dir))
        except OSError:
            return removed
        for entry in entries:
            name = entry.name
            if name.startswith(".trash-"):
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            building = name.startswith(".") and name.endswith(".building")
            key = name[1 : -len(".building")] if building else name
            lock = self._try_lock(key)
            if lock is None:
                continue  # in use or being built
            try:
                if not building and self._last_used(Path(entry.path)) > cutoff:
                    continue
                trash = self.venvs_dir / f".trash-{name.lstrip('.')}-{os.getpid()}-{threading.get_ident()}"
                os.rename(entry.path, trash)
            except OSError as error:
                logger.warning("cannot prune virtualenv %s: %s", name, error)
                continue
            finally:
                os.close(lock)
            shutil.rmtree(trash, ignore_errors=True)
            if not building:
                removed.append(key)
                logger.info("pruned virtualenv %s", key)
        return removed

    # -- internals --------------------------------------------------------------------------

    @contextmanager
    def _locked(self, key: str, how: int) -> Iterator[None]:
        fd = os.open(self.locks_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _try_lock(self, key: str) -> int | None:
        try:
            fd = os.open(self.locks_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _complete(path: Path) -> bool:
        return (path / MANIFEST).is_file()

    @staticmethod
    def _touch(path: Path) -> None:
        marker = path / LAST_USED
        try:
            os.utime(marker)
        except FileNotFoundError:
            marker.touch()

    @staticmethod
    def _last_used(path: Path) -> float:
        for name in (LAST_USED, MANIFEST):
            try:
                return (path / name).stat().st_mtime
            except OSError:
                continue
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    def _build(
        self, interpreter: Interpreter, requirements: list[str], key: str, log: Callable[[str], None]
    ) -> None:
        """Build in ``.<key>.building`` and rename it into place; nothing half-made survives."""
        final = self.venvs_dir / key
        building = self.venvs_dir / f".{key}.building"
        if final.exists():  # an unfinished directory from another tool or an older layout
            shutil.rmtree(final)
        shutil.rmtree(building, ignore_errors=True)
        version = tuple(int(p) for p in re.findall(r"\d+", interpreter.version)[:2])
        if version < (3, 3):
            raise PythonEnvError(
                f"Python {interpreter.version} ({interpreter.path}) has no venv module; "
                "this runner builds environments for Python 3 only"
            )
        runner_pip = self.uv is not None or _runner_pip_supports(version)
        env = self._pip_env()
        log(
            f"building virtualenv {key} with Python {interpreter.version} ({interpreter.path}), {len(requirements)} requirements"
        )
        started = time.monotonic()
        try:
            venv_cmd = [str(interpreter.path), "-m", "venv"]
            if runner_pip:
                venv_cmd.append("--without-pip")
            self._run([*venv_cmd, str(building)], env, log, what="python -m venv")
            python = building / "bin" / "python"
            (building / REQUIREMENTS).write_text("".join(f"{line}\n" for line in requirements))
            if requirements:
                self._run(
                    self._install_command(python, building / REQUIREMENTS, runner_pip),
                    env,
                    log,
                    what=f"{'uv pip' if self.uv else 'pip'} install for Python {interpreter.version}",
                )
            _relocate(building, final)
            manifest = {
                "format": CACHE_FORMAT,
                "key": key,
                "python": str(interpreter.path),
                "version": interpreter.version,
                "requirements": requirements,
                "built_at": time.time(),
                "seconds": round(time.monotonic() - started, 3),
            }
            (building / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise

    def _install_command(self, python: Path, requirements: Path, runner_pip: bool) -> list[str]:
        if self.uv is not None:
            return [
                str(self.uv),
                "pip",
                "install",
                "--python",
                str(python),
                "--no-progress",
                "-r",
                str(requirements),
            ]
        pip = (
            [sys.executable, "-m", "pip", "--python", str(python)]
            if runner_pip
            else [str(python), "-m", "pip"]
        )
        return [
            *pip,
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "-r",
            str(requirements),
        ]

    def _pip_env(self) -> dict[str, str]:
        env = {
            name: value
            for name, value in _plain_env(os.environ).items()
            if name in _PIP_ENV_NAMES
            or name.startswith(_PIP_ENV_PREFIXES)
            or name.lower() in _PROXY_NAMES
            or name in self.passthrough
        }
        for name in _PIP_ENV_REDIRECTS:
            env.pop(name, None)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env.setdefault("PATH", os.defpath)
        return env

    def _run(self, command: list[str], env: dict[str, str], log: Callable[[str], None], *, what: str) -> None:
        log("$ " + " ".join(command))
        tail: collections.deque[str] = collections.deque(maxlen=25)
        try:
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                cwd=self.root,
            )
        except OSError as error:
            raise PythonEnvError(f"{what} could not start: {error}") from None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            process.kill()

        timer = threading.Timer(self.build_timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log(line)
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            timer.cancel()
        if code != 0:
            reason = (
                f"ran past {self.build_timeout:.0f} s" if expired.is_set() else f"exited with status {code}"
            )
            raise PythonEnvError(
                f"{what} {reason}; nothing was cached. Fix or remove the failing requirement. "
                "Last lines of its output:\n" + "\n".join(tail)
            )


def _runner_pip_supports(version: tuple[int, ...]) -> bool:
    """Whether the runner's own pip can install for this interpreter (``pip --python``)."""
    if importlib.util.find_spec("pip") is None:
        return False
    try:
        pip_version = tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("pip"))[:2])
        requires = importlib.metadata.metadata("pip").get("Requires-Python") or ""
    except importlib.metadata.PackageNotFoundError:
        return False
    if pip_version < (22, 3):
        return False
    minimum = re.search(r">=\s*(\d+)\.(\d+)", requires)
    return not minimum or version >= (int(minimum.group(1)), int(minimum.group(2)))


def _relocate(building: Path, final: Path) -> None:
    """Point scripts written for the build folder at the final one before the rename."""
    old, new = str(building).encode(), str(final).encode()
    files = [building / "pyvenv.cfg"]
    with suppress(OSError):
        files += [Path(e.path) for e in os.scandir(building / "bin") if e.is_file(follow_symlinks=False)]
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if old in data and b"\0" not in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            os.chmod(path, mode)


def _key_part(requirement: str) -> str:
    """Local files are keyed by content so a per-attempt workspace path does not split the cache."""
    local = _local_path(requirement)
    if local is not None and local.is_file():
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"{local.name} sha256:{digest.hexdigest()}"
    return requirement
