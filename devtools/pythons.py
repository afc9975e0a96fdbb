"""The oldest Python the runner supports, found on this machine, and the repository's pins for it.

The runner must install on Python 3.10.12+ (the GPU images' Ubuntu 22.04 ships 3.10), while the
development environment runs a newer one. Tests and the image build prove the old path with a
real 3.10 interpreter: pyenv's ``$PYENV_ROOT/versions/3.10.*`` or ``python3.10`` on PATH, found
the way the runner finds interpreters for experiments. ``constraints.txt`` is the development
environment's freeze; on the old Python it applies wherever its pinned version supports that
Python (a few pins, e.g. ``jsonpatch==1.47``, need 3.11 and are resolved afresh there).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from studio_runner.archive import SUPPORTED_PYTHONS
from studio_runner.pythonenv import Interpreter, PythonEnvError, find_interpreter

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
OLDEST = "3.10"
"""The oldest major.minor the runner supports (``runner_image/pyproject.toml``)."""
OLDEST_PATCH = (3, 10, 12)
"""3.10 gained tarfile's extraction filters (PEP 706) in 3.10.12."""
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


class MissingPython(RuntimeError):
    """No usable oldest-supported Python here; the message says how to get one."""


def oldest_python() -> Interpreter:
    """The newest installed Python 3.10 (3.10.12 or later), or :class:`MissingPython`."""
    how = (
        f"install it with pyenv (`pyenv install 3.10.13`, into {PYENV_ROOT}/versions, or set "
        f"PYENV_ROOT) or put python{OLDEST} on PATH; the runner supports Python {SUPPORTED_PYTHONS}"
    )
    try:
        found = find_interpreter(OLDEST, pyenv_root=PYENV_ROOT)
    except PythonEnvError as error:
        raise MissingPython(f"no Python {OLDEST} here ({error}): {how}") from None
    version = tuple(int(part) for part in re.findall(r"\d+", found.version)[:3])
    if found.warning or version[:2] != OLDEST_PATCH[:2]:
        raise MissingPython(f"no Python {OLDEST} here (found only {found.version}): {how}")
    if version < OLDEST_PATCH:
        raise MissingPython(f"{found.path} is Python {found.version}, older than 3.10.12 (PEP 706): {how}")
    return found


def constraints_for(python_version: str) -> list[str]:
    """The ``name==version`` lines of constraints.txt whose pinned release installs on
    ``python_version``, judged by its ``Requires-Python`` as installed in this environment."""
    lines = []
    for line in CONSTRAINTS.read_text().splitlines():
        pin = line.split("#", 1)[0].strip()
        if "==" not in pin:
            continue
        name = pin.split("==", 1)[0].strip()
        try:
            requires = importlib.metadata.metadata(name).get("Requires-Python") or ""
        except importlib.metadata.PackageNotFoundError:
            requires = ""
        try:
            if requires and python_version not in SpecifierSet(requires):
                continue
        except InvalidSpecifier:
            pass
        lines.append(pin)
    return lines
