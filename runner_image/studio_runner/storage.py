"""Object storage for artifacts: S3-compatible servers through boto3, and plain folders.

A request names its storage only as ``s3://host:port/bucket/key``; the scheme, region and
keys have to be worked out the way upstream did (plain HTTP for non-AWS hosts, the region
inside AWS host names, anonymous access for empty keys). Transfers ride out storage outages
with our own back-off because a checkpoint lost to a five-minute S3 hiccup loses real work,
while errors no retry can fix (missing bucket, bad keys) fail at once with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import boto3
import botocore
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from .request import ArtifactLocation, AwsCredentials

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK = 1024 * 1024
_AWS_REGIONAL_HOST = re.compile(r"^s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com$")
_AWS_GLOBAL_HOSTS = ("s3.amazonaws.com", "s3-external-1.amazonaws.com")
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled"}
)
_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)


class StorageError(Exception):
    """A transfer failed for good: ``code`` is the S3 error code when the server gave one."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ObjectMissing(StorageError):
    """The bucket or the key does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    """Without the quotes S3 wraps it in; the download cache is keyed by it."""
    last_modified: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    """User metadata (``x-amz-meta-*``), from ``stat`` only: listings do not carry it."""


_ALREADY_THERE = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
"""Answers to a put-if-absent when another writer got there first (409: one is still writing)."""


@dataclass
class StorageSettings:
    """How the runner reaches storage; one set per runner, not per request."""

    https: bool = False
    """Non-AWS hosts use plain HTTP unless this is set, as upstream (the URI cannot say)."""
    ca_bundle: str | None = None
    max_attempts: int = 3
    """Attempts botocore makes per request before our own outage loop sees the error."""
    outage_seconds: float = 300.0
    """How long one upload or download keeps retrying through a storage outage."""
    default_region: str = "us-east-1"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 16 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 8
    backoff_initial: float = 0.5
    backoff_max: float = 20.0


@dataclass(frozen=True)
class Endpoint:
    """Where a host in an ``s3://`` URI is really reached; ``url`` None means AWS's own."""

    url: str | None
    region: str | None
    aws: bool


def resolve_endpoint(location: ArtifactLocation, settings: StorageSettings) -> Endpoint:
    """The endpoint for a location's host: AWS names force HTTPS and may carry the region."""
    host = location.host.rpartition("@")[2].lower()
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if not bare or bare in _AWS_GLOBAL_HOSTS:
        return Endpoint(url=None, region=None, aws=True)
    match = _AWS_REGIONAL_HOST.match(bare)
    if match and "." not in match["region"]:
        return Endpoint(url=None, region=match["region"], aws=True)
    if bare.endswith(".amazonaws.com"):
        return Endpoint(url=f"https://{host}", region=None, aws=True)
    secure = location.scheme == "https" or (settings.https and location.scheme != "http")
    return Endpoint(url=f"{'https' if secure else 'http'}://{host}", region=None, aws=False)


