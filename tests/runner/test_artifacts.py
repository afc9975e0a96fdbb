"""Fetching and returning one attempt's artifacts (studio_runner.artifacts) on real SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from studio_runner.archive import unpack
from studio_runner.artifacts import ArtifactError, ArtifactSet, fingerprint
from studio_runner.cache import DownloadCache
from studio_runner.layout import ExperimentLayout
from studio_runner.request import ArtifactLocation, AwsCredentials, Request, decode_request
from studio_runner.storage import ObjectInfo, ObjectStore, Storage, StorageSettings

from devtools.services import Endpoints

EXAMPLES = Path(__file__).resolve().parents[1] / "data"  # messages captured from the real studioml client


# --- helpers ---------------------------------------------------------------------------------
def host_of(services: Endpoints) -> str:
    return services.s3_endpoint.split("://", 1)[1]


def tar_of(files: Mapping[str, bytes], compression: str | None = None, *, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def artifact(
    services: Endpoints,
    bucket: str,
    key: str,
    *,
    mutable: bool = False,
    unpack: bool = True,
    keys: bool = True,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "qualified": f"s3://{host_of(services)}/{bucket}/{key}",
        "bucket": bucket,
        "key": key,
        "mutable": mutable,
        "unpack": unpack,
    }
    if keys:
        entry["credentials"] = {
            "aws": {"access_key": services.s3_access_key, "secret_access_key": services.s3_secret_key}
        }
    return entry


def make_request(
    artifacts: dict[str, dict[str, Any]], *, hdd: str = "3g", env: dict[str, str] | None = None
) -> Request:
    return decode_request(
        {
            "experiment": {
                "key": f"exp-{time.monotonic_ns()}",
                "filename": "main.py",
                "artifacts": artifacts,
                "resources_needed": {"cpus": 1, "ram": "2g", "hdd": hdd, "gpus": 0},
            },
            "config": {"env": env or {}},
        }
    )


def standard_artifacts(services: Endpoints, bucket: str, exp: str = "exp") -> dict[str, dict[str, Any]]:
    return {
        "workspace": artifact(services, bucket, "blobstore/ws.tar"),
        "output": artifact(services, bucket, f"experiments/{exp}/output.tar", mutable=True),
        "modeldir": artifact(services, bucket, f"experiments/{exp}/modeldir.tar", mutable=True),
        "_metadata": artifact(services, bucket, f"experiments/{exp}/_metadata.tar", mutable=True),
    }


@pytest.fixture
def layout(tmp_path: Path) -> ExperimentLayout:
    return ExperimentLayout.create(tmp_path / "work", "exp")


@pytest.fixture
def notes() -> list[str]:
    return []


class RecordingStorage(Storage):
    """Real storage that also records when each upload starts and ends, in order."""

    def __init__(self, settings: StorageSettings | None = None) -> None:
        super().__init__(settings)
        self.events: list[tuple[str, str]] = []
        self.events_lock = threading.Lock()

    def store_for(
        self, location: ArtifactLocation, credentials: AwsCredentials | None, env: Mapping[str, str]
    ) -> ObjectStore:
        return _Recording(super().store_for(location, credentials, env), self)


class _Recording(ObjectStore):
    def __init__(self, inner: ObjectStore, storage: RecordingStorage) -> None:
        self.inner = inner
        self.storage = storage

    def _event(self, what: str, key: str) -> None:
        with self.storage.events_lock:
            self.storage.events.append((what, key))

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        return self.inner.stat(bucket, key)

    def download(self, bucket: str, key: str, fileobj: BinaryIO, *, etag: str | None = None) -> ObjectInfo:
        return self.inner.download(bucket, key, fileobj, etag=etag)

    def upload(self, bucket: str, key: str, source: Path | BinaryIO, *, content_type: str) -> None:
        self._event("start", key)
        self.inner.upload(bucket, key, source, content_type=content_type)
        self._event("end", key)

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(bucket, prefix)

    def uri(self, bucket: str, key: str) -> str:
        return self.inner.uri(bucket, key)


def client_reads_retval(tar_data: bytes, submitted_at: float, scratch: Path) -> object:
    """The StudioML client's acceptance of ``retval.tar`` (see STUDIOML_CLIENT.md)."""
    with tarfile.open(fileobj=io.BytesIO(tar_data)) as archive:
        names = archive.getnames()
        assert len(names) == 1 and names[0].startswith("./"), f"client would unpack a folder: {names}"
        assert archive.getmember(names[0]).mtime > submitted_at, "client would ignore this retval as old"
        archive.extractall(scratch, filter="data")
    with open(scratch / names[0][2:], "rb") as result:
        return pickle.load(result)


