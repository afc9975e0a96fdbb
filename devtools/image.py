"""The runner image, built here with podman: a local Debian base, then ``runner_image/Dockerfile``.

No image registry is reachable from development and CI machines, so the Dockerfile's usual
bases (``python:3.12-slim``, ``nvidia/cuda:…``) cannot be pulled. Instead a Debian root filesystem
is made with ``debootstrap --variant=minbase`` and imported as ``localhost/studio-base:<suite>``.
The suite is trixie (Python 3.13): bookworm's Python 3.11.2 lacks the tarfile extraction filters
(PEP 706, Python 3.10.12+/3.11.4+) the runner unpacks archives with, and the Dockerfile refuses
such a base. ``STUDIO_BASE_SUITE`` picks another suite.
``--python 3.10`` builds on the oldest Python the runner supports instead, as the CUDA images
(Ubuntu 22.04, Python 3.10) do; Ubuntu's archives are not reachable here, so the base is Debian
bookworm without its own python3 (3.11.2, too old) plus this machine's pyenv-built 3.10.12+ tree
(``devtools.pythons``) copied to ``/opt/python3.10``, with the shared libraries it links.
Making it downloads ~40 MB and takes minutes, so the tarball is kept outside the repository
(``/var/cache/studio-runner-image/``, ``STUDIO_IMAGE_CACHE`` to move it) and the imported image is
reused while its recipe is unchanged. ``python -m devtools.image build`` is ``make image``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import pythons, system

REPO = Path(__file__).resolve().parent.parent
CONTEXT = REPO / "runner_image"
DOCKERFILE = CONTEXT / "Dockerfile"
CACHE_DIR = Path(os.environ.get("STUDIO_IMAGE_CACHE") or "/var/cache/studio-runner-image")

PODMAN_GLOBAL = ("--cgroup-manager=cgroupfs", "--runtime=runc")
"""How this machine's podman must be called (no systemd, runc rather than crun)."""
RUN_LIMITS = ("--network=host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")

SUITE = os.environ.get("STUDIO_BASE_SUITE") or "trixie"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_PACKAGES = ("ca-certificates", "passwd", "python3", "python3-venv", "tini")
"""What the Dockerfile would otherwise install with apt: Python 3.11 with venv, tini, useradd."""
BASE_IMAGE = f"localhost/studio-base:{SUITE}"
RECIPE_LABEL = "io.studio-runner.base-recipe"
RECIPE_VERSION = 2
"""Bump when the base is made differently; the cached tarball and image are then rebuilt."""
OLDEST_PYTHON_SUITE = "bookworm"
"""The suite the pyenv-built 3.10 tree links against (this machine's); its python3 is left out."""
OLDEST_PYTHON_PREFIX = f"/opt/python{pythons.OLDEST}"
OLDEST_PYTHON_PACKAGES = (
    "ca-certificates", "passwd", "tini",
    # what the tree's interpreter and lib-dynload link (ldd), less Tk: no workload needs tkinter
    "libbz2-1.0", "libcrypt1", "libexpat1", "libffi8", "liblzma5", "libncursesw6", "libnsl2",
    "libreadline8", "libsqlite3-0", "libssl3", "libtirpc3", "libuuid1", "zlib1g",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Base:
    """What a base image is made of: a Debian suite, its packages, and optionally a Python tree."""

    suite: str
    packages: tuple[str, ...]
    image: str
    python_tree: Path | None = None
    python_version: str = ""

    def recipe(self) -> str:
        """A short digest of everything that shapes the base; part of the tarball's name."""
        parts: list[object] = [RECIPE_VERSION, self.suite, MIRROR, SECURITY_MIRROR, sorted(self.packages)]
        if self.python_tree is not None:
            parts += [self.python_version, OLDEST_PYTHON_PREFIX]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]

    def tarball(self) -> Path:
        return CACHE_DIR / f"studio-base-{self.image.rsplit(':', 1)[1]}-{self.recipe()}.tar"


DEFAULT_BASE = Base(SUITE, BASE_PACKAGES, BASE_IMAGE)


