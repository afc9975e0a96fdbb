"""Requests shaped like the StudioML client's, for inputs the client itself would never send."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import uuid
from typing import Any

from devtools.services import Endpoints


def workspace_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar with the member names given, as the client packs a workspace folder."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in files.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            entry.mtime = int(time.time())
            tar.addfile(entry, io.BytesIO(data))
    return archive.getvalue()


def upload_blob(s3, bucket: str, blob: bytes) -> str:
    """Store ``blob`` content-addressed under ``blobstore/``, as the client does; returns the key."""
    key = f"blobstore/{hashlib.sha256(blob).hexdigest()}.tar"
    s3.put_object(Bucket=bucket, Key=key, Body=blob)
    return key


def client_request(
    services: Endpoints,
    bucket: str,
    key: str,
    workspace_key: str,
    *,
    filename: str = "train.py",
    args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The request ``studio run`` would send for a workspace already in ``bucket``."""
    host = services.s3_endpoint.split("://", 1)[1]
    credentials = {"aws": {"access_key": services.s3_access_key, "secret_access_key": services.s3_secret_key}}

    def artifact(object_key: str, mutable: bool) -> dict[str, Any]:
        return {
            "qualified": f"s3://{host}/{bucket}/{object_key}",
            "bucket": bucket,
            "key": object_key,
            "mutable": mutable,
            "unpack": True,
            "credentials": credentials,
        }

    return {
        "experiment": {
            "key": key,
            "filename": filename,
            "args": list(args),
            "pythonver": "3.11",
            "pythonenv": [],
            "time_added": time.time(),
            "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "1g", "gpus": 0},
            "artifacts": {
                "workspace": artifact(workspace_key, False),
                "output": artifact(f"experiments/{key}/output.tar", True),
                "modeldir": artifact(f"experiments/{key}/modeldir.tar", True),
                "_metadata": artifact(f"experiments/{key}/_metadata.tar", True),
            },
        },
        "config": {"env": {"AWS_DEFAULT_REGION": services.region}, "experimentLifetime": "30m"},
    }


def queued_request(key: str, **resources: object) -> bytes:
    """A body shaped like the one ``studio run`` publishes (trimmed ``pythonenv``), for queue tests
    that look at requests without running them."""
    needed = {"gpus": 0, "cpus": 1, "ram": "2g", "hdd": "3g", **resources}
    root = "s3://127.0.0.1:8333/studioml-artifacts"
    workspace_key = f"blobstore/{uuid.uuid4().hex}.tar"

    def artifact(object_key: str, mutable: bool) -> dict[str, Any]:
        return {
            "unpack": True,
            "mutable": mutable,
            "key": object_key,
            "qualified": f"{root}/{object_key}",
            "bucket": "studioml-artifacts",
        }

    body = {
        "experiment": {
            "key": key,
            "args": ["arg1", "--flag=2"],
            "filename": "hello.py",
            "pythonenv": ["numpy==2.4.6", "pika==1.4.4", "studioml==0.0.49"],
            "project": "research",
            "pythonver": "3.11",
            "resources_needed": needed,
            "status": "waiting",
            "time_added": 1795336687.93,
            "max_duration": None,
            "owner": "guest",
            "artifacts": {
                "workspace": artifact(workspace_key, False),
                "output": artifact(f"experiments/{key}/output.tar", True),
            },
        },
        "config": {
            "cloud": {"queue": {"rmq": "amqp://guest:guest@127.0.0.1:5672/%2f"}},
            "env": {"AWS_DEFAULT_REGION": "us-east-1", "PYTHONUNBUFFERED": "1"},
            "experimentLifetime": "30m",
        },
    }
    return json.dumps(body).encode()


def script_request(
    services: Endpoints, s3, bucket: str, key: str, script: str, *args: str, retval: bool = False
) -> dict[str, Any]:
    """A client request running ``script`` as ``train.py``; ``retval`` adds the mutable ``retval``
    artifact that CompletionService clients read their answer from."""
    blob = workspace_tar({"train.py": script.encode()})
    request = client_request(services, bucket, key, upload_blob(s3, bucket, blob), args=args)
    if retval:
        host = services.s3_endpoint.split("://", 1)[1]
        request["experiment"]["artifacts"]["retval"] = {
            **request["experiment"]["artifacts"]["output"],
            "key": f"experiments/{key}/retval.tar",
            "qualified": f"s3://{host}/{bucket}/experiments/{key}/retval.tar",
        }
    return request