def read_tar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


# --- fetching --------------------------------------------------------------------------------
def test_fetch_all_lays_out_every_input(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str]
) -> None:
    put = s3_client.put_object
    # Misleading names on purpose: gzip in a ".tar", bzip2 in a ".tgz" (upstream's quirk).
    put(
        Bucket=bucket,
        Key="blobstore/ws.tar",
        Body=tar_of({"main.py": b"print(1)\n", "pkg/m.py": b"X=1\n"}, "gz"),
    )
    put(
        Bucket=bucket, Key="experiments/exp/modeldir.tgz", Body=tar_of({"./weights.bin": b"\1" * 1000}, "bz2")
    )
    put(Bucket=bucket, Key="datasets/train.csv", Body=b"a,b\n1,2\n")
    put(Bucket=bucket, Key="experiments/exp/output.tar", Body=tar_of({"output": b"an old attempt's log"}))
    put(Bucket=bucket, Key="experiments/exp/_metadata.tar", Body=tar_of({"old.json": b"{}"}))
    request = make_request(
        {
            "workspace": artifact(services, bucket, "blobstore/ws.tar"),
            "modeldir": artifact(services, bucket, "experiments/exp/modeldir.tgz", mutable=True),
            "data": artifact(services, bucket, "datasets/train.csv", unpack=False),
            "tb": artifact(services, bucket, "experiments/exp/tb.tar", mutable=True),
            "output": artifact(services, bucket, "experiments/exp/output.tar", mutable=True),
            "_metadata": artifact(services, bucket, "experiments/exp/_metadata.tar", mutable=True),
            "_singularity": artifact(services, bucket, "images/s.sif", unpack=False),
        }
    )
    artifacts = ArtifactSet(request, layout, Storage(), cache=None, note=notes.append)

    artifacts.fetch_all()

    root = layout.experiment_dir
    assert (root / "workspace" / "main.py").read_bytes() == b"print(1)\n"
    assert (root / "workspace" / "pkg" / "m.py").read_bytes() == b"X=1\n"
    assert (root / "modeldir" / "weights.bin").read_bytes() == b"\1" * 1000
    assert (root / "data" / "train.csv").read_bytes() == b"a,b\n1,2\n"
    assert (root / "tb").is_dir() and not any((root / "tb").iterdir())  # mutable, not there yet: fine
    assert (root / "output" / "output").read_bytes() == b""  # never downloaded
    assert list((root / "_metadata").iterdir()) == []  # never downloaded
    assert not (root / "_singularity").exists()
    assert notes == []


def test_completion_service_request_without_credentials_block(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str], tmp_path: Path
) -> None:
    """The captured CompletionService message: no credentials blocks, keys only in config.env."""
    body = json.loads((EXAMPLES / "completion_service_task.json").read_text())["body"]
    host = host_of(services)
    for entry in body["experiment"]["artifacts"].values():
        assert "credentials" not in entry
        entry["qualified"] = f"s3://{host}/{bucket}/{entry['key']}"
        entry["bucket"] = bucket
    body["config"]["env"]["AWS_ACCESS_KEY_ID"] = services.s3_access_key
    body["config"]["env"]["AWS_SECRET_ACCESS_KEY"] = services.s3_secret_key
    body["config"]["storage"] = None
    artifacts_wire = body["experiment"]["artifacts"]
    client_files = {
        "workspace": tar_of({"completion_service_client.py": b"# client\n", "__init__.py": b""}),
        "clientscript": tar_of({"cs_client_fn.py": b"def clientFunction(a, f): return a\n"}, prefix="./"),
        "args": tar_of({"args.pkl": pickle.dumps([1, 2], protocol=2)}, prefix="./"),
        "data": tar_of({"data.txt": b"1 2 3\n"}, prefix="./"),
    }
    for label, data in client_files.items():
        s3_client.put_object(Bucket=bucket, Key=artifacts_wire[label]["key"], Body=data)
    request = decode_request(body)
    artifacts = ArtifactSet(request, layout, Storage(), cache=None, note=notes.append)

    artifacts.fetch_all()
    (layout.artifact_dir("retval") / "retval").write_bytes(pickle.dumps({"result": 3}, protocol=2))
    submitted_at = time.time()
    results = artifacts.upload_results()

    assert (layout.artifact_dir("clientscript") / "cs_client_fn.py").exists()
    assert pickle.loads((layout.artifact_dir("args") / "args.pkl").read_bytes()) == [1, 2]
    assert (layout.workspace_dir / "completion_service_client.py").exists()
    assert list(results) == ["retval"]
    retval_key = artifacts_wire["retval"]["key"]
    stored = s3_client.get_object(Bucket=bucket, Key=retval_key)["Body"].read()
    assert client_reads_retval(stored, submitted_at, tmp_path / "client") == {"result": 3}
    assert notes == []


