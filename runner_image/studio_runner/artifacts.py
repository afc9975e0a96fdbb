"""The artifacts of one experiment attempt: fetched before the run, uploaded during and after.

Fetch failures are written to the experiment's output log as well as raised, because the
``output`` artifact is the only place a StudioML user looks. Uploads are skipped when a
folder's listing has not changed, ``retval`` is packed the one way the StudioML client
accepts, and ``_metadata`` goes strictly last so its presence means the results are stored.
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

from .archive import (
    CONTENT_TYPES,
    ArchiveError,
    ArchiveTooLarge,
    compression_for_key,
    has_content,
    pack,
    unpack,
)
from .cache import DownloadCache
from .layout import METADATA_LABEL, OUTPUT_LABEL, ExperimentLayout
from .limits import LIFETIME_EPOCH_FLOOR
from .metadata import SCRAPE_FILE_PREFIX, parse_scrape_file_name
from .request import Artifact, ArtifactLocation, Request
from .storage import LocalStore, ObjectInfo, ObjectStore, Storage, StorageError
from .units import format_size

log = logging.getLogger(__name__)

T = TypeVar("T")

SINGULARITY_LABEL = "_singularity"
RETVAL_LABEL = "retval"
METADATA_PREFIX = "metadata/"
NOT_FETCHED = frozenset({METADATA_LABEL, OUTPUT_LABEL, SINGULARITY_LABEL})
"""``_metadata`` and ``output`` are written fresh by the runner each attempt; ``_singularity``
is an image fetched by the container mode, not by the pre-fetch."""
_CHUNK = 1024 * 1024
_UNLIMITED = 1 << 62
EARLIER_ATTEMPTS_READ = 200
"""Scrape documents read at most when looking for an earlier success (newest first)."""
CLOCK_SLACK_SECONDS = 300.0
"""How far a runner's clock may be behind the client's ``time_added``."""


class ArtifactError(Exception):
    """An artifact could not be fetched or stored; the attempt must not be acked."""

    def __init__(
        self, label: str, uri: str, reason: str, *, others: int = 0, permanent: bool = False
    ) -> None:
        more = f" (and {others} more artifact{'s' if others > 1 else ''} failed)" if others else ""
        super().__init__(f"artifact {label!r} ({uri}): {reason}{more}")
        self.label = label
        self.uri = uri
        self.reason = reason
        self.permanent = permanent
        """True for an unsafe archive or one over the disk budget: another attempt fails the same way."""


class ObjectNotFound(Exception):
    """An immutable input does not exist in storage."""


class DiskBudgetExceeded(Exception):
    """The request's ``hdd`` would be exceeded; raised from inside unpacking, so not an OSError."""


