"""S3 and local object stores (studio_runner.storage), against the session's real SeaweedFS."""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from studio_runner.request import ArtifactLocation, AwsCredentials
from studio_runner.storage import (
    LocalStore,
    ObjectMissing,
    S3Store,
    Storage,
    StorageError,
    StorageSettings,
    resolve_endpoint,
)

from devtools.services import PUBLIC_BUCKET, Endpoints, ServiceSet


def host_of(services: Endpoints) -> str:
    return services.s3_endpoint.split("://", 1)[1]


def location(services: Endpoints, bucket: str, key: str) -> ArtifactLocation:
    return ArtifactLocation.parse(f"s3://{host_of(services)}/{bucket}/{key}")


def keys(services: Endpoints) -> AwsCredentials:
    return AwsCredentials(access_key=services.s3_access_key, secret_access_key=services.s3_secret_key)


@pytest.fixture
def storage() -> Storage:
    return Storage(StorageSettings(outage_seconds=20, backoff_initial=0.2, backoff_max=2))


@pytest.fixture
def store(storage: Storage, services: Endpoints, bucket: str) -> S3Store:
    result = storage.store_for(location(services, bucket, "x"), keys(services), {})
    assert isinstance(result, S3Store)
    return result


# --- addressing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("qualified", "https", "url", "region", "aws"),
    [
        ("s3://127.0.0.1:8333/b/k", False, "http://127.0.0.1:8333", None, False),
        ("s3://minio.internal:9000/b/k", True, "https://minio.internal:9000", None, False),
        ("https://minio.internal:9000/b/k", False, "https://minio.internal:9000", None, False),
        ("s3://s3.amazonaws.com/b/k", False, None, None, True),
        ("s3://s3-us-west-2.amazonaws.com/b/k", False, None, "us-west-2", True),
        ("s3://s3.eu-central-1.amazonaws.com/b/k", False, None, "eu-central-1", True),
        (
            "s3://s3.dualstack.us-east-2.amazonaws.com/b/k",
            False,
            "https://s3.dualstack.us-east-2.amazonaws.com",
            None,
            True,
        ),
        ("s3://AKIAEXAMPLE:secret@127.0.0.1:8333/b/k", False, "http://127.0.0.1:8333", None, False),
    ],
)
def test_resolve_endpoint(
    qualified: str, https: bool, url: str | None, region: str | None, aws: bool
) -> None:
    endpoint = resolve_endpoint(ArtifactLocation.parse(qualified), StorageSettings(https=https))

    assert (endpoint.url, endpoint.region, endpoint.aws) == (url, region, aws)


def test_region_comes_from_credentials_then_env_then_default(services: Endpoints, bucket: str) -> None:
    storage = Storage(StorageSettings(default_region="eu-west-3"))
    where = location(services, bucket, "k")
    with_region = AwsCredentials(access_key="a", secret_access_key="b", region="ap-south-1")
    without_region = AwsCredentials(access_key="a", secret_access_key="b")

    regions = [
        storage.store_for(where, with_region, {"AWS_DEFAULT_REGION": "us-west-1"}).client.meta.region_name,  # type: ignore[attr-defined]
        storage.store_for(where, without_region, {"AWS_DEFAULT_REGION": "us-west-1"}).client.meta.region_name,  # type: ignore[attr-defined]
        storage.store_for(where, without_region, {}).client.meta.region_name,  # type: ignore[attr-defined]
    ]

    assert regions == ["ap-south-1", "us-west-1", "eu-west-3"]


def test_clients_are_cached_per_endpoint_and_identity(
    storage: Storage, services: Endpoints, bucket: str
) -> None:
    first = storage.store_for(location(services, bucket, "a"), keys(services), {})
    second = storage.store_for(location(services, bucket, "b"), keys(services), {})
    anonymous = storage.store_for(location(services, bucket, "c"), AwsCredentials(), {})

    assert first.client is second.client  # type: ignore[attr-defined]
    assert anonymous.client is not first.client  # type: ignore[attr-defined]
    assert storage.clients_created == 2


# --- transfers -------------------------------------------------------------------------------
def test_upload_stat_download_list(store: S3Store, bucket: str, s3_client, tmp_path: Path) -> None:
    source = tmp_path / "model.tar"
    source.write_bytes(os.urandom(300_000))

    store.upload(bucket, "experiments/k/model.tar", source, content_type="application/x-tar")
    store.upload(bucket, "experiments/k/other.tar", io.BytesIO(b"small"), content_type="application/x-tar")
    info = store.stat(bucket, "experiments/k/model.tar")
    copy = io.BytesIO()
    downloaded = store.download(bucket, "experiments/k/model.tar", copy, etag=info.etag if info else None)
    listed = sorted(item.key for item in store.list(bucket, "experiments/k/"))

    head = s3_client.head_object(Bucket=bucket, Key="experiments/k/model.tar")
    assert info is not None and info.size == 300_000
    assert info.etag == head["ETag"].strip('"') and '"' not in info.etag
    assert head["ContentType"] == "application/x-tar"
    assert downloaded == info
    assert copy.getvalue() == source.read_bytes()
    assert listed == ["experiments/k/model.tar", "experiments/k/other.tar"]


