"""Packed virtualenvs shared by every runner: object storage, with a node-local folder in front.

A pod's working folder starts empty, so without this every pod installs the request's whole
``pythonenv`` again. A built environment is packed (tar + zstd) once and stored under
``<prefix>/<key>.tar.zst``; a fresh runner downloads and unpacks it instead of installing.
The pack's sha256 travels as the object's metadata (written in the same PUT, so data and
checksum never disagree) and is checked before anything is unpacked: a corrupt or cut-short
pack is discarded and the environment rebuilt. The first writer wins (``If-None-Match: *``).

Bounds: the node-local folder keeps at most ``local_max_bytes`` of packs, least recently used
first out; the object-storage prefix is bounded by a lifecycle rule (deploy/README.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .archive import CONTENT_TYPES, ZSTD, ArchiveError, gnu_tar, pack, unpack, unpack_with_gnu_tar
from .request import ArtifactLocation
from .s3_uris import parse_qualified_s3_uri
from .storage import S3Store, Storage, StorageError

logger = logging.getLogger(__name__)

PACK_SUFFIX = ".tar.zst"
CHECKSUM = "sha256"
"""The metadata name (``x-amz-meta-sha256``) and the node-local sidecar's field."""
_UNPACK_BUDGET = 256 * 1024**3
"""Packs come from runners, not users; the budget only stops a planted bomb."""


class PackCorrupt(Exception):
    """A pack whose bytes do not match its checksum, or that does not unpack."""


@dataclass(frozen=True)
class PackLocation:
    """Where packs live in object storage: ``s3://host[:port]/bucket/prefix``."""

    scheme: str
    host: str
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> PackLocation:
        try:
            scheme, host, bucket, prefix = parse_qualified_s3_uri(uri)
        except ValueError as error:
            raise ValueError(f"environment cache URI: {error}") from None
        if not bucket:
            raise ValueError(
                f"environment cache URI {uri!r} names no bucket; give s3://host[:port]/bucket/prefix"
            )
        return cls(scheme, host, bucket, prefix.strip("/"))

    def key(self, env_key: str) -> str:
        return f"{self.prefix}/{env_key}{PACK_SUFFIX}" if self.prefix else f"{env_key}{PACK_SUFFIX}"


