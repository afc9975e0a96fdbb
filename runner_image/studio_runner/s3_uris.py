"""S3 object addresses in the two forms that meet here.

Airflow and people write ``s3://bucket/key``. StudioML requests and runner summaries write the
qualified form ``s3://host[:port]/bucket/key`` (runner spec §3.3), because the host is all a
runner learns of the store. Reading both in one place keeps the provider and the runner agreeing
on where an object is.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

S3_SCHEMES = ("s3", "s3a", "s3n")
"""Schemes of a plain ``s3://bucket/key`` (the Hadoop spellings are the same store)."""
QUALIFIED_SCHEMES = ("s3", "http", "https")
"""Schemes of a qualified URI: StudioML clients also write the endpoint's own scheme."""


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; ValueError saying what is wrong otherwise.

    Everything after the bucket is the key, ``?`` and ``#`` included: S3 keys may hold them.
    """
    if not isinstance(uri, str):
        raise ValueError(f"expected an s3://bucket/key URI, got {type(uri).__name__} {uri!r}")
    parts = urlsplit(uri, allow_fragments=False)
    if parts.scheme.lower() not in S3_SCHEMES or not parts.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    key = parts.path.lstrip("/")
    if parts.query:
        key = f"{key}?{parts.query}"
    if not key:
        raise ValueError(f"{uri!r} names a bucket but no object")
    return parts.netloc, key


def qualified_s3_uri(host: str, bucket: str, key: str) -> str:
    """StudioML's ``s3://host[:port]/bucket/key``."""
    return f"s3://{host}/{bucket}/{key}"


def parse_qualified_s3_uri(
    uri: str, *, schemes: tuple[str, ...] = QUALIFIED_SCHEMES
) -> tuple[str, str, str, str]:
    """(scheme, host, bucket, key) of ``s3://host[:port]/bucket/key`` (or ``http(s)://``).

    Path segments are unquoted and empty ones dropped, as the StudioML client reads them; the
    bucket and key are empty when the path lacks them (a request may name them on their own).
    ValueError for a scheme not in ``schemes``.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ValueError(f"unsupported artifact URI scheme in {uri!r} (use s3:// or file://)")
    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    bucket = segments[0] if segments else ""
    return scheme, parts.netloc, bucket, "/".join(segments[1:])
