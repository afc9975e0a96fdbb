"""The environment a workload runs with.

Upstream handed the job the runner's whole environment and expanded ``%NAME%`` in
``config.env`` from it, so any request could read the runner's AMQP URL, SQS keys or
decryption key paths (``"LEAK": "%AMQP_URL%"``). Here the job starts from a small allow-list
instead, and ``%NAME%`` can only name what is already on that list.

The workload also runs as the runner's user, so ``/proc/<runner pid>/environ`` would give the
same secrets back; ``hide_runner_process`` closes that door (see docs/security.md for what a
workload sharing the runner's user can still read).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping

from .layout import ExperimentLayout
from .pythonenv import Virtualenv
from .request import Request

logger = logging.getLogger(__name__)

BASE_NAMES = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")
"""Names taken from the runner's environment; everything else must be passed through by name."""

DEFAULT_LOCALE = "C.UTF-8"
_PERCENT = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


PR_SET_DUMPABLE = 4


def hide_runner_process() -> bool:
    """Make this process non-dumpable: its ``/proc/<pid>/environ``, ``mem`` and ``ptrace`` then need
    CAP_SYS_PTRACE, which runner pods drop, so a workload cannot read the runner's environment.

    The workload is dumpable again after its ``exec`` (debuggers work on it); the runner gives up
    core dumps and same-user ``py-spy``. ``/proc/<pid>/cmdline`` stays world-readable: secrets
    belong in the environment or in files, never on the command line. True when it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            return True
        error = ctypes.get_errno()
    except (OSError, AttributeError) as problem:
        error = getattr(problem, "errno", None) or 0
    logger.warning(
        "cannot make the runner non-dumpable (%s): workloads may read its environment",
        os.strerror(error) if error else "no prctl",
    )
    return False


def clean_base(base_env: Mapping[str, str] | None = None, passthrough: Iterable[str] = ()) -> dict[str, str]:
    """The allow-listed part of the runner's environment, with a UTF-8 locale by default."""
    source = os.environ if base_env is None else base_env
    base = {name: source[name] for name in (*BASE_NAMES, *passthrough) if name in source}
    base.setdefault("LANG", DEFAULT_LOCALE)
    base.setdefault("LC_ALL", DEFAULT_LOCALE)
    base.setdefault("PATH", os.defpath)
    return base


def expand_percent(value: str, base: Mapping[str, str]) -> str:
    """Upstream's ``%NAME%`` expansion: set and non-empty names are replaced, others stay literal."""
    return _PERCENT.sub(lambda m: base.get(m.group(1)) or m.group(0), value)


def job_environment(
    request: Request,
    layout: ExperimentLayout,
    *,
    venv: Virtualenv,
    allocation_env: Mapping[str, str],
    base_env: Mapping[str, str] | None = None,
    passthrough: Iterable[str] = (),
) -> dict[str, str]:
    """The complete environment of the job process, built in this order (later wins):

    1. the clean base: ``PATH HOME LANG LC_ALL TZ USER LOGNAME`` and the ``passthrough`` names
       from ``base_env`` (default ``os.environ``, read for those names only), ``LANG``/``LC_ALL``
       ``C.UTF-8`` when unset; nothing else of the runner's environment reaches the job;
    2. ``config.env``, ``%NAME%`` expanded from the clean base only, so ``%HOME%`` works and
       ``%AMQP_URL%`` stays literal. Values containing ``$`` are left out here: the job script
       exports them so bash expands them as upstream did (see ``job_script_exports``);
    3. the venv's ``bin`` put first on ``PATH`` (also on a ``PATH`` from ``config.env``), then
       names a request cannot override: ``STUDIOML_EXPERIMENT``, ``STUDIOML_HOME``, ``TMPDIR``,
       ``VIRTUAL_ENV``, ``PYTHONUNBUFFERED=1`` (unless ``config.env`` sets it) and last the
       allocation (``CUDA_VISIBLE_DEVICES``...), so a request cannot widen its GPU or core share.
    """
    base = clean_base(base_env, passthrough)
    env = dict(base)
    for name, value in _config_env(request, base).items():
        if "$" not in value:
            env[name] = value
    venv_bin = str(venv.path / "bin")
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != venv_bin:
        env["PATH"] = venv_bin + (os.pathsep + path if path else "")
    env["STUDIOML_EXPERIMENT"] = layout.name
    env["STUDIOML_HOME"] = str(layout.root)
    env["TMPDIR"] = str(layout.tmp_dir)
    env["VIRTUAL_ENV"] = str(venv.path)
    if "PYTHONUNBUFFERED" not in request.config.env:
        env["PYTHONUNBUFFERED"] = "1"
    env.update(allocation_env)
    return env


def job_script_exports(
    request: Request,
    *,
    allocation_env: Mapping[str, str] = {},
    base_env: Mapping[str, str] | None = None,
    passthrough: Iterable[str] = (),
) -> dict[str, str]:
    """The ``config.env`` entries whose ``$VAR`` references bash expands in the job script.

    Only values containing ``$`` and names a request may set; they are evaluated against the
    job environment (so ``PATH="$PATH:/opt/x"`` extends the venv-first ``PATH``).
    """
    owned = {"STUDIOML_EXPERIMENT", "STUDIOML_HOME", "TMPDIR", "VIRTUAL_ENV", *allocation_env}
    base = clean_base(base_env, passthrough)
    exports = {}
    for name, value in _config_env(request, base).items():
        if "$" in value and name not in owned:
            if _SHELL_NAME.match(name):
                exports[name] = value
            else:
                logger.warning("config.env name %r cannot be exported by a shell; ignored", name)
    return exports


def _config_env(request: Request, base: Mapping[str, str]) -> dict[str, str]:
    """``config.env`` after ``%NAME%`` expansion, less names no process environment can hold."""
    result = {}
    for name, value in request.config.env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            logger.warning("config.env entry %r is not a valid environment variable; ignored", name)
            continue
        result[name] = expand_percent(value, base)
    return result
