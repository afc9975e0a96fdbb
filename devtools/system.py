"""Debian packages the demo and tests need, installed on first use.

A fresh machine has none of them; each is installed with apt when the command it provides is
missing, so `make demo` and `make test` need nothing done by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

_lock = threading.Lock()
_updated = False


class SystemPackageError(RuntimeError):
    """A Debian package could not be installed; the message holds apt's own words."""


def ensure(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` first when it is missing."""
    found = shutil.which(command) or _sbin(command)
    if found:
        return found
    with _lock:
        found = shutil.which(command) or _sbin(command)
        if found:
            return found
        _install(package)
    found = shutil.which(command) or _sbin(command)
    if not found:
        raise SystemPackageError(f"installed {package} but {command} is still not on PATH")
    return found


def ensure_venv_support() -> None:
    """Debian ships ``venv``'s pip bootstrap (ensurepip) apart from Python, in python3.X-venv;
    `make setup` runs this with the system Python before it creates ``.venv``."""
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        pass
    else:
        return
    with _lock:
        _install(f"python{sys.version_info.major}.{sys.version_info.minor}-venv")


def _sbin(command: str) -> str | None:
    for folder in ("/usr/sbin", "/sbin", "/usr/lib/rabbitmq/bin"):
        candidate = os.path.join(folder, command)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _install(package: str) -> None:
    global _updated
    if os.geteuid() != 0:
        raise SystemPackageError(f"{package} is not installed; run: sudo apt-get install -y {package}")
    print(f"installing {package} (Debian package)…", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "install", "-y", "-q", "--no-install-recommends", package]]
    if not _updated:
        steps.insert(0, ["apt-get", "update", "-q"])
    for argv in steps:
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemPackageError(
                f"{' '.join(argv)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
    _updated = True


if __name__ == "__main__":
    try:
        ensure_venv_support()
    except SystemPackageError as error:
        sys.exit(f"error: {error}")