def test_large_upload_is_multipart(services: Endpoints, bucket: str, s3_client, tmp_path: Path) -> None:
    mib = 1024 * 1024
    storage = Storage(StorageSettings(multipart_threshold=5 * mib, multipart_chunksize=5 * mib))
    store = storage.store_for(location(services, bucket, "big"), keys(services), {})
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * mib))

    store.upload(bucket, "big.bin", source, content_type="application/octet-stream")

    etag = s3_client.head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"')
    assert etag.endswith("-3")
    copy = io.BytesIO()
    store.download(bucket, "big.bin", copy)
    assert copy.getvalue() == source.read_bytes()


def test_missing_objects(store: S3Store, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="studio_runner.storage")

    assert store.stat(bucket, "no/such/key") is None
    assert store.stat(f"nobucket-{uuid.uuid4().hex[:8]}", "k") is None
    with pytest.raises(ObjectMissing) as missing_key:
        store.download(bucket, "no/such/key", io.BytesIO())
    with pytest.raises(ObjectMissing) as missing_bucket:
        store.download(f"nobucket-{uuid.uuid4().hex[:8]}", "k", io.BytesIO())

    assert missing_key.value.code == "NoSuchKey"
    assert missing_bucket.value.code == "NoSuchBucket"
    assert "retry" not in caplog.text  # errors retrying cannot fix fail at once


