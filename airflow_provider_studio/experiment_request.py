"""One StudioML experiment as the request a ``studio-runner`` takes, with its inputs staged in S3.

This is what ``studio run`` does on an experimenter's laptop, without the laptop: pack the
workspace folder, store it content-addressed under ``blobstore/`` (only when it is not there
yet), and name the result artifacts under ``experiments/<key>/``. The request model itself is
``studio_runner.request``; this module only fills it in. It knows nothing of operators, so ENN
DAGs and tests can build requests directly.

Credentials never go into a request: artifacts carry no ``credentials`` block, so the runner
uses its own AWS credential chain, which the operator feeds from a Kubernetes Secret or from
the Airflow connection (local mode).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shlex
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from studio_runner.request import Artifact, Config, Experiment, Request, Resources, decode_request
from studio_runner.s3_uris import parse_s3_uri, qualified_s3_uri
from studio_runner.units import format_duration, is_seconds_number, parse_seconds

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

log = logging.getLogger(__name__)

WORKSPACE_LABEL = "workspace"
RESULT_LABELS = ("output", "modeldir", "retval", "_metadata")
"""Mutable artifacts the runner uploads, where the StudioML client looks for them."""
BLOBSTORE_PREFIX = "blobstore/"
EXPERIMENTS_PREFIX = "experiments/"

CREDENTIAL_NAMES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
"""Refused in ``env``: the runner would use them as artifact keys, and they would sit in the request."""

PACKED_MTIME = 946_684_800
"""Every packed entry's time (2000-01-01): real times would give a folder a new hash on every checkout."""

SKIPPED_NAMES = frozenset({"__pycache__"})
"""Not packed: bytecode is rebuilt anyway, and with the fixed entry time above a stale ``.pyc``
(same size, same time as an edited source) would be loaded instead of the source."""

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
"""An ``s3://`` input with one of these is unpacked by the runner; anything else is copied as is."""

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# --- naming ----------------------------------------------------------------------------------


def default_experiment_key(dag_id: str, run_id: str, task_id: str, map_index: int | None = -1) -> str:
    """A readable experiment key unique to one task instance, safe as an S3 path segment.

    Retries of a task instance share the key, as a re-sent StudioML experiment does, so results
    land in the same ``experiments/<key>/`` prefix; each attempt still gets its own scrape file.
    """
    parts = [dag_id, run_id, task_id]
    if map_index is not None and map_index >= 0:
        parts.append(str(map_index))
    key = "_".join(_KEY_UNSAFE.sub("_", part).strip("_.") or "_" for part in parts)
    if len(key) > 200:  # keep it readable and still unique
        digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()
        key = f"{key[:183]}-{digest}"
    return key


def results_prefix(key: str) -> str:
    """Where one experiment's results live in the results bucket."""
    return f"{EXPERIMENTS_PREFIX}{key}/"


# --- where S3 is -----------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Endpoint:
    """The object store an Airflow AWS connection points at, as a runner must name it.

    ``qualified`` URIs carry the host (``s3://host:port/bucket/key``) because that is all a
    runner learns of the store; for AWS itself the regional host carries the region.
    """

    host: str
    url: str | None = None
    """The connection's ``endpoint_url``; None for AWS's own endpoints."""
    region: str | None = None

    @classmethod
    def from_hook(cls, hook: S3Hook) -> S3Endpoint:
        url = hook.conn_config.get_service_endpoint_url("s3")
        region = hook.conn_config.region_name
        if url:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            if not parts.hostname:
                raise ValueError(f"the AWS connection's endpoint_url {url!r} names no host")
            if parts.path.strip("/"):
                raise ValueError(
                    f"the AWS connection's endpoint_url {url!r} has a path; studio-runner addresses "
                    "buckets as s3://host:port/bucket/key, so give the server's root URL"
                )
            return cls(host=parts.netloc.rpartition("@")[2], url=url.rstrip("/"), region=region)
        if not region:
            try:
                region = hook.conn_region_name
            except Exception:  # no region anywhere: the global endpoint still works
                region = None
        host = f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"
        return cls(host=host, url=None, region=region)

    @property
    def https(self) -> bool:
        """Whether the runner must be told ``--s3-https`` (it assumes HTTP for non-AWS hosts)."""
        return bool(self.url) and self.url.lower().startswith("https://")

    @property
    def browse_url(self) -> str:
        """A URL of the store for people (extra links): the endpoint, or the AWS regional one."""
        return self.url or f"https://{self.host}"

    def qualified(self, bucket: str, key: str) -> str:
        return qualified_s3_uri(self.host, bucket, key)


