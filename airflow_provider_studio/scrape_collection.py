"""Finding, fetching and tabulating StudioML scrape documents in S3 (runner spec §5).

This is the work behind ``MetadataScrapeOperator``, kept free of Airflow imports so that the
benchmark and other tools run the very same code with any boto3 S3 client. Scrape files are
named by host and start time, not by experiment, so finding an experiment by key means reading
every ``metadata/scrape-host-*.json`` of the bucket; documents are therefore fetched by a thread
pool, and between polls only objects whose ETag changed are read again.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from studio_runner.metadata import SCRAPE_FILE_PREFIX, parse_scrape_file_name
from studio_runner.outcome import Status
from studio_runner.s3_uris import S3_SCHEMES, parse_qualified_s3_uri, parse_s3_uri, s3_uri
from studio_runner.summary import RunSummary

logger = logging.getLogger(__name__)

METADATA_FOLDER = "metadata/"
SCRAPE_PREFIX = METADATA_FOLDER + SCRAPE_FILE_PREFIX
DEFAULT_FIELDS: tuple[str, ...] = ("experiment.fitness",)
DEFAULT_MAX_WORKERS = 32
ROW_COLUMNS = ("key", "status", "exit_code", "attempts", "scrape_uri", "artifacts", "error")
"""Columns every row has; picked fields go between ``artifacts`` and ``error``."""

FINAL_STATUSES = frozenset({status.value for status in Status} | {"completed"})
"""Statuses an attempt ends with: ours, plus the ``completed`` of upstream's metadata docs."""

_FATAL_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "InvalidObjectState",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "403",
    }
)
"""S3 errors that waiting will not cure: such a key is reported at once instead of polled."""
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_KEY_HINT = re.compile(rb'"key"\s*:\s*"((?:[^"\\]|\\.){1,512})"')
_MAX_HINTS = 8


# --- S3 addresses ----------------------------------------------------------------------------


def bucket_name(bucket: str) -> str:
    """Accept ``name``, ``s3://name`` or ``s3://name/``; the metadata folder is at the root."""
    text = bucket.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme.lower() != "s3" or not parts.netloc or parts.path.strip("/"):
            raise ValueError(
                f"bucket {bucket!r} must be a bucket name or s3://name: scrape files live at the "
                "bucket root (metadata/), so a path cannot be given"
            )
        text = parts.netloc
    if not text or "/" in text:
        raise ValueError(f"bucket {bucket!r} is not a bucket name")
    return text


