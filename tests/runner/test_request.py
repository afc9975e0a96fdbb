"""The request model: lenient where real clients need it, strict where a run would fail later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from studio_runner.limits import checkpoint_period, time_limit
from studio_runner.request import ArtifactLocation, RequestError, decode_request, is_envelope, redact
from studio_runner.units import format_duration, parse_duration, parse_size

EXAMPLES = Path(__file__).resolve().parents[1] / "data"


def example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())["body"]


def minimal(**experiment) -> dict:
    return {"experiment": {"key": "k1", **experiment}, "config": {}}


@pytest.mark.parametrize("name", ["studio_run_cli", "completion_service_task"])
def test_both_captured_client_messages_decode(name: str) -> None:
    body = example(name)
    request = decode_request(json.dumps(body).encode())
    assert request.key == body["experiment"]["key"]
    assert request.experiment.pythonver == "3.11"
    assert len(request.experiment.pythonenv) == len(body["experiment"]["pythonenv"])
    assert request.config.lifetime_seconds == 1800
    assert request.experiment.max_duration_seconds is None  # the client sends null
    assert request.experiment.resources_needed.ram_bytes == 2 * 10**9
    # unknown keys survive a decode/encode round trip (the client sends many the runner ignores)
    assert request.to_wire()["experiment"]["owner"] == "guest"
    assert decode_request(request.to_json()).to_wire() == request.to_wire()


def test_completion_service_artifacts_take_keys_from_the_requests_env() -> None:
    request = decode_request(example("completion_service_task"))
    credentials = request.aws_credentials("workspace")
    assert credentials is not None
    assert (credentials.access_key, credentials.secret_access_key) == ("studiotestkey", "studiotestsecret")
    assert credentials.region == "us-east-1"


def test_credentials_fall_back_from_artifact_to_env_to_storage_to_the_runner() -> None:
    artifact = {"qualified": "s3://h:1/b/k.tar"}
    body = minimal(
        filename="a.py",
        artifacts={"workspace": {**artifact, "credentials": {"aws": {"access_key": "A", "secret_key": "S"}}}},
    )  # the documented alias of secret_access_key
    assert decode_request(body).aws_credentials("workspace").secret_access_key == "S"
    body = minimal(filename="a.py", artifacts={"workspace": artifact})
    body["config"] = {"storage": {"credentials": {"aws": {"access_key": "SA", "secret_access_key": "SS"}}}}
    assert decode_request(body).aws_credentials("workspace").access_key == "SA"
    body["config"] = {}
    assert decode_request(body).aws_credentials("workspace") is None  # the runner's own chain


def test_counts_accept_numeric_strings_and_nulls_become_empty() -> None:
    body = minimal(
        args=None,
        pythonenv=None,
        artifacts=None,
        resources_needed={"gpus": "2", "gpuCount": "1", "cpus": 4.0},
    )
    request = decode_request(body)
    assert request.experiment.args == [] and request.experiment.pythonenv == []
    resources = request.experiment.resources_needed
    assert (resources.gpus, resources.gpu_count, resources.cpus, resources.cards) == (2, 1, 4, 1)


@pytest.mark.parametrize(
    ("resources", "cards"),
    [
        ({"gpus": 0}, 0),
        ({"gpus": 2}, 1),
        ({"gpus": 1, "gpuCount": 3}, 3),
        ({"gpuMem": "8GiB"}, 1),
        ({"gpuCount": 2}, 0),
    ],
)
def test_card_count(resources: dict, cards: int) -> None:
    assert decode_request(minimal(resources_needed=resources)).experiment.resources_needed.cards == cards


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b"{}", "no 'experiment'"),
        (json.dumps(minimal(key="")), "experiment key is empty"),
        (json.dumps({"experiment": {"key": "a/b"}}), "contains '/'"),
        (json.dumps(minimal(resources_needed={"ram": "lots"})), "invalid size"),
        (json.dumps(minimal(resources_needed={"cpus": -1})), "cpus"),
        (json.dumps(minimal(artifacts={"../x": {"qualified": "s3://h/b/k"}})), "not a plain name"),
        (
            json.dumps(minimal(filename="a.py", artifacts={"workspace": {"qualified": "ftp://h/b/k"}})),
            "unsupported",
        ),
        (json.dumps(minimal(artifacts={"data": {"qualified": "s3://h/b/k.tar"}})), "no 'workspace'"),
        (json.dumps(minimal(artifacts={"workspace": {"qualified": "s3://h/b/k.tar"}})), "no 'filename'"),
        (b"x" * (5 * 1024 * 1024), "byte limit"),
        (json.dumps({"message": {"payload": "a,b"}}), "encrypted envelope"),
    ],
)
def test_unrunnable_requests_are_refused_with_a_reason(body, reason: str) -> None:
    with pytest.raises(RequestError, match=reason):
        decode_request(body)


def test_envelope_detection() -> None:
    assert is_envelope({"message": {"payload": "x"}})
    assert not is_envelope({"message": "x"}) and not is_envelope(minimal())


def test_artifact_locations() -> None:
    location = ArtifactLocation.parse("s3://127.0.0.1:8333/bucket/blobstore/abc.tar")
    assert (location.host, location.bucket, location.key) == ("127.0.0.1:8333", "bucket", "blobstore/abc.tar")
    assert ArtifactLocation.parse("s3://h/b/k.tar", bucket="other").bucket == "other"
    assert ArtifactLocation.parse("file:///srv/data/x.tar").key == "/srv/data/x.tar"
    with pytest.raises(ValueError, match="no bucket and key"):
        ArtifactLocation.parse("s3://host/only-bucket")


def test_redaction_masks_credentials_and_url_passwords_but_keeps_the_rest() -> None:
    redacted = decode_request(example("studio_run_cli")).redacted()
    text = json.dumps(redacted)
    assert "studiotestsecret" not in text and "studiotestkey" not in text
    assert "amqp://guest:***@127.0.0.1" in text
    assert redacted["config"]["env"]["AWS_DEFAULT_REGION"] == "us-east-1"
    assert redact({"database": {"apiKey": "k", "projectId": "p"}}) == {
        "database": {"apiKey": "***", "projectId": "p"}
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("75s", 75), ("20m", 1200), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25), ("0", 0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1d", "m", "1h x"])
def test_go_durations_refuse_what_go_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("2g", 2 * 10**9), ("2gb", 2 * 10**9), ("16GiB", 16 * 2**30), ("512mb", 512 * 10**6), ("100", 100)],
)
def test_human_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_format_duration() -> None:
    assert format_duration(5400) == "1h30m" and format_duration(0) == "0s"


def test_time_limit_takes_the_tightest_and_names_it() -> None:
    body = minimal(max_duration="10m", time_added=1000.0)
    body["config"] = {"experimentLifetime": "30m"}
    request = decode_request(body)
    assert time_limit(request, now=1000.0).cause == "max_duration"
    assert time_limit(request, now=2500.0).cause == "lifetime"
    assert time_limit(request, now=3000.0).expired


def test_checkpoint_period_is_clamped_not_ignored() -> None:
    body = minimal()
    body["config"] = {"saveWorkspaceFrequency": "1m"}
    assert checkpoint_period(decode_request(body)) == 120  # upstream turned this into 600 minutes