class DiskBudget:
    """``resources_needed.hdd`` shared by the artifacts fetched in parallel (0 means no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int:
        return _UNLIMITED if not self.limit else max(0, self.limit - self.used)

    def check(self, size: int, what: str) -> None:
        if self.limit and size > self.remaining:
            raise DiskBudgetExceeded(
                f"{what} is {format_size(size)} but only {format_size(self.remaining)} of the request's "
                f"{format_size(self.limit)} disk (resources_needed.hdd) is left; ask for more hdd"
            )

    def charge(self, size: int) -> None:
        with self._lock:
            if self.limit and self.used + size > self.limit:
                raise DiskBudgetExceeded(
                    f"artifacts take more than the request's {format_size(self.limit)} disk "
                    "(resources_needed.hdd); ask for more hdd"
                )
            self.used += size

    def release(self, size: int) -> None:
        """Give back what a failed artifact had taken; its files are gone."""
        with self._lock:
            self.used = max(0, self.used - size)


def fingerprint(folder: Path) -> str:
    """A digest of a folder's listing (names, sizes, modes, mtimes), not of its contents.

    Cheap enough to run on every checkpoint tick over large model folders; a job that rewrites
    a file changes its mtime, which is all change detection needs.
    """
    digest = hashlib.blake2b(digest_size=16)
    for current, folders, files in os.walk(folder, followlinks=False):
        folders.sort()
        for name in sorted([*folders, *files]):
            path = os.path.join(current, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            relative = os.path.relpath(path, folder)
            digest.update(f"{relative}\0{info.st_size}\0{info.st_mode}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class ArtifactSet:
    """Fetches and returns the artifacts of one attempt laid out by ``layout``."""

    def __init__(
        self,
        request: Request,
        layout: ExperimentLayout,
        storage: Storage,
        *,
        cache: DownloadCache | None,
        note: Callable[[str], None],
        max_workers: int = 8,
    ) -> None:
        self.request = request
        self.layout = layout
        self.storage = storage
        self.cache = cache
        self.note = note
        self.max_workers = max_workers
        self.budget = DiskBudget(request.experiment.resources_needed.hdd_bytes)
        self._fingerprints: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def artifacts(self) -> dict[str, Artifact]:
        return self.request.experiment.artifacts

    # --- fetching --------------------------------------------------------------------------
    def fetch_all(self) -> None:
        """Fetch every input in parallel; ArtifactError (after noting why) if one cannot be had."""
        labels = sorted(
            label for label, a in self.artifacts.items() if a.qualified and label != SINGULARITY_LABEL
        )
        for label in labels:
            self.layout.artifact_dir(label).mkdir(parents=True, exist_ok=True)
        wanted = [label for label in labels if label not in NOT_FETCHED]
        started = time.monotonic()
        _, failures = self._parallel(wanted, self._fetch_one)
        log.info(
            "fetched %d artifacts of %s in %.2fs",
            len(wanted) - len(failures),
            self.request.key,
            time.monotonic() - started,
        )
        if failures:
            errors = [self._as_error(label, error) for label, error in sorted(failures.items())]
            for error in errors:
                self.note(f"failed when downloading user data: {error}")
                log.warning("experiment %s: %s", self.request.key, error)
            first = errors[0]
            raise ArtifactError(
                first.label,
                first.uri,
                first.reason,
                others=len(errors) - 1,
                permanent=all(error.permanent for error in errors),
            )

    def _fetch_one(self, label: str) -> None:
        artifact = self.artifacts[label]
        location = artifact.location
        target = self.layout.artifact_dir(label)
        store = self._store(label)
        charged = 0

        def charge(size: int) -> None:
            nonlocal charged
            self.budget.charge(size)
            charged += size

        try:
            info = store.stat(location.bucket, location.key)
            if info is None:
                if not artifact.mutable:
                    raise ObjectNotFound("the object does not exist")
                log.debug(
                    "mutable artifact %s does not exist yet at %s; starting empty", label, self.uri(label)
                )
            else:
                self.budget.check(info.size, f"artifact {label!r}")
                if artifact.unpack:
                    with self._opened(store, location, info) as stream:
                        try:
                            written = unpack(stream, target, budget=self.budget.remaining, charge=charge)
                        except ArchiveTooLarge as error:
                            if not self.budget.limit:
                                raise
                            raise DiskBudgetExceeded(
                                f"{error}; the request's disk is {format_size(self.budget.limit)} "
                                "(resources_needed.hdd); ask for more hdd"
                            ) from None
                    log.debug("unpacked %s: %d bytes from a %d byte object", label, written, info.size)
                else:
                    charge(info.size)
                    self._copy(store, location, info, target)
        except BaseException:
            _empty(target)  # a refused bomb must not keep the disk it managed to fill
            self.budget.release(charged)
            raise
        if artifact.mutable:
            self._remember(label, fingerprint(target))

    @contextmanager
    def _opened(self, store: ObjectStore, location: ArtifactLocation, info: ObjectInfo) -> Iterator[BinaryIO]:
        """The object's bytes, from the cache, the local file, or a private temporary copy."""
        if isinstance(store, LocalStore):
            with open(store.path(location.bucket, location.key), "rb") as stream:
                yield stream
            return

        def fill(out: BinaryIO) -> None:
            store.download(location.bucket, location.key, out, etag=info.etag or None)

        if self.cache is not None and info.etag:
            # Scoped by endpoint and bucket: a request may name any S3 server, and a hostile one
            # could answer with another object's ETag to plant content in the shared cache.
            key = f"s3://{_host(location)}/{location.bucket}#{info.etag}"
            with self.cache.open(key, fill, size=info.size) as stream:
                yield stream
            return
        self.layout.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.layout.tmp_dir) as stream:
            fill(stream)  # type: ignore[arg-type]
            stream.seek(0)
            yield stream  # type: ignore[misc]

    def _copy(self, store: ObjectStore, location: ArtifactLocation, info: ObjectInfo, target: Path) -> None:
        """``unpack: false``: the object lands as ``<label>/<basename(key)>``."""
        name = PurePosixPath(location.key).name
        if not name or name in (".", ".."):
            raise ArchiveError(f"object key {location.key!r} has no file name to copy it to")
        destination = target / name
        partial = target / f".{name}.partial"
        try:
            with open(partial, "wb") as out:
                if self.cache is None or isinstance(store, LocalStore):
                    store.download(location.bucket, location.key, out, etag=info.etag or None)  # type: ignore[arg-type]
                else:
                    with self._opened(store, location, info) as stream:
                        shutil.copyfileobj(stream, out, _CHUNK)
            os.replace(partial, destination)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    # --- uploading -------------------------------------------------------------------------
    def checkpoint(self) -> list[str]:
        """Upload the mutable artifacts that changed; failures are logged, the run goes on."""
        uploaded, failures = self._parallel(self._returnable(), self._upload_one)
        for label, error in sorted(failures.items()):
            log.warning(
                "experiment %s: checkpoint of %s failed: %s",
                self.request.key,
                label,
                self._as_error(label, error),
            )
        return sorted(label for label, uri in uploaded.items() if uri is not None)

    def upload_results(self) -> dict[str, str]:
        """The final pass: changed mutable artifacts in parallel, then ``_metadata`` files last.

        ``_metadata`` is skipped when anything else failed, so a metadata record in the bucket
        always means the experiment's results are stored too.
        """
        started = time.monotonic()
        uploaded, failures = self._parallel(self._returnable(), self._upload_one)
        results = {label: uri for label, uri in sorted(uploaded.items()) if uri is not None}
        if failures:
            errors = [self._as_error(label, error) for label, error in sorted(failures.items())]
            for error in errors:
                self.note(f"failed when uploading results: {error}")
                log.error("experiment %s: %s", self.request.key, error)
            first = errors[0]
            raise ArtifactError(first.label, first.uri, first.reason, others=len(errors) - 1)
        results.update(self.upload_metadata())
        log.info(
            "uploaded %d results of %s in %.2fs", len(results), self.request.key, time.monotonic() - started
        )
        return results

    def refresh_retval(self) -> bool:
        """Upload ``retval`` again with a fresh member time; False when there is none to send.

        The StudioML client ignores a ``retval`` not newer than the submit time it records
        only after publishing, so a fast runner must send a newer copy a little later.
        """
        artifact = self.artifacts.get(RETVAL_LABEL)
        if artifact is None or not artifact.mutable or not artifact.qualified:
            return False
        try:
            return self._upload_one(RETVAL_LABEL, force=True) is not None
        except Exception as error:
            raise self._as_error(RETVAL_LABEL, error) from error

    def scrape_uri(self, name: str) -> str | None:
        """Where the metadata file ``name`` is uploaded; None if the request keeps no metadata."""
        target = self._metadata_target(name)
        if target is None:
            return None
        location, key = target
        if location.scheme == "file":
            return f"file://{key}"
        return f"s3://{_host(location)}/{location.bucket}/{key}"

    def uri(self, label: str) -> str:
        """The artifact's qualified URI with any user information in the host removed."""
        location = self.artifacts[label].location
        if location.scheme == "file":
            return location.uri
        return f"s3://{_host(location)}/{location.bucket}/{location.key}"

    def _returnable(self) -> list[str]:
        return sorted(
            label
            for label, a in self.artifacts.items()
            if a.mutable and a.qualified and label not in (METADATA_LABEL, SINGULARITY_LABEL)
        )

    def _upload_one(self, label: str, *, force: bool = False) -> str | None:
        """Pack and upload one folder if it changed; its URI, or None when skipped."""
        artifact = self.artifacts[label]
        location = artifact.location
        folder = self.layout.artifact_dir(label)
        if not folder.is_dir():
            return None
        current = fingerprint(folder)  # before packing: changes made while packing count as new
        with self._lock:
            if not force and self._fingerprints.get(label) == current:
                log.debug("%s unchanged since its last transfer; not uploading", label)
                return None
        if not has_content(folder):
            log.info("%s is empty; not uploading it", label)
            return None
        compression = compression_for_key(location.key)
        mtime = time.time() if label == RETVAL_LABEL else None
        self.layout.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=self.layout.tmp_dir, prefix=f"{label}.", suffix=".tar"
        ) as packed:
            pack(folder, packed, compression=compression, mtime=mtime)
            packed.flush()
            self._store(label).upload(
                location.bucket, location.key, Path(packed.name), content_type=CONTENT_TYPES[compression]
            )
        self._remember(label, current)
        log.info("uploaded %s to %s", label, self.uri(label))
        return self.uri(label)

    def upload_metadata(self) -> dict[str, str]:
        """Each file under ``_metadata/`` as its own object, ``metadata/<relative path>``."""
        folder = self.layout.metadata_dir
        if self._metadata_target("") is None or not folder.is_dir():
            return {}
        results: dict[str, str] = {}
        store = self._store(METADATA_LABEL)
        for current, folders, files in os.walk(folder):
            folders.sort()
            for name in sorted(files):
                path = Path(current) / name
                relative = path.relative_to(folder).as_posix()
                if (
                    name.startswith(".")
                    or path.is_symlink()
                    or not path.is_file()
                    or path.stat().st_size == 0
                ):
                    continue  # half-written (dot) files and empty scrape results are not published
                location, key = self._metadata_target(relative)  # type: ignore[misc]
                content_type = "application/json" if name.endswith(".json") else "application/octet-stream"
                try:
                    store.upload(location.bucket, key, path, content_type=content_type)
                except (StorageError, OSError) as error:
                    uri = self.scrape_uri(relative) or relative
                    self.note(f"failed when uploading results: metadata file {relative} ({uri}): {error}")
                    raise ArtifactError(METADATA_LABEL, uri, str(error)) from error
                results[f"{METADATA_LABEL}/{relative}"] = self.scrape_uri(relative) or key
        return results

    def _metadata_target(self, relative: str) -> tuple[ArtifactLocation, str] | None:
        return metadata_target(self.request, relative)

    # --- plumbing --------------------------------------------------------------------------
    def _store(self, label: str) -> ObjectStore:
        return self.storage.store_for(
            self.artifacts[label].location, self.request.aws_credentials(label), self.request.config.env
        )

    def _remember(self, label: str, value: str) -> None:
        with self._lock:
            self._fingerprints[label] = value

    def _parallel(
        self, labels: list[str], work: Callable[[str], T]
    ) -> tuple[dict[str, T], dict[str, BaseException]]:
        results: dict[str, T] = {}
        failures: dict[str, BaseException] = {}
        if not labels:
            return results, failures
        with ThreadPoolExecutor(
            max_workers=min(self.max_workers, len(labels)), thread_name_prefix="artifact"
        ) as pool:
            # each task runs in a copy of this thread's context, so its log lines keep the experiment
            futures = {label: pool.submit(contextvars.copy_context().run, work, label) for label in labels}
            for label, future in futures.items():
                try:
                    results[label] = future.result()
                except Exception as error:
                    failures[label] = error
        return results, failures

    def _as_error(self, label: str, error: BaseException) -> ArtifactError:
        if isinstance(error, ArtifactError):
            return error
        if isinstance(error, (ArchiveError, DiskBudgetExceeded)):
            return ArtifactError(label, self.uri(label), str(error), permanent=True)
        if isinstance(error, (StorageError, ObjectNotFound)):
            reason = str(error)
        elif isinstance(error, OSError):
            reason = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        else:
            log.error("unexpected error with artifact %s", label, exc_info=error)
            reason = f"{type(error).__name__}: {error}"
        return ArtifactError(label, self.uri(label), reason)


