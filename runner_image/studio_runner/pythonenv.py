"""The shared virtualenv cache the workloads run in.

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
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from .archive import ArchiveError
from .envcache import EnvPackCache, PackCorrupt, unpack_pack
from .interpreters import Interpreter, PythonEnvError, find_interpreter, plain_env
from .requirements import local_path
from .storage import StorageError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
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


@dataclass(frozen=True)
class Virtualenv:
    """A ready environment; ``built`` tells whether this call had to build it."""

    path: Path
    python: Path
    key: str
    built: bool
    seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)
    restored: str = ""
    """Where a packed copy came from when this call restored it instead of building."""


class VirtualenvCache:
    """Virtualenvs under ``root``, one per key, shared by threads and runner processes.

    Layout: ``venvs/<key>/`` (complete environments only: they appear by an atomic rename of
    ``venvs/.<key>.building``), ``locks/<key>.lock`` (``flock``: shared while an environment is
    used or looked up, exclusive while it is built or pruned; lock files are never deleted, so
    no two processes can hold locks on different files for one key).

    pip runs with the runner's pip configuration but not the runner's environment: only the
    names installs need (``PATH``, ``HOME``, ``PIP_*``, proxies, certificates, compiler flags,
    plus ``passthrough``) reach it, because sdists run arbitrary code at install time.

    With ``packs``, an environment this cache lacks is first looked for there (packed by
    another runner or pod) and every environment built here is stored there.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_unused_days: float = 3.0,
        build_timeout: float = 3600.0,
        passthrough: Iterable[str] = (),
        uv: Path | None = None,
        packs: EnvPackCache | None = None,
    ) -> None:
        self.root = Path(root)
        self.uv = uv
        self.packs = packs
        self.max_unused_days = max_unused_days
        self.build_timeout = build_timeout
        self.passthrough = frozenset(passthrough)
        self.venvs_dir = self.root / "venvs"
        self.locks_dir = self.root / "locks"
        self.venvs_dir.mkdir(parents=True, exist_ok=True)
        self.locks_dir.mkdir(parents=True, exist_ok=True)

    # -- public -----------------------------------------------------------------------------

    def key(self, interpreter: Interpreter, requirements: Sequence[str]) -> str:
        """Stable name of the environment; local files count by content, not by path.

        Not the interpreter's path: environments are shared between machines, and any
        interpreter of the same version, implementation, ABI, platform and libc runs them.
        """
        material = json.dumps(
            [
                CACHE_FORMAT,
                interpreter.version,
                interpreter.abi or os.path.realpath(interpreter.path),
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
            source = self._restore(interpreter, key, log) if self.packs is not None else None
            if source:
                self._touch(final)
                seconds = time.monotonic() - started
                log(f"environment {key} restored from cache in {seconds:.1f} s")
                return Virtualenv(final, final / "bin" / "python", key, False, seconds, warnings, source)
            self._build(interpreter, requirements, key, log)
            self._touch(final)
            if self.packs is not None:
                self._publish(key)
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

    # -- the shared cache of packed environments --------------------------------------------

    def _restore(self, interpreter: Interpreter, key: str, log: Callable[[str], None]) -> str | None:
        """Unpack a packed copy over a fresh skeleton; where it came from, or None to build.

        The skeleton (``python -m venv --without-pip``, 0.1 s) gives this machine's interpreter
        links and ``pyvenv.cfg``; the pack brings everything else, its paths then rewritten from
        the builder's folder to this one. Anything wrong with the pack means building instead.
        """
        assert self.packs is not None
        final = self.venvs_dir / key
        building = self.venvs_dir / f".{key}.building"
        try:
            with self.packs.fetched(key) as found:
                if found is None:
                    return None
                pack, source = found
                if final.exists():
                    shutil.rmtree(final)
                shutil.rmtree(building, ignore_errors=True)
                self._run(
                    [str(interpreter.path), "-m", "venv", "--without-pip", str(building)],
                    self._pip_env(),
                    log,
                    what="python -m venv",
                )
                try:
                    unpack_pack(pack, building)
                    manifest = json.loads((building / MANIFEST).read_text())
                    built_in = str(manifest["path"])
                except (PackCorrupt, OSError, ValueError, KeyError, TypeError) as error:
                    self.packs.discard(key, f"it does not unpack into an environment: {error}")
                    shutil.rmtree(building, ignore_errors=True)
                    return None
                _relocate(building, built_in, str(final))
                manifest.update(path=str(final), restored_from=source, restored_at=time.time())
                (building / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
                os.rename(building, final)
                return source
        except (StorageError, PythonEnvError, ArchiveError, OSError) as error:
            logger.warning(
                "cannot restore environment %s from the shared cache (%s); building it", key, error
            )
            shutil.rmtree(building, ignore_errors=True)
            return None

    def _publish(self, key: str) -> None:
        """Store a freshly built environment for other runners; a failure costs them a build only."""
        assert self.packs is not None
        folder = self.venvs_dir / key
        try:
            self.packs.publish(key, folder, include=lambda path, name: _packable(folder, path, name))
        except (StorageError, ArchiveError, OSError) as error:
            logger.warning("cannot store environment %s in the shared cache: %s", key, error)

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
                "this runner builds environments for Python 3 only",
                permanent=True,
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
                # pip reports an index it could not reach at debug level only: keep its debug log
                pip_log = None if self.uv else self.root / f".{key}.pip-debug.log"
                try:
                    self._run(
                        self._install_command(python, building / REQUIREMENTS, runner_pip, pip_log),
                        env,
                        log,
                        what=f"{'uv pip' if self.uv else 'pip'} install for Python {interpreter.version}",
                        debug_log=pip_log,
                    )
                finally:
                    if pip_log is not None:
                        pip_log.unlink(missing_ok=True)
            _relocate(building, str(building), str(final))
            manifest = {
                "format": CACHE_FORMAT,
                "key": key,
                "path": str(final),
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

    def _install_command(
        self, python: Path, requirements: Path, runner_pip: bool, debug_log: Path | None = None
    ) -> list[str]:
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
            *(["--log", str(debug_log)] if debug_log is not None else []),
            "-r",
            str(requirements),
        ]

    def _pip_env(self) -> dict[str, str]:
        env = {
            name: value
            for name, value in plain_env(os.environ).items()
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

    def _run(
        self,
        command: list[str],
        env: dict[str, str],
        log: Callable[[str], None],
        *,
        what: str,
        debug_log: Path | None = None,
    ) -> None:
        """Run one build step; a failure raises ``PythonEnvError``, permanent when the index
        answered that a requirement does not exist (``install_trouble`` on its output and
        ``debug_log``)."""
        log("$ " + " ".join(command))
        tail: collections.deque[str] = collections.deque(maxlen=25)
        signs: set[str] = set()
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
                signs.update(install_trouble(line))
                log(line)
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            timer.cancel()
        if code != 0:
            if debug_log is not None:
                with suppress(OSError), open(debug_log, encoding="utf-8", errors="replace") as lines:
                    for line in lines:
                        signs.update(install_trouble(line))
            if expired.is_set():
                reason, permanent = f"ran past {self.build_timeout:.0f} s; nothing was cached", False
            elif UNREACHABLE in signs:
                reason, permanent = (
                    f"exited with status {code}: a package index could not be reached; nothing was cached "
                    "and another attempt will try again",
                    False,
                )
            elif UNRESOLVABLE in signs:
                reason, permanent = (
                    f"exited with status {code}: a requirement cannot be resolved (no such package or "
                    "version, or conflicting pins); nothing was cached. Fix or remove the failing requirement",
                    True,
                )
            else:
                reason, permanent = f"exited with status {code}; nothing was cached", False
            raise PythonEnvError(
                f"{what} {reason}. Last lines of its output:\n" + "\n".join(tail), permanent=permanent
            )


UNREACHABLE = "unreachable"
UNRESOLVABLE = "unresolvable"
_INSTALLER_SIGNS = (
    # pip (urllib3 underneath; its debug log says "connection error:") and uv (reqwest) on a
    # refused, timed-out, unknown-host or failing index. pip then also says "No matching
    # distribution", so this sign wins. An index's 404 ("not here") is not among them.
    (
        UNREACHABLE,
        re.compile(
            r"Retrying \(Retry\(|NewConnectionError|ConnectTimeoutError|ReadTimeoutError|Max retries exceeded"
            r"|Connection (refused|reset|aborted)|timed out|Temporary failure in name resolution"
            r"|Name or service not known|Network is unreachable|No route to host|ProxyError"
            r"|connection error:|problem confirming the ssl certificate"
            r"|Failed to fetch|error sending request|tcp connect error|dns error"
            r"|Request failed after \d+ retries|too many 5\d\d error responses|server error",
            re.IGNORECASE,
        ),
    ),
    # the index answered, and the requirement is not there (or the pins contradict each other)
    (
        UNRESOLVABLE,
        re.compile(
            r"No matching distribution found for|Could not find a version that satisfies"
            r"|ResolutionImpossible|conflicting dependencies|Invalid requirement"
            r"|No solution found when resolving|not found in the package registry"
            r"|requirements are unsatisfiable",
            re.IGNORECASE,
        ),
    ),
)


def install_trouble(line: str) -> set[str]:
    """What one line of pip's or uv's output says went wrong: ``UNREACHABLE``, ``UNRESOLVABLE``.

    Both installers exit 1 whether the package is missing or the index is down, so the verdict
    comes from their messages. One rule for both: any sign of an unreachable index means the
    attempt is retried (a missing package cannot be told from a missing index then); only an
    index that answered "not here" makes the request invalid.
    """
    return {sign for sign, pattern in _INSTALLER_SIGNS if pattern.search(line)}


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


def _packable(folder: Path, path: Path, name: str) -> bool:
    """What a pack carries: not the interpreter links or ``pyvenv.cfg`` (the restoring machine's
    own skeleton has those), nor this cache's last-used marker."""
    if name in ("pyvenv.cfg", LAST_USED):
        return False
    if path.is_symlink():
        target = os.path.realpath(path)
        return os.path.commonpath([os.path.realpath(folder), target]) == os.path.realpath(folder)
    return True


def _relocate(building: Path, old_path: str, new_path: str) -> None:
    """Point scripts in ``building`` written for ``old_path`` at ``new_path`` (a build's final
    folder, or this machine's folder for a restored pack)."""
    old, new = old_path.encode(), new_path.encode()
    if old == new:
        return
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
    local = local_path(requirement)
    if local is not None and local.is_file():
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"{local.name} sha256:{digest.hexdigest()}"
    return requirement
