"""A request's requirement lines, groomed into what the runner installs (RUNNER_PROTOCOL §4.5).

Clients send their whole ``pip freeze`` plus ``config.pip``; some of those lines cannot work on
a runner (a client's local paths, pip options) and some must change (editable VCS installs).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_INLINE_COMMENT = re.compile(r"(^|(?<!\s)\s+)#.*$")  # (?<!\s): each blank run is tried once, not per blank
_VCS = re.compile(r"^(git|hg|svn|bzr)\+", re.IGNORECASE)
_PKG_RESOURCES = re.compile(r"^pkg[-_.]resources\b", re.IGNORECASE)


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
        local = local_path(target)
        if local is not None and _exists(local):
            return str(local)
        warning(f"pythonenv: dropped {line!r}: an editable install of a path that is not on this runner")
        return None
    if line.startswith("-"):
        warning(
            f"pythonenv: dropped {line!r}: pip options in a request are ignored, the runner's pip configuration applies"
        )
        return None
    local = local_path(line)
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


def local_path(line: str) -> Path | None:
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