class ObjectStore(ABC):
    """What the artifact code needs from a storage backend, S3 or a local folder."""

    @abstractmethod
    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        """Size and ETag of an object; None when it (or its bucket) does not exist."""

    @abstractmethod
    def download(self, bucket: str, key: str, fileobj: BinaryIO, *, etag: str | None = None) -> ObjectInfo:
        """Write the object into ``fileobj``; ``etag`` refuses a copy that changed since stat."""

    @abstractmethod
    def upload(self, bucket: str, key: str, source: Path | BinaryIO, *, content_type: str) -> None:
        """Store ``source`` (a file path, or a seekable stream so it can be retried)."""

    @abstractmethod
    def list(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose keys start with ``prefix``."""

    @abstractmethod
    def uri(self, bucket: str, key: str) -> str:
        """The qualified name of an object, for results and messages (never with secrets)."""


class Storage:
    """Hands out object stores and keeps one boto3 client per endpoint and identity.

    Creating a boto3 client costs ~100 ms of CPU (endpoint and model loading); an experiment
    touches a handful of artifacts on the same endpoint, so the warm path must reuse them.
    """

    def __init__(self, settings: StorageSettings | None = None) -> None:
        self.settings = settings or StorageSettings()
        self._clients: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()
        self.clients_created = 0
        self._local = LocalStore()

    def store_for(
        self, location: ArtifactLocation, credentials: AwsCredentials | None, env: Mapping[str, str]
    ) -> ObjectStore:
        """The store holding ``location``; ``credentials`` None means the runner's own chain."""
        if location.scheme == "file":
            return self._local
        endpoint = resolve_endpoint(location, self.settings)
        region = (
            endpoint.region
            or (credentials.region if credentials is not None else None)
            or env.get("AWS_DEFAULT_REGION")
            or self.settings.default_region
        )
        if credentials is None:
            client = self._client(endpoint, region, identity=("chain",))
            fallback = None
        elif credentials.anonymous:
            client = self._client(endpoint, region, identity=("anonymous",))
            fallback = None
        else:
            client = self._client(
                endpoint, region, identity=("keys", credentials.access_key, credentials.secret_access_key)
            )
            fallback = lambda: self._client(endpoint, region, identity=("anonymous",))  # noqa: E731
        return S3Store(
            client=client,
            host=location.host.rpartition("@")[2],
            settings=self.settings,
            anonymous_fallback=fallback,
        )

    def _client(self, endpoint: Endpoint, region: str, identity: tuple[str, ...]) -> Any:
        cache_key = (endpoint.url, region, identity)
        with self._lock:
            client = self._clients.get(cache_key)
            if client is None:
                client = self._new_client(endpoint, region, identity)
                self._clients[cache_key] = client
                self.clients_created += 1
            return client

    def _new_client(self, endpoint: Endpoint, region: str, identity: tuple[str, ...]) -> Any:
        settings = self.settings
        options: dict[str, Any] = {
            "region_name": region,
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": settings.max_attempts, "mode": "standard"},
            "connect_timeout": settings.connect_timeout,
            "read_timeout": settings.read_timeout,
            "max_pool_connections": max(10, settings.max_concurrency * 2),
            "signature_version": botocore.UNSIGNED if identity[0] == "anonymous" else "s3v4",
        }
        if not endpoint.aws:
            # Many S3-compatible servers (and older MinIO, GCS interop) reject the CRC trailers
            # botocore adds by default since 1.36.
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        keys: dict[str, str] = {}
        if identity[0] == "keys":
            keys = {"aws_access_key_id": identity[1], "aws_secret_access_key": identity[2]}
        # Sessions are not thread-safe; a private one per client keeps creation safe under the lock.
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=endpoint.url,
            verify=settings.ca_bundle if settings.ca_bundle else None,
            config=Config(**options),
            **keys,
        )