def test_missing_immutable_input_fails_with_the_reason_in_the_output_log(
    services: Endpoints, bucket: str, layout: ExperimentLayout, notes: list[str]
) -> None:
    request = make_request({"workspace": artifact(services, bucket, "blobstore/missing.tar")})
    artifacts = ArtifactSet(request, layout, Storage(), cache=None, note=notes.append)

    with pytest.raises(ArtifactError) as failed:
        artifacts.fetch_all()

    uri = f"s3://{host_of(services)}/{bucket}/blobstore/missing.tar"
    assert failed.value.label == "workspace" and failed.value.uri == uri
    assert "does not exist" in str(failed.value) and uri in str(failed.value)
    assert len(notes) == 1
    assert "failed when downloading user data" in notes[0] and "workspace" in notes[0] and uri in notes[0]
    assert services.s3_secret_key not in notes[0]


def test_unreadable_mutable_input_is_not_silently_replaced(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str]
) -> None:
    """An existing checkpoint that cannot be read must fail the attempt, not be overwritten later."""
    s3_client.put_object(Bucket=bucket, Key="ws.tar", Body=tar_of({"main.py": b""}))
    s3_client.put_object(Bucket=bucket, Key="experiments/exp/modeldir.tar", Body=b"not a tar archive" * 100)
    request = make_request(
        {
            "workspace": artifact(services, bucket, "ws.tar"),
            "modeldir": artifact(services, bucket, "experiments/exp/modeldir.tar", mutable=True),
        }
    )

    with pytest.raises(ArtifactError, match="modeldir"):
        ArtifactSet(request, layout, Storage(), cache=None, note=notes.append).fetch_all()
    assert "cannot unpack" in notes[0]


def test_disk_budget_is_shared_and_enforced(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str]
) -> None:
    """hdd=2m: a 1.5 MB workspace fits; with a 1 MB data file beside it, the set does not."""
    s3_client.put_object(
        Bucket=bucket, Key="ws.tar", Body=tar_of({"weights.bin": os.urandom(1_500_000)}, "gz")
    )
    s3_client.put_object(Bucket=bucket, Key="data.bin", Body=os.urandom(1_000_000))
    request = make_request(
        {
            "workspace": artifact(services, bucket, "ws.tar"),
            "data": artifact(services, bucket, "data.bin", unpack=False),
        },
        hdd="2m",
    )

    with pytest.raises(ArtifactError, match="hdd"):
        ArtifactSet(request, layout, Storage(), cache=None, note=notes.append).fetch_all()

    assert "resources_needed.hdd" in notes[0]
    used = sum(p.stat().st_size for p in layout.experiment_dir.rglob("*") if p.is_file())
    assert used <= 2_000_000