def oldest_python_base() -> Base:
    """Bookworm plus this machine's Python 3.10.12+ tree (:class:`pythons.MissingPython` if none)."""
    found = pythons.oldest_python()
    tree = found.path.resolve().parent.parent
    if not (tree / "lib" / f"python{pythons.OLDEST}" / "ensurepip").is_dir():
        raise ImageBuildError(f"{tree} is not a whole Python installation (no ensurepip): use a pyenv build")
    return Base(
        OLDEST_PYTHON_SUITE,
        OLDEST_PYTHON_PACKAGES,
        f"localhost/studio-base:{OLDEST_PYTHON_SUITE}-python{found.version}",
        tree,
        found.version,
    )


IMAGE_NAME = "localhost/studio-runner"
SOURCE_URL = "https://github.com/airflow-provider-studio/airflow-provider-studio"


def _ca_bundle() -> Path | None:
    """This machine's CA bundle, handed to the build as a secret: PyPI may sit behind a TLS proxy."""
    for candidate in (
        os.environ.get("STUDIO_BUILD_CA_BUNDLE"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """A step of the base or image build failed; the message names the step and its output."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def podman(*args: str) -> list[str]:
    return [system.ensure("podman", "podman"), *PODMAN_GLOBAL, *args]


def _tools() -> None:
    """podman, its runtime and debootstrap, installed with apt on first use."""
    system.ensure("podman", "podman")
    system.ensure("runc", "runc")


def run_step(
    argv: Sequence[str], step: str, progress: Progress, *, stdin: int | None = None, cwd: Path | None = None
) -> str:
    """Run one command, streaming its output as progress; fail with the step's name and tail."""
    started = time.monotonic()
    progress(f"==> {step}")
    tail: collections.deque[str] = collections.deque(maxlen=60)
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=cwd,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"},
        )
    except OSError as error:
        raise ImageBuildError(f"{step}: cannot start {argv[0]}: {error.strerror}") from None
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        progress(f"    {line}")
    code = process.wait()
    if code != 0:
        raise ImageBuildError(
            f"{step} failed (exit status {code}).\ncommand: {' '.join(argv)}\nlast output:\n"
            + "\n".join(tail)
        )
    progress(f"    ({step}: {time.monotonic() - started:.0f}s)")
    return "\n".join(tail)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One builder at a time per machine: test sessions and `make image` may overlap."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- base -----------------------------------------------------------------------------------
def recipe() -> str:
    """The default base's recipe digest."""
    return DEFAULT_BASE.recipe()


def base_tarball() -> Path:
    return DEFAULT_BASE.tarball()


def _image_label(image: str, label: str) -> str | None:
    """The label's value, or None when the image is not in local storage."""
    found = subprocess.run(podman("image", "exists", image), capture_output=True)
    if found.returncode != 0:
        return None
    inspected = subprocess.run(
        podman("image", "inspect", "--format", "{{json .Labels}}", image), capture_output=True, text=True
    )
    labels = json.loads(inspected.stdout or "null") or {}
    return labels.get(label, "")


def ensure_base(progress: Progress = _stderr, *, rebuild: bool = False, base: Base = DEFAULT_BASE) -> str:
    """``base.image`` (``localhost/studio-base:<suite>``), imported from the cached tarball or made first."""
    _tools()
    with _locked("base"):
        if not rebuild and _image_label(base.image, RECIPE_LABEL) == base.recipe():
            progress(f"==> base image {base.image} is present (recipe {base.recipe()})")
            return base.image
        tarball = base.tarball()
        if rebuild or not tarball.exists():
            _debootstrap(tarball, progress, base)
        else:
            progress(f"==> reusing the cached root filesystem {tarball}")
        python = f" + Python {base.python_version} in {OLDEST_PYTHON_PREFIX}" if base.python_tree else ""
        run_step(
            podman(
                "import",
                "--change", f"LABEL {RECIPE_LABEL}={base.recipe()}",
                "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change", "ENV LANG=C.UTF-8",
                "--change", 'CMD ["/bin/bash"]',
                "--message", f"debootstrap --variant=minbase {base.suite} + {' '.join(base.packages)}{python}",
                str(tarball),
                base.image,
            ),
            f"podman import {tarball.name} as {base.image}",
            progress,
        )  # fmt: skip
        return base.image


def _debootstrap(tarball: Path, progress: Progress, base: Base = DEFAULT_BASE) -> None:
    debootstrap = system.ensure("debootstrap", "debootstrap")
    rootfs = CACHE_DIR / f"rootfs-{base.recipe()}.partial"
    if rootfs.exists():
        progress(f"==> removing an unfinished root filesystem {rootfs}")
        _remove_rootfs(rootfs)
    try:
        run_step(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(base.packages)}",
                "--components=main",
                base.suite,
                str(rootfs),
                MIRROR,
            ],
            f"debootstrap --variant=minbase {base.suite} + {' '.join(base.packages)} (takes minutes)",
            progress,
        )
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: {MIRROR}\nSuites: {base.suite} {base.suite}-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            f"Types: deb\nURIs: {SECURITY_MIRROR}\nSuites: {base.suite}-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
        shutil.copy("/etc/resolv.conf", rootfs / "etc/resolv.conf")
        run_step(
            [
                "chroot", str(rootfs), "/bin/sh", "-ec",
                "apt-get update -q && apt-get -y -q --no-install-recommends dist-upgrade"
                " && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log",
            ],
            f"security and point-release updates ({base.suite}-updates, {base.suite}-security)",
            progress,
        )  # fmt: skip
        (rootfs / "etc/resolv.conf").write_text("")
        if base.python_tree is not None:
            _add_python_tree(rootfs, base, progress)
        partial = tarball.with_suffix(".tar.partial")
        run_step(
            [
                "tar", "--create", "--file", str(partial), "--directory", str(rootfs),
                "--numeric-owner", "--xattrs", "--exclude=./dev/*", "--exclude=./proc/*",
                "--exclude=./sys/*", "--exclude=./run/*", "--exclude=./tmp/*", ".",
            ],
            f"packing the root filesystem into {tarball}",
            progress,
        )  # fmt: skip
        partial.rename(tarball)
        for old in CACHE_DIR.glob(f"studio-base-{base.image.rsplit(':', 1)[1]}-*.tar"):
            if old != tarball:
                old.unlink()
    finally:
        _remove_rootfs(rootfs)


