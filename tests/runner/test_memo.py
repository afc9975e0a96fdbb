"""studio_runner.memo: what the fingerprint covers, and the result index on a real SeaweedFS."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from studio_runner.memo import FingerprintError, ResultIndex, fingerprint
from studio_runner.outcome import Status
from studio_runner.request import decode_request
from studio_runner.summary import RunSummary

BLOB = "a" * 64


def wire(**experiment: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "experiment": {
            "key": "exp-1",
            "filename": "train.py",
            "args": ["--genome", "g1"],
            "pythonver": "3.11",
            "pythonenv": ["numpy==2.0.0"],
            "time_added": 1700000000.0,
            "resources_needed": {"cpus": 1, "ram": "1g"},
            "max_duration": "20m",
            "artifacts": {
                "workspace": {
                    "qualified": f"s3://h:8333/b/blobstore/{BLOB}.tar",
                    "bucket": "b",
                    "key": f"blobstore/{BLOB}.tar",
                    "unpack": True,
                },
                "output": {
                    "qualified": "s3://h:8333/b/experiments/exp-1/output.tar",
                    "bucket": "b",
                    "key": "experiments/exp-1/output.tar",
                    "mutable": True,
                },
            },
        },
        "config": {"env": {"MODE": "fast"}, "pip": []},
    }
    document["experiment"].update(experiment)
    return document


def fp(document: dict[str, Any], **options: Any) -> str:
    return fingerprint(decode_request(document), **options)


def test_the_key_time_resources_and_result_locations_do_not_change_the_fingerprint() -> None:
    base = fp(wire())
    other = wire(key="exp-2", time_added=1800000000.0, resources_needed={"gpus": 1, "gpuCount": 2})
    other["experiment"]["max_duration"] = "2h"
    other["experiment"]["artifacts"]["output"]["key"] = "experiments/exp-2/output.tar"
    other["experiment"]["artifacts"]["output"]["qualified"] = "s3://h:8333/b/experiments/exp-2/output.tar"
    assert fp(other) == base
    assert len(base) == 64 and int(base, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"args": ["--genome", "g2"]},
        {"filename": "other.py"},
        {"pythonver": "3.12"},
        {"pythonenv": ["numpy==2.1.0"]},
    ],
)
def test_what_determines_the_result_changes_the_fingerprint(change: dict[str, Any]) -> None:
    assert fp(wire(**change)) != fp(wire())


def test_content_env_pip_and_cache_version_change_the_fingerprint() -> None:
    base = fp(wire())
    other_content = wire()
    other_content["experiment"]["artifacts"]["workspace"]["key"] = f"blobstore/{'b' * 64}.tar"
    assert fp(other_content) != base
    other_env = wire()
    other_env["config"]["env"] = {"MODE": "slow"}
    assert fp(other_env) != base
    other_pip = wire()
    other_pip["config"]["pip"] = ["torch"]
    assert fp(other_pip) != base
    assert fp(wire(), cache_version="2") != base


def test_an_input_not_named_by_its_content_needs_a_digest() -> None:
    document = wire()
    document["experiment"]["artifacts"]["data"] = {
        "qualified": "s3://h:8333/b/datasets/digits.npz",
        "bucket": "b",
        "key": "datasets/digits.npz",
    }
    with pytest.raises(FingerprintError, match=r"'data'.*not content-addressed"):
        fp(document)
    one = fp(document, digests={"data": "etag:1"})
    assert one != fp(document, digests={"data": "etag:2"})


def summary(key: str, status: Status = Status.SUCCEEDED, **fields: Any) -> RunSummary:
    return RunSummary(key=key, status=status, **fields)


def stored_summary(s3_client, bucket: str, key: str) -> RunSummary:
    """A succeeded summary whose scrape document and output really exist in ``bucket``."""
    scrape = f"experiments/{key}/_metadata/attempt-1.json"
    s3_client.put_object(Bucket=bucket, Key=scrape, Body=b"{}")
    s3_client.put_object(Bucket=bucket, Key=f"experiments/{key}/output.tar", Body=b"tar")
    return summary(
        key,
        scrape_bucket=bucket,
        scrape_key=scrape,
        scrape_uri=f"s3://host:1/{bucket}/{scrape}",
        artifacts={"output": f"s3://host:1/{bucket}/experiments/{key}/output.tar"},
        duration_seconds=3.5,
    )


def test_a_recorded_success_is_found_while_its_results_exist(s3_client, bucket: str) -> None:
    index = ResultIndex(s3_client, bucket)
    print_ = fp(wire())
    assert index.lookup(print_) is None
    original = stored_summary(s3_client, bucket, "exp-1")
    assert index.record(print_, original) == f"memo/{print_}.json"
    found = index.lookup(print_)
    assert found is not None and found.key == "exp-1" and found.scrape_key == original.scrape_key
    assert found.duration_seconds == 3.5

    s3_client.delete_object(Bucket=bucket, Key="experiments/exp-1/output.tar")
    assert index.lookup(print_) is None, "a result whose output was deleted is run again"


def test_failed_cancelled_timed_out_unsaved_and_reused_runs_are_never_recorded(
    s3_client, bucket: str
) -> None:
    index = ResultIndex(s3_client, bucket)
    print_ = fp(wire())
    for status in (Status.FAILED, Status.CANCELLED, Status.TIMED_OUT):
        with pytest.raises(ValueError, match="only succeeded runs"):
            index.record(print_, summary("exp-1", status))
    with pytest.raises(ValueError, match="only succeeded runs"):
        index.record(print_, summary("exp-1", results_saved=False))
    with pytest.raises(ValueError, match="record the original"):
        index.record(print_, summary("exp-2", reused_from="exp-1"))
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket, Prefix="memo/")


def test_an_unreadable_or_foreign_entry_is_a_miss_and_a_new_success_replaces_it(
    s3_client, bucket: str
) -> None:
    index = ResultIndex(s3_client, bucket)
    print_ = fp(wire())
    s3_client.put_object(Bucket=bucket, Key=f"memo/{print_}.json", Body=b'{"fingerprint": "trunc')
    assert index.lookup(print_) is None
    failed = {"fingerprint": print_, "summary": {"key": "x", "status": "failed"}, "recorded_at": 1.0}
    s3_client.put_object(Bucket=bucket, Key=f"memo/{print_}.json", Body=json.dumps(failed).encode())
    assert index.lookup(print_) is None, "an entry saying failed (written by hand) is not reused"
    index.record(print_, stored_summary(s3_client, bucket, "exp-3"))
    found = index.lookup(print_)
    assert found is not None and found.key == "exp-3"


def test_a_fingerprint_is_checked_before_it_names_an_object(s3_client, bucket: str) -> None:
    with pytest.raises(ValueError, match="not a fingerprint"):
        ResultIndex(s3_client, bucket).lookup(f"../{uuid.uuid4().hex}")