def test_cache_hit_avoids_a_second_get(
    services: Endpoints, bucket: str, s3_client, tmp_path: Path, notes: list[str]
) -> None:
    s3_client.put_object(Bucket=bucket, Key="blobstore/ws.tar", Body=tar_of({"main.py": b"print(2)\n"}))
    s3_client.put_object(Bucket=bucket, Key="datasets/d.csv", Body=b"1,2\n")
    wire = {
        "workspace": artifact(services, bucket, "blobstore/ws.tar"),
        "data": artifact(services, bucket, "datasets/d.csv", unpack=False),
    }
    storage = Storage()
    cache = DownloadCache(tmp_path / "cache", max_bytes=10 * 1024 * 1024)
    gets: list[str] = []
    client = storage.store_for(
        ArtifactLocation.parse(wire["workspace"]["qualified"]),
        make_request(wire).aws_credentials("workspace"),
        {},
    ).client  # type: ignore[attr-defined]
    client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )

    for attempt in range(2):
        layout = ExperimentLayout.create(tmp_path / "work", "same-experiment")
        ArtifactSet(make_request(wire), layout, storage, cache=cache, note=notes.append).fetch_all()
        assert (layout.workspace_dir / "main.py").read_bytes() == b"print(2)\n"
        assert (layout.artifact_dir("data") / "d.csv").read_bytes() == b"1,2\n"
        assert len(gets) == 2, f"attempt {attempt}: {gets}"

    assert cache.misses == 2 and cache.hits == 2


# --- uploading -------------------------------------------------------------------------------
def test_checkpoint_uploads_only_what_changed(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str]
) -> None:
    s3_client.put_object(Bucket=bucket, Key="blobstore/ws.tar", Body=tar_of({"main.py": b""}))
    s3_client.put_object(Bucket=bucket, Key="experiments/exp/modeldir.tar", Body=tar_of({"./epoch": b"1"}))
    artifacts = ArtifactSet(
        make_request(
            standard_artifacts(services, bucket)
            | {"tb": artifact(services, bucket, "experiments/exp/tb.tar", mutable=True)}
        ),
        layout,
        Storage(),
        cache=None,
        note=notes.append,
    )
    artifacts.fetch_all()
    layout.output_file.write_text("epoch 1\n")

    first = artifacts.checkpoint()
    second = artifacts.checkpoint()
    (layout.artifact_dir("modeldir") / "epoch").write_text("2")
    os.utime(layout.artifact_dir("modeldir") / "epoch", (time.time() + 5, time.time() + 5))
    third = artifacts.checkpoint()

    assert first == ["output"]  # modeldir as fetched, tb empty, _metadata never checkpointed
    assert second == []
    assert third == ["modeldir"]
    stored = s3_client.get_object(Bucket=bucket, Key="experiments/exp/modeldir.tar")["Body"].read()
    assert read_tar(stored) == {"./epoch": b"2"}
    assert "metadata/" not in [
        o["Key"][:9] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    ]


def test_final_upload_puts_metadata_last_under_metadata_prefix(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str]
) -> None:
    s3_client.put_object(Bucket=bucket, Key="blobstore/ws.tar", Body=tar_of({"main.py": b""}))
    storage = RecordingStorage()
    wire = standard_artifacts(services, bucket) | {
        "tb": artifact(services, bucket, "experiments/exp/tb.tar.gz", mutable=True)
    }
    artifacts = ArtifactSet(make_request(wire), layout, storage, cache=None, note=notes.append)
    artifacts.fetch_all()
    layout.output_file.write_text('training\n{"experiment": {"loss": 0.1}}\n')
    (layout.artifact_dir("modeldir") / "ckpt").mkdir()
    (layout.artifact_dir("modeldir") / "ckpt" / "model.bin").write_bytes(os.urandom(50_000))
    (layout.artifact_dir("tb") / "empty-subfolder").mkdir()
    (layout.metadata_dir / "scrape-host-runner-1sGgNO.json").write_text('{"studioml": {"host": "runner"}}')
    (layout.metadata_dir / "empty.json").write_text("")
    (layout.metadata_dir / "logs").mkdir()
    (layout.metadata_dir / "logs" / "output-host-runner-1sGgNO.log").write_text("training\n")

    results = artifacts.upload_results()

    host = host_of(services)
    assert results == {
        "modeldir": f"s3://{host}/{bucket}/experiments/exp/modeldir.tar",
        "output": f"s3://{host}/{bucket}/experiments/exp/output.tar",
        "_metadata/logs/output-host-runner-1sGgNO.log": f"s3://{host}/{bucket}/metadata/logs/output-host-runner-1sGgNO.log",
        "_metadata/scrape-host-runner-1sGgNO.json": f"s3://{host}/{bucket}/metadata/scrape-host-runner-1sGgNO.json",
    }
    metadata_keys = {"metadata/scrape-host-runner-1sGgNO.json", "metadata/logs/output-host-runner-1sGgNO.log"}
    last_other_end = max(
        i for i, (what, key) in enumerate(storage.events) if what == "end" and key not in metadata_keys
    )
    first_metadata_start = min(i for i, (what, key) in enumerate(storage.events) if key in metadata_keys)
    assert last_other_end < first_metadata_start
    scrape = s3_client.get_object(Bucket=bucket, Key="metadata/scrape-host-runner-1sGgNO.json")
    assert scrape["ContentType"] == "application/json"
    assert json.loads(scrape["Body"].read()) == {"studioml": {"host": "runner"}}
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "metadata/empty.json" not in keys and "experiments/exp/tb.tar.gz" not in keys
    output = read_tar(s3_client.get_object(Bucket=bucket, Key="experiments/exp/output.tar")["Body"].read())
    assert output == {"./output": b'training\n{"experiment": {"loss": 0.1}}\n'}
    model = s3_client.get_object(Bucket=bucket, Key="experiments/exp/modeldir.tar")["Body"].read()
    assert set(read_tar(model)) == {"./ckpt/model.bin"}
    assert (
        artifacts.scrape_uri("scrape-host-runner-1sGgNO.json")
        == results["_metadata/scrape-host-runner-1sGgNO.json"]
    )


