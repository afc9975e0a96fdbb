"""Building StudioML requests against a real SeaweedFS, judged by the runner's own request model."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from studio_runner.request import ArtifactLocation, Request, decode_request
from studio_runner.storage import StorageSettings, resolve_endpoint

from airflow_provider_studio.experiment_request import (
    PACKED_MTIME,
    RESULT_LABELS,
    ExperimentSpec,
    RequestBuilder,
    S3Endpoint,
    build_request,
    default_experiment_key,
    pack,
)

CONN_ID = "studio_request_s3"


@pytest.fixture
def aws_conn(services, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An Airflow AWS connection to the session's SeaweedFS, from an AIRFLOW_CONN_ variable."""
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        json.dumps(
            {
                "conn_type": "aws",
                "login": services.s3_access_key,
                "password": services.s3_secret_key,
                "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
            }
        ),
    )
    yield CONN_ID


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "workspace"
    (folder / "pkg").mkdir(parents=True)
    (folder / "train.py").write_text("print('training')\n")
    (folder / "pkg" / "__init__.py").write_text("")
    (folder / "pkg" / "model.py").write_text("LAYERS = 3\n")
    (folder / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (folder / "run.sh").chmod(0o755)
    return folder


def spec(workspace: Path | str | None, **overrides: Any) -> ExperimentSpec:
    fields: dict[str, Any] = {"key": "exp-1", "script": "train.py", "workspace": workspace, **overrides}
    return ExperimentSpec(**fields)


def builder(aws_conn: str, bucket: str) -> RequestBuilder:
    return RequestBuilder(S3Hook(aws_conn_id=aws_conn), bucket)


def members(s3_client, bucket: str, key: str) -> list[tarfile.TarInfo]:
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        return archive.getmembers()


# --- the request ---------------------------------------------------------------------------------


def test_a_full_request_round_trips_through_the_runner_decoder(
    aws_conn: str, bucket: str, services, s3_client, workspace: Path, tmp_path: Path
) -> None:
    data_file = tmp_path / "vocab.txt"
    data_file.write_text("a b c\n")
    s3_client.put_object(Bucket=bucket, Key="datasets/cifar.tar.gz", Body=b"not really gzip")
    s3_client.put_object(Bucket=bucket, Key="datasets/labels.csv", Body=b"id,label\n")
    request = build_request(
        spec(
            workspace,
            key="enn-gen3-g007",
            args=["--genome", "g-007", "--lr", 0.01],
            pythonenv=["numpy==2.4.6"],
            pip=["tqdm"],
            resources={"cpus": 4, "ram": "16g", "hdd": "20g", "gpus": 1, "gpuCount": 2, "gpuMem": "24GiB"},
            max_duration="2h",
            lifetime=3600,
            project="enn",
            inputs={
                "vocab": data_file,
                "cifar": f"s3://{bucket}/datasets/cifar.tar.gz",
                "labels": f"s3://{bucket}/datasets/labels.csv",
            },
            env={"PYTHONHASHSEED": 0, "ENN_GENERATION": "3"},
        ),
        bucket=bucket,
        aws_conn_id=aws_conn,
    )

    assert isinstance(request, Request)
    wire = request.to_wire()
    assert decode_request(request.to_json()).to_wire() == wire
    assert decode_request(json.dumps(wire).encode()).to_wire() == wire

    experiment = request.experiment
    assert experiment.key == "enn-gen3-g007"
    assert experiment.filename == "train.py"
    assert experiment.args == ["--genome", "g-007", "--lr", "0.01"]
    assert experiment.pythonver == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert experiment.pythonenv == ["numpy==2.4.6"]
    assert experiment.project == "enn"
    assert experiment.max_duration == "2h" and experiment.max_duration_seconds == 7200
    assert experiment.time_added is not None
    resources = experiment.resources_needed
    assert (resources.cpus, resources.cards, resources.ram_bytes) == (4, 2, 16 * 1000**3)
    assert request.config.pip == ["tqdm"]
    assert request.config.lifetime_seconds == 3600
    assert request.config.env == {"PYTHONHASHSEED": "0", "ENN_GENERATION": "3"}

    host = services.s3_endpoint.split("://", 1)[1]
    artifacts = experiment.artifacts
    assert set(artifacts) == {"workspace", "vocab", "cifar", "labels", *RESULT_LABELS}
    for label in RESULT_LABELS:
        artifact = artifacts[label]
        assert artifact.qualified == f"s3://{host}/{bucket}/experiments/enn-gen3-g007/{label}.tar"
        assert (artifact.bucket, artifact.key, artifact.mutable, artifact.unpack) == (
            bucket,
            f"experiments/enn-gen3-g007/{label}.tar",
            True,
            True,
        )
    for label in ("workspace", "vocab", "cifar", "labels"):
        artifact = artifacts[label]
        assert not artifact.mutable
        assert artifact.location == ArtifactLocation("s3", host, bucket, artifact.key)
        assert s3_client.head_object(Bucket=bucket, Key=artifact.key)
    assert artifacts["workspace"].key.startswith("blobstore/") and artifacts["workspace"].unpack
    assert artifacts["vocab"].key.startswith("blobstore/") and artifacts["vocab"].unpack
    assert artifacts["cifar"].key == "datasets/cifar.tar.gz" and artifacts["cifar"].unpack
    assert artifacts["labels"].key == "datasets/labels.csv" and not artifacts["labels"].unpack


def test_no_credentials_anywhere_in_the_request(
    aws_conn: str, bucket: str, services, workspace: Path
) -> None:
    request = build_request(
        spec(workspace, env={"WANDB_MODE": "offline"}), bucket=bucket, aws_conn_id=aws_conn
    )
    text = request.to_json()
    assert services.s3_secret_key not in text
    assert services.s3_access_key not in text
    assert all(artifact.credentials is None for artifact in request.experiment.artifacts.values())
    # so the runner falls back to its own credential chain for every artifact
    assert all(request.aws_credentials(label) is None for label in request.experiment.artifacts)
    assert request.config.storage is None and request.config.database == {}

    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        with pytest.raises(ValueError, match=f"env sets {name}: credentials must not travel"):
            spec(workspace, env={name: "x"})


def test_qualified_uris_name_the_endpoint_the_runner_will_reach(aws_conn: str, services) -> None:
    endpoint = S3Endpoint.from_hook(S3Hook(aws_conn_id=aws_conn))
    assert endpoint.host == services.s3_endpoint.split("://", 1)[1]
    assert endpoint.url == services.s3_endpoint and not endpoint.https
    location = ArtifactLocation.parse(endpoint.qualified("b", "k.tar"))
    assert resolve_endpoint(location, StorageSettings()).url == services.s3_endpoint


def test_aws_and_https_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint: the AWS regional host (the runner reads the region from it); https: flagged."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_STUDIO_AWS_PLAIN",
        json.dumps(
            {"conn_type": "aws", "login": "AKIAFAKE", "password": "x", "extra": {"region_name": "eu-west-1"}}
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_STUDIO_MINIO_TLS",
        json.dumps({"conn_type": "aws", "extra": {"endpoint_url": "https://minio.example.com:9000"}}),
    )
    aws = S3Endpoint.from_hook(S3Hook(aws_conn_id="studio_aws_plain"))
    assert (aws.host, aws.url, aws.region) == ("s3.eu-west-1.amazonaws.com", None, "eu-west-1")
    resolved = resolve_endpoint(ArtifactLocation.parse(aws.qualified("b", "k")), StorageSettings())
    assert resolved.aws and resolved.region == "eu-west-1"

    minio = S3Endpoint.from_hook(S3Hook(aws_conn_id="studio_minio_tls"))
    assert minio.host == "minio.example.com:9000" and minio.https
    resolved = resolve_endpoint(
        ArtifactLocation.parse(minio.qualified("b", "k")), StorageSettings(https=True)
    )
    assert resolved.url == "https://minio.example.com:9000"


# --- arguments -----------------------------------------------------------------------------------


ODD_ARGS = ["plain", "--flag=2", "two words", "it's", "$HOME", "`id`", "semi;colon", "", "*"]


def test_args_are_shell_quoted_exactly_as_the_client_quotes_them(workspace: Path) -> None:
    assert spec(workspace, args=ODD_ARGS).quoted_args() == [shlex.quote(a) for a in ODD_ARGS]
    assert spec(workspace, args=[1, 2.5, True]).quoted_args() == ["1", "2.5", "true"]
    assert spec(workspace, args="--genome 'g 7' --lr 0.1").quoted_args() == [
        "--genome",
        "'g 7'",
        "--lr",
        "0.1",
    ]
    module = spec(None, script=None, module="enn.evaluate", args=["--genome", "g 7"])
    assert module.filename == "-m"
    assert module.quoted_args() == ["enn.evaluate", "--genome", "'g 7'"]


def test_a_shell_gives_the_workload_the_original_arguments(workspace: Path) -> None:
    """The runner's job script splices the quoted args into a bash command line."""
    quoted = spec(workspace, args=ODD_ARGS).quoted_args()
    script = "printf '%s\\n' " + " ".join(quoted)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:-1] == ODD_ARGS


