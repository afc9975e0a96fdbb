"""Packed virtualenvs shared through SeaweedFS: built by one fresh runner, restored by the next.

Each ``studio-runner run`` here is a fresh pod: empty working and cache folders, one shared
``--env-cache-uri``. The second runner's package index is unreachable, so it can only succeed
by restoring the pack (a build would fail).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from studio_runner.envcache import PACK_SUFFIX, EnvPackCache, unpack_pack
from studio_runner.pythonenv import VirtualenvCache

from tests.runner.client_requests import client_request, upload_blob, workspace_tar

pytestmark = pytest.mark.timeout(600)

REQUIREMENT = "tabulate==0.10.0"
"""Small, pure Python, and with a console script (``tabulate``) to prove scripts work after a move."""

WORKLOAD = b"""\
import os, subprocess, sys
import tabulate
print("first-line", tabulate.__version__, sys.prefix, flush=True)
script = os.path.join(sys.prefix, "bin", "tabulate")
print(subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout.splitlines()[0])
"""

UNREACHABLE_INDEX = {
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "PIP_NO_INDEX": "1",
    "PIP_CONFIG_FILE": os.devnull,
    "UV_INDEX_URL": "http://127.0.0.1:9/simple",
    "UV_OFFLINE": "1",
}


def cache_uri(services, bucket: str) -> str:
    return f"s3://{services.s3_endpoint.split('://', 1)[1]}/{bucket}/envs"


def fresh_pod_run(
    tmp_path: Path,
    services,
    bucket: str,
    name: str,
    *,
    env: dict[str, str] | None = None,
    local_dir: Path | None = None,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``studio-runner run`` of the workload in an empty working and cache folder, like a new pod."""
    pod = tmp_path / name
    pod.mkdir()
    key = f"envcache_{name}_{uuid.uuid4().hex[:6]}"
    request = client_request(
        services,
        bucket,
        key,
        upload_blob(services.s3_client(), bucket, workspace_tar({"train.py": WORKLOAD})),
    )
    request["experiment"]["pythonenv"] = [REQUIREMENT]
    (pod / "request.json").write_text(json.dumps(request))
    command = [
        str(Path(sys.executable).parent / "studio-runner"),
        "run",
        "--request",
        str(pod / "request.json"),
        "--working-dir",
        str(pod / "work"),
        "--log-format",
        "text",
        "--env-cache-uri",
        cache_uri(services, bucket),
        "--result-file",
        str(pod / "result.json"),
    ]
    if local_dir is not None:
        command += ["--env-cache-dir", str(local_dir)]
    environment = {
        **os.environ,
        **services.aws_identity(),
        "UV_CACHE_DIR": str(pod / "uv-cache"),
        "PIP_NO_CACHE_DIR": "1",
        **(env or {}),
    }
    completed = subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=500, check=False
    )
    return completed, pod


def stored_pack(s3_client, bucket: str) -> tuple[str, bytes, dict[str, str]]:
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="envs/").get("Contents", [])
    assert len(listed) == 1, listed
    key = listed[0]["Key"]
    answer = s3_client.get_object(Bucket=bucket, Key=key)
    return key, answer["Body"].read(), answer["Metadata"]


def test_a_pack_built_by_one_fresh_runner_is_used_by_another(
    tmp_path: Path, services, s3_client, bucket: str
) -> None:
    first, _ = fresh_pod_run(tmp_path, services, bucket, "first")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert " (built, " in first.stdout
    key, body, metadata = stored_pack(s3_client, bucket)
    assert key.endswith(PACK_SUFFIX)
    assert hashlib.sha256(body).hexdigest() == metadata["sha256"]

    second, pod = fresh_pod_run(tmp_path, services, bucket, "second", env=UNREACHABLE_INDEX)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-5000:]
    assert " (built, " not in output  # nothing was installed: the index is unreachable anyway
    assert "restored from cache in" in second.stdout  # in the experiment's own console (the task log)
    # the restored environment lives in this pod's folder and runs its python and its console script
    first_line = next(line for line in second.stdout.splitlines() if line.startswith("first-line"))
    assert first_line.split()[1] == "0.10.0"
    assert first_line.split()[2].startswith(str(pod / "work"))
    assert "Usage: tabulate" in second.stdout


def test_a_corrupt_pack_is_discarded_and_rebuilt(tmp_path: Path, services, s3_client, bucket: str) -> None:
    first, _ = fresh_pod_run(tmp_path, services, bucket, "first")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    key, body, metadata = stored_pack(s3_client, bucket)
    # cut short, with the checksum of the whole: what a broken writer or a bad copy leaves
    s3_client.put_object(Bucket=bucket, Key=key, Body=body[: len(body) // 2], Metadata=metadata)

    second, _ = fresh_pod_run(tmp_path, services, bucket, "second")
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-5000:]
    assert "discarding" in output and "does not match" in output
    assert " (built, " in second.stdout
    _, rebuilt, rebuilt_metadata = stored_pack(s3_client, bucket)
    assert hashlib.sha256(rebuilt).hexdigest() == rebuilt_metadata["sha256"]

    third, _ = fresh_pod_run(tmp_path, services, bucket, "third", env=UNREACHABLE_INDEX)
    assert third.returncode == 0, (third.stdout + third.stderr)[-5000:]
    assert "restored from cache in" in third.stdout


def test_a_node_local_folder_is_filled_on_download_and_consulted_first(
    tmp_path: Path, services, s3_client, bucket: str
) -> None:
    first, _ = fresh_pod_run(tmp_path, services, bucket, "first")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    node = tmp_path / "node-cache"
    second, _ = fresh_pod_run(tmp_path, services, bucket, "second", env=UNREACHABLE_INDEX, local_dir=node)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    assert [p.name for p in node.iterdir() if p.name.endswith(PACK_SUFFIX)]
    # the store loses it: the node-local copy still serves a new pod on this node
    key, _, _ = stored_pack(s3_client, bucket)
    s3_client.delete_object(Bucket=bucket, Key=key)
    third, _ = fresh_pod_run(tmp_path, services, bucket, "third", env=UNREACHABLE_INDEX, local_dir=node)
    assert third.returncode == 0, (third.stdout + third.stderr)[-5000:]
    assert "restored from cache in" in third.stdout


def test_two_concurrent_builders_leave_one_valid_pack(
    tmp_path: Path, services, s3_client, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", services.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", services.s3_secret_key)
    stored: list[bool] = []

    class Recording(EnvPackCache):
        def publish(self, *args, **kwargs) -> bool:  # type: ignore[no-untyped-def]
            result = super().publish(*args, **kwargs)
            stored.append(result)
            return result

    builders = [
        VirtualenvCache(
            tmp_path / f"pod-{n}",
            packs=Recording(uri=cache_uri(services, bucket), scratch_dir=tmp_path / f"scratch-{n}"),
        )
        for n in range(2)
    ]
    start = threading.Barrier(2)
    made: list[bool] = []

    def build(n: int) -> None:
        start.wait()
        made.append(builders[n].ensure("3.11", [REQUIREMENT], log=lambda _: None).built)

    threads = [threading.Thread(target=build, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert made == [True, True]  # neither found a pack: both built at once
    assert sorted(stored) == [False, True]  # the first writer won; the second was refused, not merged
    _, body, metadata = stored_pack(s3_client, bucket)
    assert hashlib.sha256(body).hexdigest() == metadata["sha256"]
    (tmp_path / "pack").write_bytes(body)
    unpack_pack(tmp_path / "pack", tmp_path / "unpacked")
    assert (tmp_path / "unpacked" / "bin" / "tabulate").is_file()