def test_refused_upload_fails_fast(
    storage: Storage, services: Endpoints, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SeaweedFS creates missing buckets on PUT, so a refusal stands in for unfixable errors."""
    caplog.set_level(logging.WARNING, logger="studio_runner.storage")
    anonymous = storage.store_for(location(services, bucket, "k.tar"), AwsCredentials(), {})

    with pytest.raises(StorageError) as failed:
        anonymous.upload(bucket, "k.tar", io.BytesIO(b"x"), content_type="application/x-tar")

    assert failed.value.code == "AccessDenied"
    assert "retry" not in caplog.text


def test_changed_object_is_refused_not_spliced(store: S3Store, bucket: str, s3_client) -> None:
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"first version")
    stale = store.stat(bucket, "k")
    s3_client.put_object(Bucket=bucket, Key="k", Body=b"second version")

    with pytest.raises(StorageError, match=r"PreconditionFailed|412"):
        store.download(bucket, "k", io.BytesIO(), etag=stale.etag if stale else None)


# --- credentials -----------------------------------------------------------------------------
@pytest.fixture
def public_object(s3_client) -> tuple[str, bytes]:
    key = f"tests/{uuid.uuid4().hex}/data.bin"
    body = os.urandom(5000)
    s3_client.put_object(Bucket=PUBLIC_BUCKET, Key=key, Body=body)
    return key, body


def test_empty_keys_read_the_public_bucket_anonymously(
    storage: Storage, services: Endpoints, public_object: tuple[str, bytes]
) -> None:
    key, body = public_object
    store = storage.store_for(location(services, PUBLIC_BUCKET, key), AwsCredentials(), {})
    copy = io.BytesIO()

    info = store.stat(PUBLIC_BUCKET, key)
    store.download(PUBLIC_BUCKET, key, copy)

    assert info is not None and info.size == len(body)
    assert copy.getvalue() == body
    assert key in [item.key for item in store.list(PUBLIC_BUCKET, key.rsplit("/", 1)[0])]


def test_anonymous_access_is_read_only_and_public_only(
    storage: Storage, services: Endpoints, bucket: str, s3_client
) -> None:
    s3_client.put_object(Bucket=bucket, Key="private.bin", Body=b"secret")
    store = storage.store_for(location(services, bucket, "private.bin"), AwsCredentials(), {})

    with pytest.raises(StorageError) as read:
        store.download(bucket, "private.bin", io.BytesIO())
    with pytest.raises(StorageError) as write:
        store.upload(PUBLIC_BUCKET, "tests/anonymous-write.bin", io.BytesIO(b"x"), content_type="text/plain")

    assert read.value.code == "AccessDenied" and "credentials" in str(read.value)
    assert write.value.code == "AccessDenied"


def test_refused_keys_fall_back_to_anonymous_for_public_objects(
    storage: Storage, services: Endpoints, public_object: tuple[str, bytes], bucket: str, s3_client
) -> None:
    """Upstream's public-bucket fallback: keys that do not open the object, but the object is public."""
    key, body = public_object
    wrong = AwsCredentials(access_key="someone-else", secret_access_key="not-for-this-server")
    store = storage.store_for(location(services, PUBLIC_BUCKET, key), wrong, {})
    copy = io.BytesIO()

    info = store.stat(PUBLIC_BUCKET, key)
    store.download(PUBLIC_BUCKET, key, copy)

    assert info is not None and copy.getvalue() == body
    s3_client.put_object(Bucket=bucket, Key="private.bin", Body=b"secret")
    private = storage.store_for(location(services, bucket, "private.bin"), wrong, {})
    with pytest.raises(StorageError) as refused:
        private.download(bucket, "private.bin", io.BytesIO())
    assert refused.value.code == "InvalidAccessKeyId"


def test_no_credentials_use_the_runner_default_chain(
    services: Endpoints, bucket: str, s3_client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``credentials=None``: the runner's own environment (or profile, or instance role) signs."""
    s3_client.put_object(Bucket=bucket, Key="private.bin", Body=b"for the runner")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", services.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", services.s3_secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    store = Storage().store_for(location(services, bucket, "private.bin"), None, {})
    copy = io.BytesIO()

    store.download(bucket, "private.bin", copy)

    assert copy.getvalue() == b"for the runner"


# --- outages ---------------------------------------------------------------------------------
@contextmanager
def seaweedfs_outage(service_set: ServiceSet, seconds: float) -> Iterator[None]:
    """Stop SeaweedFS now and start it again ``seconds`` later from a timer thread.

    The server is running again when the block ends, whatever happened inside it.
    """
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            service_set.start_seaweedfs()
        except BaseException as error:  # reported by the test thread
            errors.append(error)

    service_set.stop_seaweedfs()
    timer = threading.Timer(seconds, restart)
    timer.start()
    try:
        yield
    finally:
        timer.join()
        if not any(s.name == "seaweedfs" and s.alive() for s in service_set.servers):
            service_set.start_seaweedfs()
        if errors:
            raise errors[0]


def test_transfers_ride_out_a_storage_outage(
    service_set: ServiceSet,
    services: Endpoints,
    bucket: str,
    s3_client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="studio_runner.storage")
    s3_client.put_object(Bucket=bucket, Key="before.bin", Body=b"stored before the outage")
    patient = Storage(StorageSettings(outage_seconds=90, backoff_initial=0.2, backoff_max=2, max_attempts=1))
    impatient = Storage(
        StorageSettings(outage_seconds=1, backoff_initial=0.2, backoff_max=0.5, max_attempts=1)
    )
    source = tmp_path / "checkpoint.tar"
    source.write_bytes(os.urandom(200_000))
    copy = io.BytesIO()
    seen: list[object] = []

    with seaweedfs_outage(service_set, seconds=4):
        with pytest.raises(StorageError, match="still failing"):
            impatient.store_for(location(services, bucket, "x"), keys(services), {}).upload(
                bucket, "gave-up.tar", source, content_type="application/x-tar"
            )
        store = patient.store_for(location(services, bucket, "x"), keys(services), {})

        def fetch() -> None:  # what a fetch does (stat, then download), during the same outage
            seen.append(store.stat(bucket, "before.bin"))
            store.download(bucket, "before.bin", copy)

        reader = threading.Thread(target=fetch)
        reader.start()
        store.upload(bucket, "experiments/k/modeldir.tar", source, content_type="application/x-tar")
        reader.join(120)

    stored = s3_client.get_object(Bucket=bucket, Key="experiments/k/modeldir.tar")["Body"].read()
    assert stored == source.read_bytes()
    assert copy.getvalue() == b"stored before the outage"
    assert len(seen) == 1 and seen[0] is not None
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert any("modeldir.tar" in line for line in retries), "the upload never met the outage"
    assert all("Could not connect" in line or "Error" in line for line in retries)


# --- local folders ---------------------------------------------------------------------------
def test_file_locations_use_the_local_store(storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "store" / "experiments" / "k" / "modeldir.tar"
    where = ArtifactLocation.parse(f"file://{path}")
    store = storage.store_for(where, None, {})
    assert isinstance(store, LocalStore)

    assert store.stat(where.bucket, where.key) is None
    store.upload(where.bucket, where.key, io.BytesIO(b"tar bytes"), content_type="application/x-tar")
    info = store.stat(where.bucket, where.key)
    copy = io.BytesIO()
    store.download(where.bucket, where.key, copy, etag=info.etag if info else None)

    assert info is not None and info.size == 9
    assert copy.getvalue() == b"tar bytes"
    assert [i.key for i in store.list("", str(path.parent) + "/")] == [str(path)]
    assert store.uri(where.bucket, where.key) == f"file://{path}"
    with pytest.raises(ObjectMissing):
        store.download("", str(tmp_path / "nothing.tar"), io.BytesIO())