# --- what the experimenter gives -------------------------------------------------------------


@dataclass
class ExperimentSpec:
    """What ``studio run`` is told: script or module, arguments, workspace, environment, limits.

    :param key: experiment key; names ``experiments/<key>/`` in the results bucket.
    :param script: file in the workspace to run (``python -u <script> <args>``).
    :param module: or a module to run (``python -u -m <module> <args>``), as ``studio run pkg::mod``.
    :param args: arguments, each shell-quoted as the client does; a string is split like a shell.
    :param workspace: local folder (packed and uploaded content-addressed), an ``s3://bucket/key``
        tar already in the store, or None for an empty workspace (module runs).
    :param pythonver: Python ``major.minor`` of the workload's virtualenv; default the caller's.
    :param pythonenv: requirement lines (``pip freeze`` style); keep empty for a fast start.
    :param pip: extra packages (``config.pip``).
    :param resources: ``cpus``, ``ram``, ``hdd``, ``gpus``, ``gpuCount``, ``gpuMem``.
    :param max_duration: per-attempt limit, a Go duration (``"2h"``), seconds or a timedelta.
    :param lifetime: ``experimentLifetime``: the work is no longer wanted after this long.
    :param project: StudioML project.
    :param inputs: more immutable inputs, label → ``s3://bucket/key`` or a local file or folder.
    :param env: environment of the workload (``config.env``); no credentials.
    """

    key: str
    script: str | None = None
    module: str | None = None
    args: Sequence[Any] | str | None = ()
    workspace: str | os.PathLike[str] | None = None
    pythonver: str | None = None
    pythonenv: Sequence[str] | None = ()
    pip: Sequence[str] | None = ()
    resources: Mapping[str, Any] | Resources | str | None = None
    max_duration: str | float | timedelta | None = None
    lifetime: str | float | timedelta | None = None
    project: str | None = None
    inputs: Mapping[str, str | os.PathLike[str]] | None = None
    env: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if bool(self.script) == bool(self.module):
            raise ValueError("give exactly one of script (a file in the workspace) or module (-m)")
        if self.script and self.workspace in (None, ""):
            raise ValueError(f"script {self.script!r} needs a workspace folder (or s3:// tar) that holds it")
        leaked = sorted(CREDENTIAL_NAMES & set(self.env or {}))
        if leaked:
            raise ValueError(
                f"env sets {', '.join(leaked)}: credentials must not travel in a StudioML request; the "
                "runner gets them from the AWS connection (local mode) or a Kubernetes Secret (pod mode)"
            )
        reserved = {WORKSPACE_LABEL, *RESULT_LABELS} & set(self.inputs or {})
        if reserved:
            raise ValueError(f"input labels {sorted(reserved)} are reserved for the standard artifacts")
        # the request model's own rules for keys and labels, before anything is uploaded
        Experiment(key=self.key, artifacts={label: Artifact() for label in self.inputs or {}})

    @property
    def filename(self) -> str:
        return shlex.quote(self.script) if self.script else "-m"

    def quoted_args(self) -> list[str]:
        """``args`` as the client sends them: each one ``shlex.quote``-d, the module first for ``-m``."""
        raw = self.args
        if raw is None:
            items: list[Any] = []
        elif isinstance(raw, str):
            items = shlex.split(raw)
        else:
            items = list(raw)
        if self.module:
            items.insert(0, self.module)
        return [shlex.quote(_text(item)) for item in items]

    def resources_model(self) -> Resources:
        return resources_from(self.resources)