def test_compressed_keys_are_uploaded_compressed(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str], tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=bucket, Key="ws.tar", Body=tar_of({"main.py": b""}))
    wire = {
        "workspace": artifact(services, bucket, "ws.tar"),
        "modeldir": artifact(services, bucket, "experiments/exp/modeldir.tgz", mutable=True),
        "tb": artifact(services, bucket, "experiments/exp/tb.tar.bz2", mutable=True),
    }
    artifacts = ArtifactSet(make_request(wire), layout, Storage(), cache=None, note=notes.append)
    artifacts.fetch_all()
    (layout.artifact_dir("modeldir") / "m").write_text("model")
    (layout.artifact_dir("tb") / "events").write_text("events")

    artifacts.upload_results()

    modeldir = s3_client.get_object(Bucket=bucket, Key="experiments/exp/modeldir.tgz")
    tb = s3_client.get_object(Bucket=bucket, Key="experiments/exp/tb.tar.bz2")["Body"].read()
    assert modeldir["ContentType"] == "application/gzip"
    assert modeldir["Body"].read()[:2] == b"\x1f\x8b"  # gzip, not upstream's bzip2-for-.tgz
    assert tb[:3] == b"BZh"
    unpack(io.BytesIO(tb), tmp_path / "tb", budget=1 << 20)
    assert (tmp_path / "tb" / "events").read_text() == "events"


def test_retval_is_refreshed_with_a_newer_member_time(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str], tmp_path: Path
) -> None:
    """The timing trap: a client that records its submit time late must still see a newer retval."""
    s3_client.put_object(Bucket=bucket, Key="ws.tar", Body=tar_of({"main.py": b""}))
    wire = {
        "workspace": artifact(services, bucket, "ws.tar"),
        "retval": artifact(services, bucket, "experiments/exp/retval.tar", mutable=True),
    }
    artifacts = ArtifactSet(make_request(wire), layout, Storage(), cache=None, note=notes.append)
    artifacts.fetch_all()
    (layout.artifact_dir("retval") / "retval").write_bytes(pickle.dumps([0.5, "ok"], protocol=2))

    artifacts.upload_results()
    recorded_late = time.time()  # the client noted its submit time only now
    first = s3_client.get_object(Bucket=bucket, Key="experiments/exp/retval.tar")["Body"].read()
    time.sleep(0.05)
    refreshed = artifacts.refresh_retval()
    second = s3_client.get_object(Bucket=bucket, Key="experiments/exp/retval.tar")["Body"].read()

    with pytest.raises(AssertionError, match="old"):
        client_reads_retval(first, recorded_late, tmp_path / "first")
    assert refreshed is True
    assert client_reads_retval(second, recorded_late, tmp_path / "second") == [0.5, "ok"]