def scrape_location(uri: str) -> str:
    """The canonical ``s3://bucket/key`` (or ``file:///path``) of a summary's ``scrape_uri``.

    studio-runner reports StudioML's qualified form ``s3://HOST[:PORT]/BUCKET/KEY`` (runner spec
    §3.3), which a plain ``s3://bucket/key`` cannot always be told from by its look. Scrape files
    always sit at ``<bucket>/metadata/<name>``, which settles it; only when neither shape fits
    does an endpoint-looking host (a port, an IP, ``localhost``, ``amazonaws.com``) decide. The
    host is dropped: objects are read through the Airflow connection's endpoint.
    """
    if not isinstance(uri, str):
        raise ValueError(f"expected a URI string, got {type(uri).__name__} {uri!r}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not parts.path or parts.path.endswith("/"):
            raise ValueError(f"{uri!r} names no file")
        return f"file://{parts.path}"
    if scheme not in S3_SCHEMES or not parts.netloc:
        raise ValueError(f"{uri!r} is not an s3:// or file:// URI")
    segments = parts.path.lstrip("/").split("/")
    if len(segments) == 2 and segments[0] + "/" == METADATA_FOLDER:
        qualified = False
    elif len(segments) == 3 and segments[1] + "/" == METADATA_FOLDER:
        qualified = True
    else:
        host = parts.hostname or ""
        qualified = (
            parts.port is not None
            or host == "localhost"
            or host.endswith("amazonaws.com")
            or host.replace(".", "").isdigit()
        )
    if qualified:
        _, _, bucket, key = parse_qualified_s3_uri(uri, schemes=S3_SCHEMES)
        if not bucket or not key:
            raise ValueError(f"{uri!r} has an endpoint host but no bucket and key after it")
        return s3_uri(bucket, key)
    bucket, key = parse_s3_uri(uri)
    return s3_uri(bucket, key)


def scrape_document(summary: Mapping[str, Any]) -> str | None:
    """``s3://bucket/key`` (or ``file:///path``) of a runner summary's scrape document, None if none.

    A summary names the document's bucket and key (``RunSummary.scrape_bucket``/``scrape_key``);
    only one from a runner that predates them is read by its ``scrape_uri``'s shape.
    """
    bucket, key = summary.get("scrape_bucket"), summary.get("scrape_key")
    if isinstance(key, str) and key:
        return s3_uri(bucket, key) if isinstance(bucket, str) and bucket else f"file://{key}"
    uri = summary.get("scrape_uri")
    if not uri:
        return None
    try:
        return scrape_location(uri)
    except ValueError as error:
        raise ValueError(f"scrape_uri {error}") from None


# --- what was asked for ----------------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """One requested experiment: a key to look up, or a runner summary with its scrape URI."""

    key: str
    scrape_uri: str | None = None
    summary: RunSummary | None = None

    @property
    def document_key(self) -> str:
        """The key the scrape document belongs to: a reused result's (``reused_from``) is the
        original experiment's, while the row keeps the key of the task that reused it."""
        if self.summary is not None and self.summary.reused_from:
            return self.summary.reused_from
        return self.key


def wanted_from(experiments: Any) -> list[Wanted]:
    """Keys, runner summaries (``RunSummary``), or a mix, possibly nested one level.

    The XCom of mapped tasks arrives as a lazy sequence, and a list holding such an XComArg
    next to plain keys arrives nested, so one level of nesting is flattened. ``None`` entries
    (a mapped instance that returned nothing) are skipped. Everything wrong is refused at once.
    """
    if experiments is None:
        return []
    if isinstance(experiments, str):
        if experiments.lstrip().startswith(("[", "{")):
            raise ValueError(
                "experiments rendered to a string that looks like a list or a dict: pass the "
                "XComArg itself (e.g. experiments=run.output) or set render_template_as_native_obj=True "
                "on the DAG so that templates render to Python objects"
            )
        experiments = [experiments]
    if isinstance(experiments, Mapping):
        experiments = [experiments]
    wanted: list[Wanted] = []
    problems: list[str] = []
    for position, item in enumerate(_flatten(experiments)):
        if item is None:
            logger.warning("experiments[%d] is None (a mapped task with no result?); skipped", position)
            continue
        if isinstance(item, str):
            if item.strip():
                wanted.append(Wanted(key=item.strip()))
            else:
                problems.append(f"experiments[{position}] is an empty key")
        elif isinstance(item, Mapping):
            key = item.get("key")
            try:
                uri = scrape_document(item)
                summary = RunSummary.from_value(dict(item)) if "status" in item else None
            except ValueError as error:
                problems.append(f"experiments[{position}] (key {key!r}): {error}")
                continue
            if not uri and not (isinstance(key, str) and key):
                problems.append(
                    f"experiments[{position}] is a dict with neither a scrape_uri nor a key: {_clip(item)}"
                )
                continue
            wanted.append(Wanted(key=str(key or ""), scrape_uri=uri, summary=summary))
        else:
            problems.append(
                f"experiments[{position}] is a {type(item).__name__}; expected an experiment key "
                "(str) or a studio-runner summary (dict with scrape_uri)"
            )
    if problems:
        raise ValueError("experiments cannot be used:\n  " + "\n  ".join(problems))
    return wanted


def _flatten(items: Iterable[Any]) -> Iterator[Any]:
    for item in _each(items):
        if isinstance(item, (str, bytes, Mapping)) or item is None:
            yield item
        elif isinstance(item, Iterable):
            yield from _each(item)
        else:
            yield item


def _each(items: Iterable[Any]) -> Iterator[Any]:
    """Items by index where the container has a length: iterating Airflow's lazy XCom sequence
    fetches one entry past the end, which its client logs as an error in the task log."""
    if hasattr(items, "__len__") and hasattr(items, "__getitem__"):
        return (items[index] for index in range(len(items)))  # type: ignore[index]
    return iter(items)


def fields_from(fields: Any) -> tuple[str, ...]:
    """Dotted paths to pick; a string is a comma-separated list (what a template renders)."""
    if fields is None:
        return ()
    if isinstance(fields, str):
        fields = [part for part in fields.split(",")]
    result: list[str] = []
    for item in fields:
        if not isinstance(item, str) or not item.strip() or ".." in item:
            raise ValueError(f"field {item!r} is not a dotted path such as 'experiment.fitness'")
        name = item.strip()
        if name in ROW_COLUMNS:
            raise ValueError(
                f"field {name!r} would overwrite the row's own column of that name; "
                f"pick it by a longer path (e.g. 'studioml.{name}')"
            )
        if name not in result:
            result.append(name)
    return tuple(result)


def pick(document: Any, path: str) -> Any:
    """The value at a dotted path (list positions as numbers), or None where it does not exist."""
    node = document
    for part in path.split("."):
        if isinstance(node, Mapping):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


# --- one scrape document, slimmed ------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """What the table needs from one scrape document; the log and the rest are dropped at once.

    ``problem`` says why the document cannot be used (missing, unreadable, not JSON); ``fatal``
    marks problems that polling cannot cure. ``key_hints`` are experiment keys found in the raw
    bytes of a document that is not valid JSON, so that its experiment can still be told.
    """

    uri: str
    etag: str | None = None
    start_seconds: float | None = None
    key: str | None = None
    start_time: str | None = None
    stop_time: str | None = None
    status: str | None = None
    exit_code: Any = None
    artifacts: Mapping[str, Any] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None
    fatal: bool = False
    missing: bool = False
    key_hints: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def complete(self) -> bool:
        """Finished: a stop time, or a final status (spec §5.4 plus our runner's status)."""
        return self.problem is None and (bool(self.stop_time) or self.status in FINAL_STATUSES)

    def rank(self) -> tuple[int, float, str]:
        """Later attempts rank higher: start second from the file name, then start_time."""
        return (
            -1 if self.start_seconds is None else self.start_seconds,
            _timestamp(self.start_time),
            self.uri,
        )


def attempt_from_bytes(uri: str, body: bytes, etag: str | None, fields: Sequence[str]) -> Attempt:
    """Parse and slim one scrape document; never raises for bad content."""
    parsed = parse_scrape_file_name(uri)
    start_seconds = parsed[1] if parsed else None
    try:
        # NaN and Infinity are not JSON (Athena and XCom refuse them): they become null.
        document = json.loads(body, parse_constant=_no_constant)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        hints = tuple(dict.fromkeys(_key_hints(body)))[:_MAX_HINTS]
        return Attempt(
            uri=uri,
            etag=etag,
            start_seconds=start_seconds,
            problem=f"{uri} is not valid JSON: {_short(error)}",
            key_hints=hints,
        )
    studioml = document.get("studioml") if isinstance(document, dict) else None
    experiment = studioml.get("experiment") if isinstance(studioml, dict) else None
    key = experiment.get("key") if isinstance(experiment, dict) else None
    if not isinstance(key, str) or not key:
        what = "a JSON object" if isinstance(document, dict) else f"JSON {type(document).__name__}"
        return Attempt(
            uri=uri,
            etag=etag,
            start_seconds=start_seconds,
            problem=f"{uri} is {what} without studioml.experiment.key, not a scrape document",
        )
    artifacts = studioml.get("artifacts")
    status = studioml.get("status")
    return Attempt(
        uri=uri,
        etag=etag,
        start_seconds=start_seconds,
        key=key,
        start_time=_text(studioml.get("start_time")),
        stop_time=_text(studioml.get("stop_time")),
        status=status if isinstance(status, str) else None,
        exit_code=studioml.get("exit_code"),
        artifacts=dict(artifacts) if isinstance(artifacts, dict) else {},
        values={path: pick(document, path) for path in fields},
    )


def _key_hints(body: bytes) -> Iterator[str]:
    for match in _KEY_HINT.finditer(body[: 4 << 20]):
        try:
            yield json.loads(b'"' + match.group(1) + b'"')
        except ValueError:
            continue


def _no_constant(_: str) -> None:
    return None


def _timestamp(text: str | None) -> float:
    if not text:
        return float("-inf")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# --- the boto3 client ------------------------------------------------------------------------


def scrape_client(hook: Any, max_workers: int = DEFAULT_MAX_WORKERS) -> Any:
    """The hook's boto3 S3 client with a connection pool for every fetch worker and the lister.

    ``hook`` is an ``S3Hook`` (duck-typed to keep Airflow out of this module). Its connection's
    botocore config (``config_kwargs`` extra) is kept; only ``max_pool_connections`` is raised,
    since with botocore's default of 10 further threads would open and discard connections.
    """
    pool = Config(max_pool_connections=max(10, int(max_workers) + 1))
    return hook.get_client_type(config=hook.config.merge(pool))


# --- collection ------------------------------------------------------------------------------


@dataclass
class Problem:
    key: str
    reason: str


@dataclass
class Table:
    """The result: one row per requested experiment, in order, and the problems among them."""

    rows: list[dict[str, Any]]
    problems: list[Problem]
    listed: int = 0
    fetched: int = 0
    passes: int = 0
    seconds: float = 0.0

    def failure_message(self, limit: int = 50) -> str:
        lines = [f"- {problem.key or '(no key)'}: {problem.reason}" for problem in self.problems]
        if len(lines) > limit:
            lines = [*lines[:limit], f"... and {len(lines) - limit} more (all are in the task log)"]
        return (
            f"{len(self.problems)} of {len(self.rows)} experiments have no usable scrape document:\n"
            + "\n".join(lines)
        )


@dataclass
class _Outcome:
    """Where one requested experiment stands after a pass."""

    attempt: Attempt | None
    attempts: int | None
    error: str | None
    settled: bool


@dataclass
class _Listing:
    uris: list[str] = field(default_factory=list)
    error: str | None = None
    fatal: bool = False


class ScrapeCollector:
    """Reads scrape documents through one boto3 client and a thread pool, caching by ETag.

    Use as a context manager (the pool is shut down on exit). One collector may poll many
    times; each pass re-lists the metadata folders still needed and re-reads only objects that
    are new or whose ETag changed, and re-reads summary URIs with ``If-None-Match``.
    """

    def __init__(
        self,
        client: Any,
        *,
        fields: Sequence[str] = DEFAULT_FIELDS,
        max_workers: int = DEFAULT_MAX_WORKERS,
        prefix: str = SCRAPE_PREFIX,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        self.client = client
        self.fields = tuple(fields)
        self.prefix = prefix
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="scrape-fetch")
        self._cache: dict[str, Attempt] = {}
        self._listings: dict[str, _Listing] = {}
        self._lookup_bucket: str | None = None
        self._lock = threading.Lock()
        self.listed = 0
        self.fetched = 0

    def __enter__(self) -> ScrapeCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the whole job ------------------------------------------------------------------------
    def collect(
        self,
        wanted: Sequence[Wanted],
        *,
        bucket: str | None = None,
        wait: bool = False,
        timeout: float = 3600.0,
        poll_interval: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> Table:
        """One row per ``wanted`` entry; with ``wait``, poll until all are complete or ``timeout``."""
        started = clock()
        bucket = bucket_name(bucket) if bucket else None
        lookups = [item for item in wanted if item.scrape_uri is None]
        if lookups and bucket is None:
            keys = ", ".join(repr(item.key) for item in lookups[:5])
            more = f" and {len(lookups) - 5} more" if len(lookups) > 5 else ""
            raise ValueError(
                f"experiments {keys}{more} must be looked up by key, but no bucket was given: "
                "set bucket to the bucket whose metadata/ folder the runners write to"
            )
        deadline = started + timeout
        passes = 0
        outcomes: list[_Outcome] = []
        while True:
            passes += 1
            # Once every key lookup is settled, later passes need not list the bucket again.
            lookups_settled = bool(outcomes) and all(
                outcome.settled
                for item, outcome in zip(wanted, outcomes, strict=True)
                if item.scrape_uri is None
            )
            outcomes = self.collect_once(wanted, bucket=None if lookups_settled else bucket)
            if not wait or all(outcome.settled for outcome in outcomes):
                break
            remaining = deadline - clock()
            if remaining <= 0:
                break
            pending = sum(not outcome.settled for outcome in outcomes)
            logger.info(
                "%d of %d experiments not complete yet; next look in %.0fs",
                pending,
                len(outcomes),
                min(poll_interval, remaining),
            )
            sleep(min(poll_interval, remaining))
        waited = clock() - started
        rows: list[dict[str, Any]] = []
        problems: list[Problem] = []
        for item, outcome in zip(wanted, outcomes, strict=True):
            error = outcome.error
            attempt = outcome.attempt
            if error is None and wait and attempt is not None and not attempt.complete:
                error = (
                    f"latest attempt {attempt.uri} is still incomplete (no studioml.stop_time, "
                    f"status {attempt.status!r}) after waiting {waited:.0f}s"
                )
            if error is not None:
                problems.append(Problem(item.key or item.scrape_uri or "", error))
            rows.append(self._row(item, outcome, error))
        return Table(
            rows=rows,
            problems=problems,
            listed=self.listed,
            fetched=self.fetched,
            passes=passes,
            seconds=round(clock() - started, 3),
        )

    # -- one pass -----------------------------------------------------------------------------
    def collect_once(self, wanted: Sequence[Wanted], *, bucket: str | None) -> list[_Outcome]:
        """Fetch what is new or unfinished, then say where each requested experiment stands.

        ``bucket`` is listed when given; without it, key lookups are judged on the last listing.
        """
        futures: dict[str, Future[Attempt | None]] = {}
        for item in wanted:
            uri = item.scrape_uri
            if uri is None or uri in futures:
                continue
            known = self._cache.get(uri)
            if known is not None and (known.complete or (known.fatal and not known.missing)):
                continue  # a finished attempt never changes; a refusal is reported, not retried
            futures[uri] = self._pool.submit(self._fetch, uri, known.etag if known else None)
        if bucket is not None and any(item.scrape_uri is None for item in wanted):
            self._lookup_bucket = bucket
            self._list(bucket, futures)
        for uri, future in futures.items():
            attempt = future.result()
            if attempt is not None:
                self._cache[uri] = attempt
        index = self._index()
        return [self._outcome(item, index) for item in wanted]

    def _list(self, bucket: str, futures: dict[str, Future[Attempt | None]]) -> None:
        """List the bucket's scrape files page by page, starting fetches as each page arrives."""
        listing = _Listing()
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=self.prefix):
                for entry in page.get("Contents", ()):
                    uri = s3_uri(bucket, entry["Key"])
                    listing.uris.append(uri)
                    etag = entry.get("ETag")
                    known = self._cache.get(uri)
                    if uri in futures or (known is not None and known.etag == etag and etag):
                        continue
                    futures[uri] = self._pool.submit(self._fetch, uri, None)
        except ClientError as error:
            code, message = _client_error(error)
            listing.error = f"cannot list {s3_uri(bucket, METADATA_FOLDER)}: {code}: {message}"
            listing.fatal = code in _FATAL_CODES
        except (BotoCoreError, OSError) as error:
            listing.error = f"cannot list {s3_uri(bucket, METADATA_FOLDER)}: {_short(error)}"
        with self._lock:
            self.listed += len(listing.uris)
        if listing.error is not None and bucket in self._listings:
            # keep what an earlier pass saw; the error is still reported for unsettled keys
            listing.uris = self._listings[bucket].uris
        self._listings[bucket] = listing

    def _fetch(self, uri: str, etag: str | None) -> Attempt | None:
        """GET one document (None: unchanged since ``etag``); runs on the pool."""
        if uri.startswith("file://"):
            return self._read_file(uri, etag)
        bucket, key = parse_s3_uri(uri)
        request: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag:
            request["IfNoneMatch"] = etag
        try:
            response = self.client.get_object(**request)
            with response["Body"] as body:
                data = body.read()
        except ClientError as error:
            code, message = _client_error(error)
            if code in ("304", "NotModified"):
                return None
            if code in _MISSING_CODES:
                return Attempt(uri=uri, problem=f"{uri} does not exist", missing=True)
            return Attempt(
                uri=uri, problem=f"cannot read {uri}: {code}: {message}", fatal=code in _FATAL_CODES
            )
        except (BotoCoreError, OSError) as error:
            return Attempt(uri=uri, problem=f"cannot read {uri}: {_short(error)}")
        with self._lock:
            self.fetched += 1
        return attempt_from_bytes(uri, data, response.get("ETag"), self.fields)

    def _read_file(self, uri: str, etag: str | None) -> Attempt | None:
        """A scrape file the runner kept on local disk (the provider's ``local`` execution mode)."""
        path = Path(uri[len("file://") :])
        try:
            stat = path.stat()
            version = f"{stat.st_mtime_ns}-{stat.st_size}"
            if etag == version:
                return None
            data = path.read_bytes()
        except FileNotFoundError:
            return Attempt(uri=uri, problem=f"{uri} does not exist", missing=True)
        except OSError as error:
            return Attempt(uri=uri, problem=f"cannot read {uri}: {_short(error)}")
        with self._lock:
            self.fetched += 1
        return attempt_from_bytes(uri, data, version, self.fields)

    # -- deciding -----------------------------------------------------------------------------
    def _index(self) -> dict[str, dict[str, list[Attempt]]]:
        """bucket -> experiment key -> attempts listed there (unparsable ones under each hinted key)."""
        index: dict[str, dict[str, list[Attempt]]] = {}
        for bucket, listing in self._listings.items():
            by_key: dict[str, list[Attempt]] = defaultdict(list)
            for uri in listing.uris:
                attempt = self._cache.get(uri)
                if attempt is None:
                    continue
                if attempt.key is not None:
                    by_key[attempt.key].append(attempt)
                for hint in attempt.key_hints:
                    by_key[hint].append(attempt)
            index[bucket] = by_key
        return index

    def _outcome(self, item: Wanted, index: dict[str, dict[str, list[Attempt]]]) -> _Outcome:
        if item.scrape_uri is not None:
            return self._outcome_of_uri(item, index)
        bucket = self._lookup_bucket
        if bucket is None:
            return _Outcome(None, None, f"key {item.key!r} needs a bucket to be looked up in", settled=True)
        listing = self._listings.get(bucket, _Listing())
        candidates = index.get(bucket, {}).get(item.key, [])
        if not candidates:
            if listing.error is not None:
                return _Outcome(None, 0, listing.error, settled=listing.fatal)
            return _Outcome(None, 0, self._missing_reason(item.key, bucket), settled=False)
        latest = max(candidates, key=Attempt.rank)
        if latest.problem is not None:
            reason = f"latest attempt {latest.problem}" if len(candidates) > 1 else latest.problem
            return _Outcome(latest, len(candidates), reason, settled=latest.fatal)
        return _Outcome(latest, len(candidates), None, settled=latest.complete)

    def _outcome_of_uri(self, item: Wanted, index: dict[str, dict[str, list[Attempt]]]) -> _Outcome:
        uri = item.scrape_uri
        assert uri is not None
        attempt = self._cache[uri]
        uri_bucket = parse_s3_uri(uri)[0] if uri.startswith("s3://") else None
        attempts = None  # unknown unless that bucket's folder was listed anyway
        if uri_bucket in index:
            attempts = len(index[uri_bucket].get(item.document_key, [])) or None
        if attempt.missing:
            reason = f"scrape document {uri} for key {item.key!r} does not exist"
            return _Outcome(attempt, attempts, reason, settled=False)
        if attempt.problem is not None:
            return _Outcome(attempt, attempts, attempt.problem, settled=attempt.fatal)
        if item.document_key and attempt.key != item.document_key:
            reason = f"scrape document {uri} belongs to experiment {attempt.key!r}, not {item.document_key!r}"
            return _Outcome(attempt, attempts, reason, settled=True)
        return _Outcome(attempt, attempts, None, settled=attempt.complete)

    def _missing_reason(self, key: str, bucket: str) -> str:
        reason = f"no scrape document for key {key!r} under {s3_uri(bucket, METADATA_FOLDER)}"
        unreadable = [
            self._cache[uri]
            for uri in self._listings.get(bucket, _Listing()).uris
            if uri in self._cache and self._cache[uri].key is None and not self._cache[uri].key_hints
        ]
        if unreadable:
            names = ", ".join(attempt.name for attempt in unreadable[:3])
            more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
            reason += f" (that folder also holds {len(unreadable)} unreadable scrape files: {names}{more})"
        return reason

    def _row(self, item: Wanted, outcome: _Outcome, error: str | None) -> dict[str, Any]:
        attempt = outcome.attempt
        usable = (
            attempt if attempt is not None and attempt.problem is None and attempt.key is not None else None
        )
        summary = item.summary
        status: str | None
        if usable is not None:
            status = usable.status or ("completed" if usable.complete else "running")
        else:
            status = summary.status.value if summary is not None else None
        row: dict[str, Any] = {
            "key": item.key or (usable.key if usable else ""),
            "status": status,
            "exit_code": usable.exit_code
            if usable and usable.exit_code is not None
            else (summary.exit_code if summary is not None else None),
            "attempts": outcome.attempts,
            "scrape_uri": attempt.uri if attempt is not None else item.scrape_uri,
            "artifacts": dict(usable.artifacts)
            if usable and usable.artifacts
            else dict(summary.artifacts if summary is not None else {}),
        }
        for path in self.fields:
            row[path] = usable.values.get(path) if usable else None
        row["error"] = error
        return row


def _client_error(error: ClientError) -> tuple[str, str]:
    details = error.response.get("Error", {})
    code = str(details.get("Code") or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code, str(details.get("Message") or "")


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."
