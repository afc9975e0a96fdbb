"""The one reading of durations, AMQP URLs and S3 URIs that the runner and the provider share."""

from __future__ import annotations

from datetime import timedelta

import pytest
from studio_runner.amqp_urls import (
    amqp_url,
    management_api_url,
    management_url_for,
    with_password,
    without_userinfo,
)
from studio_runner.s3_uris import parse_qualified_s3_uri, parse_s3_uri, qualified_s3_uri, s3_uri
from studio_runner.units import is_seconds_number, parse_seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90", 90.0),
        (" 1.5 ", 1.5),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        (45, 45.0),
        (2.5, 2.5),
        (timedelta(minutes=3), 180.0),
        ("-5s", -5.0),  # bounds are the caller's
    ],
)
def test_seconds_from_numbers_text_go_durations_and_timedeltas(value, seconds: float) -> None:
    assert parse_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "", "5 minutes", "nan", "inf", float("inf"), True, None, [1]])
def test_what_is_no_duration_is_refused(value) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_seconds(value)


def test_plain_seconds_are_told_from_go_durations() -> None:
    assert is_seconds_number("90") and is_seconds_number(" 2.5")
    assert not is_seconds_number("90s") and not is_seconds_number("1h")


def test_amqp_urls_with_and_without_the_password() -> None:
    plain = amqp_url("mq.example", 5671, "research", "stu dio", secure=True)
    assert plain == "amqps://stu%20dio@mq.example:5671/research"
    full = amqp_url("mq.example", 5671, "research", "stu dio", "p@ss/word:", secure=True)
    assert full == "amqps://stu%20dio:p%40ss%2Fword%3A@mq.example:5671/research"
    assert with_password(plain, "p@ss/word:") == full
    assert with_password(full, "other") == "amqps://stu%20dio:other@mq.example:5671/research"
    assert without_userinfo(full) == "amqps://mq.example:5671/research"
    assert without_userinfo("http://mq:15672") == "http://mq:15672"
    assert amqp_url("::1", 5672, "/", "guest", "guest") == "amqp://guest:guest@[::1]:5672/%2F"
    with pytest.raises(ValueError, match="needs a user"):
        with_password("amqp://mq.example:5672/%2f", "secret")


def test_the_management_api_sits_beside_the_amqp_port() -> None:
    assert management_api_url("mq", 5672) == "http://mq:15672"
    assert management_api_url("::1", 5671, secure=True) == "https://[::1]:15671"
    assert management_url_for("amqp://u:p@host:5672/%2f") == "http://u:p@host:15672"
    assert management_url_for("amqps://u@host/vh") == "https://u@host:15671"


def test_plain_s3_uris() -> None:
    assert parse_s3_uri("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert parse_s3_uri("s3a://bucket/k?v=1#frag") == ("bucket", "k?v=1#frag")  # S3 keys may hold both
    assert s3_uri(*parse_s3_uri("s3://b/k")) == "s3://b/k"
    for bad, reason in [
        ("http://bucket/key", "not an s3://bucket/key URI"),
        ("s3:///key", "not an s3://bucket/key URI"),
        ("s3://bucket/", "no object"),
        (42, "expected an s3://bucket/key URI"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_s3_uri(bad)


def test_qualified_s3_uris_carry_the_endpoint_host() -> None:
    uri = qualified_s3_uri("127.0.0.1:8333", "bucket", "blobstore/abc.tar")
    assert uri == "s3://127.0.0.1:8333/bucket/blobstore/abc.tar"
    assert parse_qualified_s3_uri(uri) == ("s3", "127.0.0.1:8333", "bucket", "blobstore/abc.tar")
    assert parse_qualified_s3_uri("https://h//b/a%20b") == ("https", "h", "b", "a b")
    assert parse_qualified_s3_uri("s3://h/only-bucket")[2:] == ("only-bucket", "")
    with pytest.raises(ValueError, match="unsupported"):
        parse_qualified_s3_uri("s3a://h/b/k")
    assert parse_qualified_s3_uri("s3a://h/b/k", schemes=("s3a",))[1:] == ("h", "b", "k")