# --- workspaces ----------------------------------------------------------------------------------


def test_the_same_folder_gives_the_same_blob_and_a_change_gives_a_new_one(
    aws_conn: str, bucket: str, workspace: Path, tmp_path: Path
) -> None:
    build = builder(aws_conn, bucket)
    first = build.build(spec(workspace)).experiment.artifacts["workspace"].key

    # times, copies elsewhere and bytecode caches do not count
    (workspace / "train.py").touch()
    (workspace / "pkg" / "__pycache__").mkdir()
    (workspace / "pkg" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\x00stale")
    copy = tmp_path / "elsewhere"
    subprocess.run(["cp", "-r", str(workspace), str(copy)], check=True)
    assert build.build(spec(workspace)).experiment.artifacts["workspace"].key == first
    assert build.build(spec(copy)).experiment.artifacts["workspace"].key == first

    (workspace / "pkg" / "model.py").write_text("LAYERS = 4\n")
    changed = build.build(spec(workspace)).experiment.artifacts["workspace"].key
    assert changed != first
    (workspace / "pkg" / "model.py").write_text("LAYERS = 3\n")
    (workspace / "notes.md").write_text("new file\n")
    assert build.build(spec(workspace)).experiment.artifacts["workspace"].key not in (first, changed)


def test_an_existing_blob_is_not_uploaded_again(
    aws_conn: str, bucket: str, s3_client, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = builder(aws_conn, bucket)
    uploads: list[str] = []
    real_load_file = build.hook.load_file

    def counting_load_file(filename, key, *args, **kwargs):
        uploads.append(key)
        return real_load_file(filename, key, *args, **kwargs)

    monkeypatch.setattr(build.hook, "load_file", counting_load_file)
    request = build.build(spec(workspace))
    key = request.experiment.artifacts["workspace"].key
    assert uploads == [key]
    assert [(s.label, s.uploaded) for s in build.staged] == [("workspace", True)]
    stored = s3_client.head_object(Bucket=bucket, Key=key)

    build.build(spec(workspace, key="exp-2", args=["--other"]))
    assert uploads == [key]
    assert [(s.label, s.uploaded) for s in build.staged] == [("workspace", False)]
    again = s3_client.head_object(Bucket=bucket, Key=key)
    assert (again["ETag"], again["LastModified"]) == (stored["ETag"], stored["LastModified"])


def test_blobs_are_packed_like_the_client_with_fixed_metadata(
    aws_conn: str, bucket: str, s3_client, workspace: Path, tmp_path: Path
) -> None:
    single = tmp_path / "weights.bin"
    single.write_bytes(b"\x01\x02")
    request = builder(aws_conn, bucket).build(spec(workspace, inputs={"init": single}))

    entries = members(s3_client, bucket, request.experiment.artifacts["workspace"].key)
    assert [m.name for m in entries] == ["pkg", "run.sh", "train.py", "pkg/__init__.py", "pkg/model.py"]
    assert all(
        m.mtime == PACKED_MTIME and (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "") for m in entries
    )
    modes = {m.name: m.mode for m in entries}
    assert (modes["pkg"], modes["run.sh"], modes["train.py"]) == (0o755, 0o755, 0o644)

    (single_entry,) = members(s3_client, bucket, request.experiment.artifacts["init"].key)
    assert single_entry.name == "./weights.bin"


def test_packing_refuses_links_out_of_the_folder(workspace: Path, tmp_path: Path) -> None:
    (workspace / "inside").symlink_to("train.py")
    pack(workspace, io.BytesIO())  # a link within the folder is kept as a link
    (workspace / "outside").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside"):
        pack(workspace, io.BytesIO())


def test_a_module_run_without_workspace_gets_an_empty_one(aws_conn: str, bucket: str, s3_client) -> None:
    request = builder(aws_conn, bucket).build(spec(None, script=None, module="enn.evaluate"))
    assert request.experiment.filename == "-m"
    assert members(s3_client, bucket, request.experiment.artifacts["workspace"].key) == []


def test_an_s3_workspace_is_referenced_not_copied(aws_conn: str, bucket: str, s3_client, services) -> None:
    s3_client.put_object(Bucket=bucket, Key="shared/ws.tar", Body=b"tar bytes")
    build = builder(aws_conn, bucket)
    request = build.build(spec(f"s3://{bucket}/shared/ws.tar"))
    workspace = request.experiment.artifacts["workspace"]
    assert (workspace.key, workspace.unpack) == ("shared/ws.tar", True)
    assert [(s.label, s.uploaded) for s in build.staged] == [("workspace", False)]
    with pytest.raises(ValueError, match="does not exist"):
        build.build(spec(f"s3://{bucket}/shared/missing.tar"))


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"module": "enn.evaluate"}, "exactly one of script"),
        ({"script": None}, "exactly one of script"),
        ({"script": "train.py", "workspace": ""}, "needs a workspace"),
        ({"inputs": {"modeldir": "s3://b/k"}}, "reserved"),
    ],
)
def test_unrunnable_specs_are_refused_with_reasons(
    workspace: Path, overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        spec(overrides.pop("workspace", workspace), **overrides)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"script": "missing.py"}, "not a file in the workspace"),
        ({"key": "gen/1"}, "experiment key contains '/'"),
        ({"max_duration": "forever"}, "max_duration: invalid duration"),
        ({"lifetime": -5}, "lifetime must be positive"),
        ({"resources": {"ram": "lots"}}, "invalid size"),
        ({"inputs": {"bad label": "s3://b/k"}}, "not a plain name"),
        ({"inputs": {"data": "/no/such/path"}}, "does not exist"),
    ],
)
def test_requests_the_runner_would_refuse_are_refused_when_built(
    aws_conn: str, bucket: str, workspace: Path, overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        builder(aws_conn, bucket).build(spec(workspace, **overrides))


# --- keys ----------------------------------------------------------------------------------------


def test_default_keys_are_unique_per_task_instance_and_safe_in_s3() -> None:
    run_id = "manual__2026-03-01T10:00:00.123+00:00"
    key = default_experiment_key("enn_generation", run_id, "evaluate.run", 7)
    assert key == "enn_generation_manual__2026-03-01T10_00_00.123_00_00_evaluate.run_7"
    assert "/" not in key
    assert default_experiment_key("d", run_id, "t", -1) != default_experiment_key("d", run_id, "t", 0)
    assert default_experiment_key("d/x", "r", "t") == "d_x_r_t"
    long = default_experiment_key("d" * 300, run_id, "t", 1)
    assert len(long) <= 200 and long != default_experiment_key("d" * 300, run_id, "t", 2)
    decode_request({"experiment": {"key": long}})  # the runner accepts it