def metadata_target(request: Request, relative: str) -> tuple[ArtifactLocation, str] | None:
    """Metadata files go to the bucket root (``file://``: beside the artifact's key)."""
    artifact = request.experiment.artifacts.get(METADATA_LABEL)
    if artifact is None or not artifact.mutable or not artifact.qualified:
        return None
    location = artifact.location
    if location.scheme == "file":
        return location, str(PurePosixPath(location.key).parent / "metadata" / relative)
    return location, METADATA_PREFIX + relative


def find_earlier_success(request: Request, storage: Storage) -> str | None:
    """The scrape URI of an earlier attempt of ``request`` that succeeded, or None.

    A runner that dies after storing its results (scrape document last) but before its ack
    leaves a message the broker hands out again; finding that attempt lets the message be acked
    instead of run twice. Scrape files are named by host and start time, not by key, so the
    attempts that started after the request was added are read, newest first.
    """
    target = metadata_target(request, SCRAPE_FILE_PREFIX)
    if target is None:
        return None  # the request keeps no scrape documents: nothing to tell by
    location, prefix = target
    store = storage.store_for(location, request.aws_credentials(METADATA_LABEL), request.config.env)
    added = request.experiment.time_added
    since = (
        added - CLOCK_SLACK_SECONDS
        if added is not None and math.isfinite(added) and added > LIFETIME_EPOCH_FLOOR
        else None
    )
    candidates = []
    for info in store.list(location.bucket, prefix):
        parsed = parse_scrape_file_name(info.key)
        if parsed is not None and (since is None or parsed[1] >= since):
            candidates.append((parsed[1], info.key))
    candidates.sort(reverse=True)
    if len(candidates) > EARLIER_ATTEMPTS_READ:
        log.warning(
            "%d scrape documents may belong to %s; reading the newest %d",
            len(candidates),
            request.key,
            EARLIER_ATTEMPTS_READ,
        )
    for _, key in candidates[:EARLIER_ATTEMPTS_READ]:
        text = io.BytesIO()
        store.download(location.bucket, key, text)
        try:
            studioml = json.loads(text.getvalue()).get("studioml")
            if studioml["status"] == "succeeded" and studioml["experiment"]["key"] == request.key:
                return (
                    f"file://{key}"
                    if location.scheme == "file"
                    else f"s3://{_host(location)}/{location.bucket}/{key}"
                )
        except (ValueError, AttributeError, KeyError, TypeError):
            continue  # not a scrape document of ours
    return None


def _host(location: ArtifactLocation) -> str:
    return location.host.rpartition("@")[2]


def _empty(folder: Path) -> None:
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