class S3Store(ObjectStore):
    """One S3 endpoint seen through one identity, with the retry and fallback policy."""

    def __init__(
        self,
        *,
        client: Any,
        host: str,
        settings: StorageSettings,
        anonymous_fallback: Callable[[], Any] | None = None,
    ) -> None:
        self.client = client
        """Used for writes, always with the request's identity."""
        self._reader = client
        self.host = host
        self.settings = settings
        self._anonymous_fallback = anonymous_fallback

    def uri(self, bucket: str, key: str) -> str:
        return f"s3://{self.host}/{bucket}/{key}"

    # --- reading ---------------------------------------------------------------------------
    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        def attempt() -> ObjectInfo | None:
            try:
                return _info(key, self._readable_call("head_object", Bucket=bucket, Key=key))
            except botocore.exceptions.ClientError as error:
                if _code(error) in _MISSING_CODES:
                    return None
                raise

        # Part of every fetch, so it rides out outages like the download that follows it.
        return self._retrying(f"look up {self.uri(bucket, key)}", attempt)

    def download(self, bucket: str, key: str, fileobj: BinaryIO, *, etag: str | None = None) -> ObjectInfo:
        # A broken-off transfer resumes with a ranged GET pinned to the first answer's ETag, so
        # the target never needs rewinding and a changed object is refused, not spliced.
        state: dict[str, Any] = {"written": 0, "info": None}

        def attempt() -> ObjectInfo:
            info: ObjectInfo | None = state["info"]
            arguments: dict[str, Any] = {"Bucket": bucket, "Key": key}
            expected = info.etag if info is not None else etag
            if expected:
                arguments["IfMatch"] = f'"{expected}"'
            if info is not None and state["written"]:
                arguments["Range"] = f"bytes={state['written']}-"
            response = self._readable_call("get_object", **arguments)
            if info is None:
                info = _info(key, response)
                state["info"] = info
            body = response["Body"]
            try:
                for chunk in body.iter_chunks(_CHUNK):
                    fileobj.write(chunk)
                    state["written"] += len(chunk)
            finally:
                body.close()
            if state["written"] != info.size:
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=state["written"], expected_bytes=info.size
                )
            return info

        return self._retrying(f"download {self.uri(bucket, key)}", attempt)

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            pages = list(self._pages(self._reader, bucket, prefix))
        except botocore.exceptions.ClientError as error:
            if _code(error) not in _DENIED_CODES or self._anonymous_fallback is None:
                raise _fatal(error, f"cannot list {self.uri(bucket, prefix)}") from None
            log.info(
                "listing %s denied with the request's keys; trying anonymous access", self.uri(bucket, prefix)
            )
            try:
                pages = list(self._pages(self._anonymous_fallback(), bucket, prefix))
            except botocore.exceptions.ClientError as second:
                raise _fatal(second, f"cannot list {self.uri(bucket, prefix)}") from None
        except botocore.exceptions.BotoCoreError as error:
            raise StorageError(f"cannot reach storage to list {self.uri(bucket, prefix)}: {error}") from None
        for page in pages:
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    key=item["Key"],
                    size=int(item.get("Size", 0)),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified=item.get("LastModified") or datetime.now(timezone.utc),
                )

    @staticmethod
    def _pages(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        yield from client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)

    def _readable_call(self, operation: str, **arguments: Any) -> dict[str, Any]:
        """A read with the request's keys, once more unsigned if they are refused (public buckets)."""
        try:
            return getattr(self._reader, operation)(**arguments)
        except botocore.exceptions.ClientError as error:
            if _code(error) not in _DENIED_CODES or self._anonymous_fallback is None:
                raise
            where = self.uri(arguments["Bucket"], arguments["Key"])
            log.info("%s: keys refused (%s); trying anonymous access", where, _code(error))
            anonymous = self._anonymous_fallback()
            try:
                response = getattr(anonymous, operation)(**arguments)
            except botocore.exceptions.ClientError as second:
                if _code(second) in _DENIED_CODES:
                    raise error from None  # the keyed refusal says more than the anonymous one
                raise
            # The object is public: keep reading anonymously; writes keep the request's keys.
            self._reader = anonymous
            self._anonymous_fallback = None
            return response

    # --- writing ---------------------------------------------------------------------------
    def upload(self, bucket: str, key: str, source: Path | BinaryIO, *, content_type: str) -> None:
        settings = self.settings
        config = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=settings.max_concurrency,
            use_threads=True,
        )
        extra = {"ContentType": content_type}

        if isinstance(source, Path):

            def attempt() -> None:
                with open(source, "rb") as stream:
                    self.client.upload_fileobj(stream, bucket, key, ExtraArgs=extra, Config=config)

            self._retrying(f"upload {self.uri(bucket, key)}", attempt)
            return

        start = source.tell() if source.seekable() else None

        def attempt_stream() -> None:
            self.client.upload_fileobj(source, bucket, key, ExtraArgs=extra, Config=config)

        def rewind() -> None:
            if start is None:
                raise StorageError(
                    f"upload of {self.uri(bucket, key)} failed and its source cannot be rewound"
                )
            source.seek(start)

        self._retrying(f"upload {self.uri(bucket, key)}", attempt_stream, before_retry=rewind)

    def put_new(
        self, bucket: str, key: str, source: Path, *, content_type: str, metadata: Mapping[str, str]
    ) -> bool:
        """Store ``source`` with ``metadata`` unless ``key`` exists; False when another writer was first.

        ``If-None-Match: *`` on the single PUT or on completing the multipart upload makes the
        object appear whole or not at all, and only once (s3transfer does not pass the header).
        A server that ignores the header lets the last writer win, still whole and consistent
        with its metadata.
        """
        where = self.uri(bucket, key)
        size = source.stat().st_size
        try:
            if size <= self.settings.multipart_threshold:

                def attempt() -> None:
                    with open(source, "rb") as body:
                        self.client.put_object(
                            Bucket=bucket,
                            Key=key,
                            Body=body,
                            ContentType=content_type,
                            Metadata=dict(metadata),
                            IfNoneMatch="*",
                        )

                self._retrying(f"upload {where}", attempt)
            else:
                self._put_new_multipart(bucket, key, source, size, content_type, metadata)
        except StorageError as error:
            if error.code in _ALREADY_THERE:
                return False
            raise
        return True

    def _put_new_multipart(
        self, bucket: str, key: str, source: Path, size: int, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        where = self.uri(bucket, key)
        chunk = self.settings.multipart_chunksize
        upload_id = self._retrying(
            f"start uploading {where}",
            lambda: self.client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType=content_type, Metadata=dict(metadata)
            )["UploadId"],
        )

        def part(number: int) -> dict[str, Any]:
            def attempt() -> dict[str, Any]:
                with open(source, "rb") as data:
                    data.seek((number - 1) * chunk)
                    body = data.read(chunk)
                answer = self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
                return {"ETag": answer["ETag"], "PartNumber": number}

            return self._retrying(f"upload part {number} of {where}", attempt)

        try:
            with ThreadPoolExecutor(self.settings.max_concurrency) as pool:
                parts = list(pool.map(part, range(1, (size + chunk - 1) // chunk + 1)))
            self._retrying(
                f"complete {where}",
                lambda: self.client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    def delete(self, bucket: str, key: str) -> None:
        """Remove one object; one already gone is no error."""

        def attempt() -> None:
            try:
                self.client.delete_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as error:
                if _code(error) not in _MISSING_CODES:
                    raise

        self._retrying(f"delete {self.uri(bucket, key)}", attempt)

    # --- outage policy ---------------------------------------------------------------------
    def _retrying(
        self, what: str, attempt: Callable[[], T], before_retry: Callable[[], None] | None = None
    ) -> T:
        """Run ``attempt`` until it succeeds, fails for good, or the outage allowance is spent."""
        settings = self.settings
        deadline = time.monotonic() + settings.outage_seconds
        tries = 0
        while True:
            try:
                return attempt()
            except StorageError:
                raise
            except Exception as error:
                reason = _transient(error)
                if reason is None:
                    if isinstance(error, botocore.exceptions.ClientError):
                        raise _fatal(error, f"cannot {what}") from None
                    raise StorageError(f"cannot {what}: {error}") from error
                tries += 1
                delay = min(settings.backoff_max, settings.backoff_initial * 2 ** (tries - 1))
                delay *= random.uniform(0.5, 1.0)
                left = deadline - time.monotonic()
                if left <= delay:
                    raise StorageError(
                        f"cannot {what}: storage still failing after {tries} tries over "
                        f"{settings.outage_seconds:.0f}s ({reason})",
                        code=_code(error) if isinstance(error, botocore.exceptions.ClientError) else None,
                    ) from error
                log.warning(
                    "%s failed (%s); retry %d in %.1fs, %.0fs of outage allowance left",
                    what,
                    reason,
                    tries,
                    delay,
                    left,
                )
                time.sleep(delay)
                if before_retry is not None:
                    before_retry()


class LocalStore(ObjectStore):
    """``file://`` artifacts: the key is a path (absolute, or under ``bucket`` when one is named)."""

    def uri(self, bucket: str, key: str) -> str:
        return f"file://{self.path(bucket, key)}"

    @staticmethod
    def path(bucket: str, key: str) -> Path:
        return Path(bucket) / key.lstrip("/") if bucket else Path(key)

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        path = self.path(bucket, key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return _local_info(key, info)

    def download(self, bucket: str, key: str, fileobj: BinaryIO, *, etag: str | None = None) -> ObjectInfo:
        path = self.path(bucket, key)
        try:
            with open(path, "rb") as source:
                info = _local_info(key, os.fstat(source.fileno()))
                if etag and info.etag != etag:
                    raise StorageError(f"{self.uri(bucket, key)} changed while it was being fetched")
                shutil.copyfileobj(source, fileobj, _CHUNK)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"{self.uri(bucket, key)} does not exist", code="NoSuchKey") from None
        except IsADirectoryError:
            raise StorageError(f"{self.uri(bucket, key)} is a folder, not a file") from None
        return info

    def upload(self, bucket: str, key: str, source: Path | BinaryIO, *, content_type: str) -> None:
        path = self.path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as out:
                if isinstance(source, Path):
                    with open(source, "rb") as data:
                        shutil.copyfileobj(data, out, _CHUNK)
                else:
                    shutil.copyfileobj(source, out, _CHUNK)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        root = Path(bucket) if bucket else Path("/")
        start = self.path(bucket, prefix)
        folder = start if prefix.endswith("/") else start.parent
        if not folder.is_dir():
            return
        for current, folders, files in os.walk(folder):
            folders.sort()
            for name in sorted(files):
                path = Path(current) / name
                key = str(path) if not bucket else path.relative_to(root).as_posix()
                if key.startswith(prefix) and not name.startswith("."):
                    yield _local_info(key, path.stat())


def _local_info(key: str, info: os.stat_result) -> ObjectInfo:
    digest = hashlib.blake2b(
        f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}".encode(), digest_size=16
    )
    return ObjectInfo(
        key=key,
        size=info.st_size,
        etag=digest.hexdigest(),
        last_modified=datetime.fromtimestamp(info.st_mtime, timezone.utc),
    )


def _info(key: str, response: Mapping[str, Any]) -> ObjectInfo:
    size = response.get("ContentLength", 0)
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:  # a ranged GET: the total follows the slash
        size = int(content_range.rsplit("/", 1)[1])
    return ObjectInfo(
        key=key,
        size=int(size),
        etag=str(response.get("ETag", "")).strip('"'),
        last_modified=response.get("LastModified") or datetime.now(timezone.utc),
        metadata=dict(response.get("Metadata") or {}),
    )


def _code(error: botocore.exceptions.ClientError) -> str:
    return str(
        error.response.get("Error", {}).get("Code", "")
        or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _status(error: botocore.exceptions.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _transient(error: BaseException) -> str | None:
    """Why retrying may help (an outage, throttling), or None when it cannot."""
    if isinstance(error, botocore.exceptions.ClientError):
        code, status = _code(error), _status(error)
        if code in _THROTTLING_CODES or status >= 500 or status == 429:
            return f"{code or status}: {error.response.get('Error', {}).get('Message', '')}".strip(": ")
        return None
    if isinstance(error, botocore.exceptions.SSLError):
        return None  # a certificate problem, not an outage
    if isinstance(
        error,
        (
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.ConnectionError,
            botocore.exceptions.IncompleteReadError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return f"{type(error).__name__}: {error}"
    # s3transfer re-raises what botocore's HTTP layer gave it, sometimes wrapped.
    cause = error.__cause__ or error.__context__
    if cause is not None and cause is not error:
        return _transient(cause)
    return None


def _fatal(error: botocore.exceptions.ClientError, what: str) -> StorageError:
    code = _code(error)
    message = error.response.get("Error", {}).get("Message", "") or str(error)
    if code in _MISSING_CODES:
        return ObjectMissing(f"{what}: {code} ({message})", code=code)
    hint = ""
    if code in _DENIED_CODES:
        hint = "; check the artifact's credentials (or config.env AWS_* keys) and the bucket policy"
    elif code in ("PreconditionFailed", "412"):
        hint = "; the object changed while it was being fetched"
    return StorageError(f"{what}: {code} ({message}){hint}", code=code)
