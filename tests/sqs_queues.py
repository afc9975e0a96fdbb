"""SQS as the tests see it on the session's moto server: clients, and credential sets laid out as
``studio-runner serve --sqs-certs`` reads them."""

from __future__ import annotations

from pathlib import Path

import boto3

from devtools.services import Endpoints


def credential_set(certs: Path, name: str, region: str) -> None:
    folder = certs / name
    folder.mkdir(parents=True)
    (folder / "credentials").write_text(
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    (folder / "config").write_text(f"[default]\nregion = {region}\n")


def sqs_client(services: Endpoints, region: str | None = None):
    return boto3.client(
        "sqs",
        endpoint_url=services.sqs_endpoint,
        region_name=region or services.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