def test_refresh_retval_without_retval_does_nothing(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str]
) -> None:
    s3_client.put_object(Bucket=bucket, Key="ws.tar", Body=tar_of({"main.py": b""}))
    artifacts = ArtifactSet(
        make_request({"workspace": artifact(services, bucket, "ws.tar")}),
        layout,
        Storage(),
        cache=None,
        note=notes.append,
    )
    artifacts.fetch_all()

    assert artifacts.refresh_retval() is False
    assert artifacts.scrape_uri("scrape-host-x-1.json") is None


def test_failed_final_upload_raises_and_withholds_metadata(
    services: Endpoints, bucket: str, s3_client, layout: ExperimentLayout, notes: list[str]
) -> None:
    wire = standard_artifacts(services, bucket)
    wire["modeldir"] = artifact(services, bucket, "experiments/exp/modeldir.tar", mutable=True, keys=False)
    wire["modeldir"]["credentials"] = {
        "aws": {"access_key": "", "secret_access_key": ""}
    }  # anonymous: refused
    wire["tb"] = artifact(services, bucket, "experiments/exp/tb.zip", mutable=True)
    storage = RecordingStorage()
    artifacts = ArtifactSet(make_request(wire), layout, storage, cache=None, note=notes.append)
    for label in ("modeldir", "tb", "_metadata"):  # as a run whose fetch failed leaves them
        layout.artifact_dir(label).mkdir(exist_ok=True)
    (layout.artifact_dir("modeldir") / "m").write_text("model")
    (layout.artifact_dir("tb") / "events").write_text("events")
    layout.output_file.write_text("done\n")
    (layout.metadata_dir / "scrape-host-r-1.json").write_text("{}")

    with pytest.raises(ArtifactError) as failed:
        artifacts.upload_results()

    assert failed.value.label == "modeldir" and "AccessDenied" in failed.value.reason
    assert "1 more artifact" in str(failed.value)
    assert any("modeldir" in n and "AccessDenied" in n for n in notes)
    assert any("tb" in n and "not a tar archive name" in n for n in notes)
    assert all(not key.startswith("metadata/") for _, key in storage.events)
    assert ("end", "experiments/exp/output.tar") in storage.events  # what could be stored, was


def test_file_locations(tmp_path: Path, layout: ExperimentLayout, notes: list[str]) -> None:
    """Local queues and tests keep artifacts in folders: ``file:///path``."""
    store_root = tmp_path / "store"
    (store_root / "blobstore").mkdir(parents=True)
    (store_root / "blobstore" / "ws.tar").write_bytes(tar_of({"main.py": b"print(3)\n"}, "gz"))
    wire = {
        "workspace": {"qualified": f"file://{store_root}/blobstore/ws.tar", "unpack": True},
        "modeldir": {
            "qualified": f"file://{store_root}/experiments/exp/modeldir.tar",
            "mutable": True,
            "unpack": True,
        },
        "_metadata": {
            "qualified": f"file://{store_root}/experiments/exp/_metadata.tar",
            "mutable": True,
            "unpack": True,
        },
    }
    artifacts = ArtifactSet(make_request(wire), layout, Storage(), cache=None, note=notes.append)

    artifacts.fetch_all()
    (layout.artifact_dir("modeldir") / "m.bin").write_bytes(b"weights")
    (layout.metadata_dir / "scrape-host-r-1.json").write_text("{}")
    results = artifacts.upload_results()

    assert (layout.workspace_dir / "main.py").read_text() == "print(3)\n"
    assert read_tar((store_root / "experiments" / "exp" / "modeldir.tar").read_bytes()) == {
        "./m.bin": b"weights"
    }
    scrape = store_root / "experiments" / "exp" / "metadata" / "scrape-host-r-1.json"
    assert scrape.read_text() == "{}"
    assert results["_metadata/scrape-host-r-1.json"] == f"file://{scrape}"
    assert artifacts.scrape_uri("scrape-host-r-1.json") == f"file://{scrape}"


def test_fingerprint_sees_names_sizes_modes_and_times(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a")
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    (tmp_path / "f").chmod(0o600)
    after_mode = fingerprint(tmp_path)
    os.utime(tmp_path / "f", (1, 1))
    after_time = fingerprint(tmp_path)
    (tmp_path / "g").mkdir()

    assert len({before, after_mode, after_time, fingerprint(tmp_path)}) == 4