def _add_python_tree(rootfs: Path, base: Base, progress: Progress) -> None:
    """Copy the Python tree to a neutral prefix: it finds its stdlib from its own location, and
    its libpython (whose RUNPATH names the build prefix) through an ld.so.conf entry."""
    assert base.python_tree is not None
    target = rootfs / OLDEST_PYTHON_PREFIX.lstrip("/")
    progress(f"==> copying Python {base.python_version} from {base.python_tree} to {OLDEST_PYTHON_PREFIX}")
    shutil.copytree(
        base.python_tree, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    (rootfs / "etc/ld.so.conf.d/python.conf").write_text(f"{OLDEST_PYTHON_PREFIX}/lib\n")
    bin_dir = rootfs / "usr/local/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in (f"python{pythons.OLDEST}", "python3", "python"):
        (bin_dir / name).unlink(missing_ok=True)
        (bin_dir / name).symlink_to(f"{OLDEST_PYTHON_PREFIX}/bin/python{pythons.OLDEST}")
    run_step(
        ["chroot", str(rootfs), "/bin/sh", "-ec",
         "ldconfig && python3 -c 'import ssl, sqlite3, ctypes, lzma, bz2, venv, ensurepip, tarfile;"
         " assert tarfile.data_filter; import sys; print(sys.version)'"],
        f"Python {base.python_version} runs at {OLDEST_PYTHON_PREFIX} on {base.suite}'s libraries",
        progress,
    )  # fmt: skip


def _remove_rootfs(rootfs: Path) -> None:
    """A debootstrapped tree may hold mounts (/proc when a step failed midway): never follow them."""
    for mount in ("proc", "sys", "dev/pts"):
        if os.path.ismount(rootfs / mount):
            subprocess.run(["umount", "--lazy", str(rootfs / mount)], check=False)
    shutil.rmtree(rootfs, ignore_errors=True)


# --- image ----------------------------------------------------------------------------------
def runner_version() -> str:
    """The ``version`` of runner_image/pyproject.toml (the project supports Python 3.10: no tomllib)."""
    found = re.search(r'^version\s*=\s*"([^"]+)"', (CONTEXT / "pyproject.toml").read_text(), re.MULTILINE)
    if not found:
        raise ImageBuildError(f'no version = "..." line in {CONTEXT / "pyproject.toml"}')
    return found.group(1)


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def build_image(
    progress: Progress = _stderr,
    *,
    base_image: str | None = None,
    tags: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    python: str | None = None,
) -> str:
    """Build ``runner_image/`` and return the image ID; the local base is made when none is given.

    ``python="3.10"``: on the oldest-Python base, tagged ``<version>-python3.10``."""
    if python is not None and python != pythons.OLDEST:
        raise ImageBuildError(f"--python {python}: only {pythons.OLDEST} (the oldest supported) is offered")
    if python and base_image:
        raise ImageBuildError("--python and --base-image both choose the base; give one")
    try:
        chosen = oldest_python_base() if python else DEFAULT_BASE
    except pythons.MissingPython as error:
        raise ImageBuildError(str(error)) from None
    base = base_image or ensure_base(progress, base=chosen)
    version = runner_version()
    suffix = f"-python{python}" if python else ""
    tags = tuple(tags) or (f"{IMAGE_NAME}:{version}{suffix}", f"{IMAGE_NAME}:latest{suffix}")
    revision = _git("rev-parse", "HEAD") or "unknown"
    if revision != "unknown" and _git("status", "--porcelain", "--", "runner_image"):
        revision += "-dirty"
    created = _git("log", "-1", "--format=%cI") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ca_bundle = _ca_bundle()
    secrets = ("--secret", f"id=ca-bundle,src={ca_bundle}") if ca_bundle else ()
    with _locked("image"):
        iidfile = CACHE_DIR / f"iid-{os.getpid()}"
        argv = podman(
            "build",
            "--network=host",
            "--layers",
            "--file", str(DOCKERFILE),
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"VERSION={version}",
            "--build-arg", f"REVISION={revision}",
            "--build-arg", f"CREATED={created}",
            "--build-arg", f"SOURCE={SOURCE_URL}",
            "--iidfile", str(iidfile),
            *secrets,
            *(option for tag in tags for option in ("--tag", tag)),
            *extra_args,
            str(CONTEXT),
        )  # fmt: skip
        try:
            run_step(
                argv, f"podman build {CONTEXT.relative_to(REPO)} on {base} as {', '.join(tags)}", progress
            )
            image_id = iidfile.read_text().strip()
        finally:
            iidfile.unlink(missing_ok=True)
    progress(f"==> built {image_id} ({', '.join(tags)})")
    return image_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.image", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help=f"make or reuse {BASE_IMAGE}")
    base.add_argument("--rebuild", action="store_true", help="debootstrap again even when cached")
    build = commands.add_parser("build", help="build the runner image (the local base unless --base-image)")
    build.add_argument("--base-image", help="BASE_IMAGE build argument, e.g. a mirrored python:3.12-slim")
    build.add_argument(
        "--tag", action="append", default=[], help="image name(s); default studio-runner:VERSION"
    )
    build.add_argument(
        "--python",
        choices=[pythons.OLDEST],
        help="build on the oldest supported Python (bookworm + this machine's pyenv 3.10.12+), "
        "as the CUDA images have; tagged VERSION-pythonX.Y",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.command == "base":
            ensure_base(rebuild=args.rebuild)
        else:
            build_image(base_image=args.base_image, tags=args.tag, python=args.python)
    except (ImageBuildError, system.SystemPackageError) as error:
        _stderr(f"error: {error}")
        return 1
    _stderr(f"==> done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
