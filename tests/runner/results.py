"""Reading an experiment's results back from S3, the way a StudioML user would find them."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any


def tar_members(s3, bucket: str, key: str) -> dict[str, bytes]:
    """``{member name: content}`` of a tar artifact; directories and links are left out."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


def exists(s3, bucket: str, key: str) -> bool:
    return s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0


def scrape_documents(s3, bucket: str, experiment: str) -> list[dict[str, Any]]:
    """Every scrape document of ``experiment`` in the bucket, oldest attempt first."""
    documents = []
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="metadata/scrape-host-")
    for page in pages:
        for item in page.get("Contents", []):
            document = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
            if document.get("studioml", {}).get("experiment", {}).get("key") == experiment:
                documents.append(document)
    return sorted(documents, key=lambda d: d["studioml"].get("load_time", ""))


def final_document(s3, bucket: str, experiment: str) -> dict[str, Any] | None:
    """The newest scrape document once its attempt has ended (it has a stop time)."""
    documents = [d for d in scrape_documents(s3, bucket, experiment) if d["studioml"].get("stop_time")]
    return documents[-1] if documents else None