def resources_from(value: Mapping[str, Any] | Resources | str | None) -> Resources:
    """StudioML resources from a mapping, or from its text as a template renders it."""
    if isinstance(value, Resources):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)  # a rendered Python dict: {'gpus': 1}
            except (ValueError, SyntaxError):
                raise ValueError(f"resources {value!r} is not a mapping such as {{'gpus': 1}}") from None
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"resources must be a mapping such as {{'gpus': 1}}, not {type(value).__name__}")
    return Resources.model_validate(dict(value or {}))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _lines(value: Sequence[Any] | str | None) -> list[str]:
    """Requirement lines from a list, or from one (rendered) text of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    return [str(line) for line in value]


def _duration(value: str | float | timedelta | None, what: str) -> str | None:
    """A Go duration the runner parses, or None; refused here rather than silently ignored there."""
    if value is None or value == "":
        return None
    try:
        seconds = parse_seconds(value)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    if seconds <= 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    if isinstance(value, str) and not is_seconds_number(value):
        return value.strip()  # a Go duration travels as it was written
    return format_duration(seconds)


# --- packing ---------------------------------------------------------------------------------


def pack(source: Path, destination: Any) -> int:
    """Write ``source`` (folder or file) as a deterministic tar; returns the number of entries.

    A folder's entries are bare relative names (``train.py``, ``pkg/mod.py``) in sorted order and
    a single file is ``./<name>``, as the StudioML client packs them. Times, owners and modes
    are fixed (modes keep only the executable bit), so the same content always gives the
    same bytes and so the same blob key.
    """
    count = 0
    with tarfile.open(fileobj=destination, mode="w", format=tarfile.PAX_FORMAT) as archive:
        if source.is_dir():
            for path, name in _walk(source):
                if _add(archive, path, name, source):
                    count += 1
        elif source.is_file():
            count += int(_add(archive, source, f"./{source.name}", source.parent))
        else:
            raise ValueError(f"{source} is neither a file nor a folder")
    return count


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """Entries under ``root``, parents before children, names sorted, links not followed."""
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        children = []
        for entry in entries:
            if entry.name in SKIPPED_NAMES:
                continue
            name = f"{prefix}{entry.name}"
            path = Path(entry.path)
            yield path, name
            if entry.is_dir(follow_symlinks=False):
                children.append((path, f"{name}/"))
        stack.extend(reversed(children))


def _add(archive: tarfile.TarFile, path: Path, name: str, root: Path) -> bool:
    info = tarfile.TarInfo(name)
    status = os.lstat(path)
    if stat.S_ISDIR(status.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISLNK(status.st_mode):
        target = os.readlink(path)
        resolved = (path.parent / target).resolve()
        if os.path.isabs(target) or not resolved.is_relative_to(root.resolve()):
            raise ValueError(
                f"{path} links to {target}, outside {root}; the runner refuses such links, so copy the "
                "file in instead"
            )
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    elif stat.S_ISREG(status.st_mode):
        info.size = status.st_size
        info.mode = 0o755 if status.st_mode & stat.S_IXUSR else 0o644
    else:
        log.warning("not packing %s: not a file, folder or link", path)
        return False
    info.mtime = PACKED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isreg():
        with open(path, "rb") as data:
            archive.addfile(info, data)
    else:
        archive.addfile(info)
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


# --- staging ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedInput:
    """One immutable input and what staging it took."""

    label: str
    uri: str
    source: str
    uploaded: bool
    """False when the blob was already in the store (or the input was an ``s3://`` URI)."""
    size: int | None = None


@dataclass
class RequestBuilder:
    """Turns ``ExperimentSpec``s into requests whose artifacts live in one bucket.

    Blobs and results share the bucket, as with the StudioML client's storage config; the
    endpoint and region come from the S3Hook's connection.
    """

    hook: S3Hook
    bucket: str
    endpoint: S3Endpoint = field(init=False)
    staged: list[StagedInput] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise ValueError(f"results bucket must be a bucket name, not {self.bucket!r}")
        self.endpoint = S3Endpoint.from_hook(self.hook)

    def build(self, spec: ExperimentSpec, *, time_added: float | None = None) -> Request:
        """The request for ``spec``; local inputs are uploaded first if the store lacks them."""
        # everything that can be refused without the store is checked before anything is uploaded
        args = spec.quoted_args()
        resources = spec.resources_model()
        max_duration = _duration(spec.max_duration, "max_duration")
        lifetime = _duration(spec.lifetime, "lifetime")
        self.staged = []
        artifacts: dict[str, Artifact] = {WORKSPACE_LABEL: self._workspace(spec)}
        for label, source in sorted((spec.inputs or {}).items()):
            artifacts[label] = self._input(label, source)
        for label in RESULT_LABELS:
            key = f"{results_prefix(spec.key)}{label}.tar"
            artifacts[label] = self._artifact(key, mutable=True, unpack=True)
        experiment = Experiment(
            key=spec.key,
            filename=spec.filename,
            args=args,
            pythonver=spec.pythonver or f"{sys.version_info.major}.{sys.version_info.minor}",
            pythonenv=_lines(spec.pythonenv),
            artifacts=artifacts,
            resources_needed=resources,
            max_duration=max_duration,
            time_added=time.time() if time_added is None else time_added,
            project=spec.project or None,
        )
        config = Config(
            env={str(k): v if isinstance(v, (dict, list)) else _text(v) for k, v in (spec.env or {}).items()},
            pip=_lines(spec.pip),
            experimentLifetime=lifetime,
        )
        request = Request(experiment=experiment, config=config)
        # The runner's own decoder is the judge: a request it would refuse is refused here.
        return decode_request(request.to_wire())

    def _workspace(self, spec: ExperimentSpec) -> Artifact:
        workspace = spec.workspace
        if workspace is None or workspace == "":
            with tempfile.TemporaryDirectory(prefix="studio-empty-workspace-") as empty:
                return self._stage(WORKSPACE_LABEL, Path(empty), "(empty workspace)")
        if isinstance(workspace, str) and workspace.startswith("s3://"):
            return self._reference(WORKSPACE_LABEL, workspace, unpack=True)
        folder = Path(workspace).expanduser()
        if not folder.is_dir():
            raise ValueError(f"workspace {folder} is not a folder (give a folder or an s3:// tar)")
        if spec.script and not (folder / spec.script).is_file():
            raise ValueError(f"script {spec.script!r} is not a file in the workspace {folder}")
        return self._stage(WORKSPACE_LABEL, folder, str(folder))

    def _input(self, label: str, source: str | os.PathLike[str]) -> Artifact:
        if isinstance(source, str) and source.startswith("s3://"):
            return self._reference(label, source, unpack=None)
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"input {label!r}: {path} does not exist (give a local path or an s3:// URI)")
        return self._stage(label, path, str(path))

    def _stage(self, label: str, source: Path, description: str) -> Artifact:
        """Pack ``source`` and store it as ``blobstore/<sha256>.tar`` unless that is already there."""
        with tempfile.TemporaryDirectory(prefix="studio-pack-") as scratch:
            packed = Path(scratch) / "blob.tar"
            with open(packed, "wb") as out:
                pack(source, out)
            key = f"{BLOBSTORE_PREFIX}{_sha256(packed)}.tar"
            size = packed.stat().st_size
            present = self.hook.check_for_key(key, bucket_name=self.bucket)
            if not present:
                # replace=True: the key names the content, so a concurrent upload wrote the same bytes
                self.hook.load_file(packed, key=key, bucket_name=self.bucket, replace=True)
        uri = self.endpoint.qualified(self.bucket, key)
        log.info(
            "%s %s: %s (%d bytes) %s",
            label,
            description,
            uri,
            size,
            "already stored" if present else "uploaded",
        )
        self.staged.append(StagedInput(label, uri, description, uploaded=not present, size=size))
        return self._artifact(key, mutable=False, unpack=True)

    def _reference(self, label: str, uri: str, *, unpack: bool | None) -> Artifact:
        """An object already in the store, named Airflow's way (``s3://bucket/key``)."""
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        if not self.hook.check_for_key(key, bucket_name=bucket):
            raise ValueError(f"{label}: {uri} does not exist in {self.endpoint.browse_url}")
        if unpack is None:
            unpack = key.lower().endswith(TAR_SUFFIXES)
        qualified = self.endpoint.qualified(bucket, key)
        self.staged.append(StagedInput(label, qualified, uri, uploaded=False))
        return Artifact(qualified=qualified, bucket=bucket, key=key, mutable=False, unpack=unpack)

    def _artifact(self, key: str, *, mutable: bool, unpack: bool) -> Artifact:
        return Artifact(
            qualified=self.endpoint.qualified(self.bucket, key),
            bucket=self.bucket,
            key=key,
            mutable=mutable,
            unpack=unpack,
        )


def build_request(
    spec: ExperimentSpec,
    *,
    bucket: str,
    aws_conn_id: str | None = "aws_default",
    hook: S3Hook | None = None,
) -> Request:
    """The request for ``spec``, staging its inputs in ``bucket`` through the AWS connection."""
    if hook is None:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        hook = S3Hook(aws_conn_id=aws_conn_id)
    return RequestBuilder(hook, bucket).build(spec)