class EnvPackCache:
    """Packs by environment key: a node-local folder first, then object storage.

    ``local_dir`` None keeps a downloaded pack only until it is unpacked (a pod's emptyDir
    gains nothing from a second copy).
    """

    def __init__(
        self,
        *,
        storage: Storage | None = None,
        uri: str | None = None,
        local_dir: Path | None = None,
        scratch_dir: Path,
        local_max_bytes: int = 20 * 1024**3,
    ) -> None:
        if uri is None and local_dir is None:
            raise ValueError("an environment cache needs a URI, a local folder, or both")
        self.location = PackLocation.parse(uri) if uri else None
        self.storage = storage or Storage()
        self.local_dir = local_dir
        self.scratch_dir = scratch_dir
        self.local_max_bytes = local_max_bytes
        for folder in (local_dir, scratch_dir):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        where = []
        if self.local_dir is not None:
            where.append(str(self.local_dir))
        if self.location is not None:
            where.append(self._store().uri(self.location.bucket, self.location.key("<key>")))
        return " then ".join(where)

    # -- reading ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def fetched(self, env_key: str) -> Iterator[tuple[Path, str] | None]:
        """A verified pack of ``env_key`` on local disk and where it came from; None if nowhere.

        A pack whose bytes do not match its checksum is discarded (locally or in the store) and
        reported as absent, so the caller builds as if nothing were cached.
        """
        local = self._local_pack(env_key)
        if local is not None:
            os.utime(local)  # least recently used leaves first
            yield local, str(local)
            return
        if self.location is None:
            yield None
            return
        store = self._store()
        bucket, key = self.location.bucket, self.location.key(env_key)
        info = store.stat(bucket, key)
        if info is None:
            yield None
            return
        expected = info.metadata.get(CHECKSUM, "")
        with self._scratch_file(env_key) as (path, handle):
            digest = _Hashing(handle)
            store.download(bucket, key, digest, etag=info.etag)  # type: ignore[arg-type]
            handle.close()
            if not expected or digest.hexdigest() != expected:
                self.discard(
                    env_key,
                    f"sha256 {digest.hexdigest()} of its {digest.size} bytes does not match the stored "
                    f"{expected or '(none)'}",
                )
                yield None
                return
            self._keep_locally(env_key, path, expected)
            kept = self._local_pack(env_key, verify=False) or path
            yield kept, store.uri(bucket, key)

    def discard(self, env_key: str, reason: str) -> None:
        """Forget a bad pack everywhere, so the next builder stores a good one."""
        if self.local_dir is not None:
            self._drop_local(env_key)
        if self.location is not None:
            store = self._store()
            bucket, key = self.location.bucket, self.location.key(env_key)
            logger.warning("discarding %s: %s; the environment is rebuilt", store.uri(bucket, key), reason)
            with contextlib.suppress(StorageError):
                store.delete(bucket, key)
        else:
            logger.warning(
                "discarding the node-local pack of %s: %s; the environment is rebuilt", env_key, reason
            )

    # -- writing ----------------------------------------------------------------------------

    def publish(self, env_key: str, folder: Path, include: Callable[[Path, str], bool]) -> bool:
        """Pack ``folder`` and store it; False when another runner had stored it first."""
        started = time.monotonic()
        with self._scratch_file(env_key) as (path, handle):
            digest = _Hashing(handle)
            pack(folder, digest, compression=ZSTD, include=include)  # type: ignore[arg-type]
            handle.close()
            checksum = digest.hexdigest()
            stored = True
            where = ""
            if self.location is not None:
                store = self._store()
                bucket, key = self.location.bucket, self.location.key(env_key)
                stored = store.put_new(
                    bucket,
                    key,
                    path,
                    content_type=CONTENT_TYPES[ZSTD],
                    metadata={CHECKSUM: checksum, "environment": env_key},
                )
                where = store.uri(bucket, key)
            self._keep_locally(env_key, path, checksum)
        logger.info(
            "environment %s %s (%.1f MB packed in %.1f s)",
            env_key,
            f"stored at {where}"
            if stored and where
            else "already stored by another runner"
            if where
            else "kept locally",
            digest.size / 1e6,
            time.monotonic() - started,
        )
        return stored

    # -- node-local folder ------------------------------------------------------------------

    def _local_pack(self, env_key: str, *, verify: bool = True) -> Path | None:
        if self.local_dir is None:
            return None
        path = self.local_dir / f"{env_key}{PACK_SUFFIX}"
        try:
            expected = json.loads((self.local_dir / f"{env_key}.json").read_text())[CHECKSUM]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not path.is_file():
            return None
        if verify and _sha256(path) != expected:
            logger.warning("node-local pack %s does not match its checksum; discarding it", path)
            self._drop_local(env_key)
            return None
        return path

    def _keep_locally(self, env_key: str, path: Path, checksum: str) -> None:
        """Move a verified pack into the node-local folder (sidecar last), then trim the folder."""
        if self.local_dir is None:
            return
        try:
            sidecar = self.local_dir / f".{env_key}.json.{os.getpid()}"
            sidecar.write_text(json.dumps({CHECKSUM: checksum, "stored_at": time.time()}) + "\n")
            os.replace(path, self.local_dir / f"{env_key}{PACK_SUFFIX}")
            os.replace(sidecar, self.local_dir / f"{env_key}.json")
        except OSError as error:
            logger.warning("cannot keep environment %s in %s: %s", env_key, self.local_dir, error)
            return
        self.trim_local()

    def _drop_local(self, env_key: str) -> None:
        assert self.local_dir is not None
        for name in (f"{env_key}.json", f"{env_key}{PACK_SUFFIX}"):
            with contextlib.suppress(OSError):
                (self.local_dir / name).unlink()

    def trim_local(self) -> list[str]:
        """Drop the least recently used packs until the folder holds at most ``local_max_bytes``."""
        if self.local_dir is None:
            return []
        packs = []
        for entry in os.scandir(self.local_dir):
            if entry.name.endswith(PACK_SUFFIX) and not entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    packs.append((info.st_mtime, info.st_size, entry.name[: -len(PACK_SUFFIX)]))
        total = sum(size for _, size, _ in packs)
        dropped = []
        for _, size, env_key in sorted(packs):
            if total <= self.local_max_bytes:
                break
            self._drop_local(env_key)
            total -= size
            dropped.append(env_key)
            logger.info("dropped node-local pack of environment %s (folder over its bound)", env_key)
        return dropped

    # -- internals --------------------------------------------------------------------------

    def _store(self) -> S3Store:
        assert self.location is not None
        location = ArtifactLocation(
            scheme=self.location.scheme,
            host=self.location.host,
            bucket=self.location.bucket,
            key=self.location.prefix,
        )
        store = self.storage.store_for(location, None, os.environ)
        assert isinstance(store, S3Store)
        return store

    @contextlib.contextmanager
    def _scratch_file(self, env_key: str) -> Iterator[tuple[Path, BinaryIO]]:
        """A temporary file beside the node-local folder (so keeping it is a rename), removed after."""
        folder = self.local_dir if self.local_dir is not None else self.scratch_dir
        descriptor, name = tempfile.mkstemp(prefix=f".{env_key}.", suffix=".part", dir=folder)
        path = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                yield path, handle
        finally:
            path.unlink(missing_ok=True)


def unpack_pack(path: Path, target: Path) -> None:
    """Unpack a fetched, checksum-verified pack into ``target``; PackCorrupt if it fails.

    GNU tar does the writing where the machine has it (the runner image does): restoring is
    the whole of a fresh pod's wait, and it is 4x faster than ``tarfile`` for an environment's
    thousands of small files. Elsewhere the archive module's own unpacker does it.
    """
    tar = gnu_tar()
    try:
        with open(path, "rb") as source:
            if tar is not None:
                unpack_with_gnu_tar(source, target, budget=_UNPACK_BUDGET, tar=tar)
            else:
                unpack(source, target, budget=_UNPACK_BUDGET)
    except ArchiveError as error:
        raise PackCorrupt(str(error)) from None


class _Hashing:
    """A write-only file that hashes what passes through it on its way to ``target``."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._target.write(data)

    def flush(self) -> None:
        self._target.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
