"""The core experiment on the two other transports: SQS (moto server) and local directories.

RabbitMQ is covered with the real client in test_studioml_client.py; here SQS messages also come
from the real ``studio run`` (its SQS queue honours ``AWS_ENDPOINT_URL_SQS``), and directory
queues get a request shaped like the client's.
"""

from __future__ import annotations

import json

import boto3
from studio_runner.queues.localdir import publish

from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar
from tests.runner.results import final_document, tar_members
from tests.runner.test_studioml_client import TRAIN, workspace

RESULTS_TIMEOUT = 240


def check_core_results(s3, bucket: str, key: str) -> None:
    document = wait_for(
        lambda: final_document(s3, bucket, key), RESULTS_TIMEOUT, f"the scrape document of {key}"
    )
    assert document["studioml"]["status"] == "succeeded"
    assert document["experiment"] == {"epoch": 2, "fitness": 0.75}
    output = tar_members(s3, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    assert "arguments: ['arg1', '--flag=2']" in output
    assert tar_members(s3, bucket, f"experiments/{key}/modeldir.tar") == {"./weights.txt": b"trained"}


def test_sqs_queue_with_the_real_client(studio_client, serve_runner, s3_client, services, tmp_path):
    queue = f"sqs_e2e_{tmp_path.name[-8:].lower()}"
    moto_keys = {"AWS_ACCESS_KEY_ID": "moto", "AWS_SECRET_ACCESS_KEY": "moto"}
    serve_runner("--sqs-endpoint", services.sqs_endpoint, "--sqs-region", services.region, env=moto_keys)
    key = f"sqs_{queue}"
    studio_client.run(workspace(tmp_path, TRAIN), queue, "train.py", "arg1", "--flag=2", key=key)

    check_core_results(s3_client, studio_client.bucket, key)
    sqs = boto3.client(
        "sqs", endpoint_url=services.sqs_endpoint, region_name=services.region, **_keys(moto_keys)
    )
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]

    def drained() -> bool:
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return (
            attributes["ApproximateNumberOfMessages"] == "0"
            and attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
        )

    assert wait_for(drained, 30, "the SQS message to be deleted")


def test_local_directory_queue(serve_runner, s3_client, services, bucket, tmp_path):
    root = tmp_path / "queues"
    serve_runner("--queue-root", str(root))
    blob = workspace_tar({"train.py": TRAIN.encode()})
    key = "local_core_experiment"
    request = client_request(
        services, bucket, key, upload_blob(s3_client, bucket, blob), args=("arg1", "--flag=2")
    )
    publish(root, "local_e2e", json.dumps(request).encode())

    check_core_results(s3_client, bucket, key)
    assert wait_for(
        lambda: not [p for p in (root / "local_e2e").rglob("*") if p.is_file()], 30, "the file to go"
    )


def _keys(environment: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": environment["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": environment["AWS_SECRET_ACCESS_KEY"],
    }
