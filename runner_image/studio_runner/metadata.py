"""The ``_metadata`` scrape file: one JSON document per attempt, folded from its console (spec §5).

Workloads print JSON merge fragments and RFC 6902 patches on their console; downstream tools
(Athena tables over ``<bucket>/metadata/``, the Airflow provider) read the document this module
builds from them plus the runner's own facts about the attempt.

The console is untrusted, so where upstream had holes this module is stricter than §5: a console
line may only add to ``studioml`` (§5.4's audit trail: an ``add`` that overwrites, a move out of
it, a root replacement or a merge that changes a value there aborts the document, like §5.3's
``replace``); a JSON array that is not a list of operations, and a non-object merge fragment, are
data and ignored (upstream let them replace the whole document); and ScrapeLimits bounds size,
depth and line count.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import jsonpatch
from jsonpointer import JsonPointer, JsonPointerException

from .request import redact

logger = logging.getLogger(__name__)

BASE62_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SCRAPE_FILE_PREFIX = "scrape-host-"
SCRAPE_FILE_SUFFIX = ".json"
STUDIOML = "studioml"
LOG_POINTER = "/studioml/log/-"
RFC6902_OPS = frozenset({"add", "remove", "replace", "move", "copy", "test"})

_BASE62_VALUE = {digit: value for value, digit in enumerate(BASE62_ALPHABET)}
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_MAX_REASON = 300
_DOCUMENT_TAIL = re.compile(r" in [\[{].*\Z", re.DOTALL)  # jsonpointer quotes the whole document
_PATCH_ERRORS = (
    jsonpatch.JsonPatchException,
    JsonPointerException,
    KeyError,
    IndexError,
    TypeError,
    ValueError,
)


# --- names -----------------------------------------------------------------------------------


def base62(n: int) -> str:
    """Most significant digit first, no padding, so longer means later (upstream karlmutch/base62)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"base62 needs an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"base62 cannot encode a negative number ({n})")
    if n == 0:
        return BASE62_ALPHABET[0]
    digits = []
    while n:
        n, remainder = divmod(n, 62)
        digits.append(BASE62_ALPHABET[remainder])
    return "".join(reversed(digits))


def _base62_value(text: str) -> int | None:
    """The number a canonical base62 string encodes; None for anything ``base62`` never writes."""
    if not text or (len(text) > 1 and text[0] == BASE62_ALPHABET[0]):
        return None
    value = 0
    for digit in text:
        position = _BASE62_VALUE.get(digit)
        if position is None:
            return None
        value = value * 62 + position
    return value


ATTEMPT_SEPARATOR = "_"
"""Joins the host name and this process's attempt tag; RFC 952/1123 host names never contain it."""

_attempts_lock = threading.Lock()
_attempts_second = -1
_attempts_in_second = 0


def accession_id(host: str, started_at: float, *, tag: str | None = None) -> str:
    """``<host>-<base62 whole seconds>``: names an attempt in scrape files and reports (spec §4.9).

    The suffix is the start time in whole seconds, as §5.1 says, so tools that decode it read a
    date. Upstream's host part was the bare host name, so two attempts starting in the same
    second on one host (parallel ``run`` processes on an Airflow worker, a runner serving several
    queues) wrote one scrape file and one overwrote the other. The host part therefore carries
    ``tag`` (by default ``attempt_tag``: this process's id, plus an ordinal within the second)
    after ``_``; a decoder that splits at the last dash still reads host part and time.
    """
    if not host or "/" in host:
        raise ValueError(f"host {host!r} cannot name a scrape file (empty or contains '/')")
    seconds = int(started_at)
    if tag is None:
        tag = attempt_tag(seconds)
    if "/" in tag or "-" in tag:
        raise ValueError(f"attempt tag {tag!r} cannot name a scrape file (contains '/' or '-')")
    return f"{host}{ATTEMPT_SEPARATOR}{tag}-{base62(seconds)}" if tag else f"{host}-{base62(seconds)}"


def attempt_tag(second: int) -> str:
    """``<pid>`` for this process's first attempt in ``second``, ``<pid>.<n>`` for its n-th.

    Process ids tell processes on one host apart; the ordinal tells apart attempts one process
    starts in the same second (one per queue served).
    """
    global _attempts_second, _attempts_in_second
    with _attempts_lock:
        if second == _attempts_second:
            _attempts_in_second += 1
        else:
            _attempts_second, _attempts_in_second = second, 1
        ordinal = _attempts_in_second
    return str(os.getpid()) if ordinal == 1 else f"{os.getpid()}.{ordinal}"


def scrape_file_name(accession: str) -> str:
    """Re-generations of one attempt keep this name, so each upload overwrites the last (spec §5.1)."""
    if not accession or "/" in accession:
        raise ValueError(f"accession {accession!r} cannot name a scrape file (empty or contains '/')")
    return f"{SCRAPE_FILE_PREFIX}{accession}{SCRAPE_FILE_SUFFIX}"


_OLD_MICROSECOND_NAMES = 10**12
"""Suffixes this large were written in microseconds by earlier versions of this runner."""


def parse_scrape_file_name(name: str) -> tuple[str, float] | None:
    """(host, start time in seconds) from a scrape file name or an S3 key ending in one, else None.

    Hosts may contain dashes; the base62 suffix is after the last one. The host part is returned
    as written (with our ``_<tag>``). Earlier versions of this runner encoded microseconds; such
    suffixes (values of 10**12 and more, far past any date in seconds) are still read as such so
    that the Airflow side's "latest attempt" keeps comparing old files correctly.
    """
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith(SCRAPE_FILE_PREFIX) and base.endswith(SCRAPE_FILE_SUFFIX)):
        return None
    accession = base[len(SCRAPE_FILE_PREFIX) : len(base) - len(SCRAPE_FILE_SUFFIX)]
    host, dash, suffix = accession.rpartition("-")
    if not dash or not host:
        return None
    value = _base62_value(suffix)
    if value is None:
        return None
    return host, value / 1_000_000 if value >= _OLD_MICROSECOND_NAMES else float(value)


# --- timestamps ------------------------------------------------------------------------------


def iso_timestamp(seconds: float) -> str:
    """ISO 8601 UTC with microseconds and ``Z``: sorts as text and parses everywhere."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_now() -> str:
    """The scrape time stamped on wrapped console lines (upstream did the same, spec §5.2)."""
    return datetime.now(tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- the runner's own directives -------------------------------------------------------------


def log_patch(msg: str, ts: str) -> list[dict[str, Any]]:
    """The only edit of ``studioml.log`` the audit trail allows: append one entry."""
    return [{"op": "add", "path": LOG_POINTER, "value": {"ts": ts, "msg": msg}}]


@dataclass(frozen=True)
class RunnerFacts:
    """What the runner knows about one attempt, as the directives that put it in the document.

    ``before()`` goes ahead of the console lines (as the upstream job script printed these facts
    before running the workload); ``after()`` goes last, and sets ``stop_time``, ``status`` and
    ``exit_code`` with ``add`` so that nothing the workload printed can stand in for them.
    Times are Unix seconds. ``status`` and ``exit_code`` are ours, not upstream's (which wrote no
    status, §5.4): ``"running"`` and None at checkpoints, then the attempt's final status.
    """

    host: str
    key: str
    project: str = ""
    artifacts: Mapping[str, str] = field(default_factory=dict)
    load_time: float | None = None
    start_time: float | None = None
    stop_time: float | None = None
    status: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    """Why a final status that is not success came about (e.g. "queue rmq_x was deleted")."""

    def before(self) -> list[Any]:
        facts: dict[str, Any] = {
            "host": self.host,
            "experiment": {"key": self.key, "project": self.project},
        }
        if self.load_time is not None:
            facts["load_time"] = iso_timestamp(self.load_time)
        if self.artifacts:
            # Passwords inside URIs are masked; labels are names, not secrets.
            facts["artifacts"] = {label: redact(str(uri)) for label, uri in self.artifacts.items()}
        directives: list[Any] = []
        if self.start_time is not None:
            facts["start_time"] = iso_timestamp(self.start_time)
            directives.append(log_patch("Start", facts["start_time"]))
        return [{STUDIOML: facts}, *directives]

    def after(self) -> list[Any]:
        stop = iso_timestamp(self.stop_time) if self.stop_time is not None else None
        directives: list[Any] = []
        if stop is not None:
            directives.append(log_patch("Stop", stop))
        directives.append(
            [
                {"op": "add", "path": "/studioml/stop_time", "value": stop},
                {"op": "add", "path": "/studioml/status", "value": self.status},
                {"op": "add", "path": "/studioml/exit_code", "value": self.exit_code},
                *([{"op": "add", "path": "/studioml/reason", "value": self.reason}] if self.reason else []),
            ]
        )
        return directives


# --- merge -----------------------------------------------------------------------------------


def merge(document: dict[str, Any], fragment: Any) -> dict[str, Any]:
    """The upstream merge (spec §5.3), returned as a new document; the inputs are not modified.

    Objects merge recursively and any other new value replaces the old, except that a ``null``
    never deletes and leaves an existing object as it is (unlike RFC 7386). A fragment that is
    not an object is ignored: the document stays an object (upstream replaced it wholesale).
    """
    result = copy.deepcopy(document)
    if isinstance(fragment, dict):
        for key, value in copy.deepcopy(fragment).items():
            _merge_member(result, key, value, None)
    return result


class _AppendOnly(Exception):
    """A console merge would change or remove something already under ``/studioml``."""

    def __init__(self, pointer: str) -> None:
        super().__init__(pointer)
        self.pointer = pointer


def _merge_member(target: dict[str, Any], key: str, new: Any, protected: str | None) -> None:
    """Merge ``new`` into ``target[key]``; under a ``protected`` pointer only additions pass."""
    if key not in target:
        target[key] = new
        return
    old = target[key]
    if isinstance(new, dict) and isinstance(old, dict):
        for child_key, child in new.items():
            child_pointer = None if protected is None else f"{protected}/{_escape(child_key)}"
            _merge_member(old, child_key, child, child_pointer)
    elif new is None and isinstance(old, dict):
        return
    elif protected is None:
        target[key] = new
    elif new == old:
        return
    elif isinstance(new, list) and isinstance(old, list) and new[: len(old)] == old:
        old.extend(new[len(old) :])
    else:
        raise _AppendOnly(protected)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


# --- scraping --------------------------------------------------------------------------------


class ScrapeRejected(Exception):
    """A directive aborted the document: no scrape file for this pass (spec §5.3).

    ``where`` names the directive (``console line 12``, ``runner directive 1 (before)``), ``line``
    is the console line number or None, ``reason`` says why; neither quotes the line's content.
    """

    def __init__(self, where: str, reason: str, line: int | None = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.line = line


@dataclass(frozen=True)
class ScrapeLimits:
    """Bounds on what a console can put into a scrape file: a workload can print anything.

    Each drops whole lines, counted by reason in ``studioml.dropped_lines``: lines longer than
    ``max_line_length`` characters (bytes when read from a file), log lines after the first
    ``max_log_lines`` (directives still apply), directives nesting deeper than ``max_depth``, and
    every console line from the one that would take the document past ``max_document_bytes``
    (an estimate that only over-counts; the default stays under Athena's 32 MB row). Only single
    lines or the tail are dropped, so what is kept never changes as the log grows.
    """

    max_log_lines: int = 10_000
    max_line_length: int = 1 << 20
    max_document_bytes: int = 16 << 20
    max_depth: int = 64

    def __post_init__(self) -> None:
        for name in ("max_log_lines", "max_line_length", "max_document_bytes", "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScrapeLimits.{name} must be at least 1")


DEFAULT_LIMITS = ScrapeLimits()


def scrape(
    lines: Iterable[str],
    *,
    schema_logs: bool = True,
    now: Callable[[], str] | None = None,
    before: Sequence[Any] = (),
    after: Sequence[Any] = (),
    limits: ScrapeLimits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """The scrape document for console ``lines`` (spec §5.2-§5.4); raises ScrapeRejected.

    ``before`` and ``after`` are the runner's own directives (see RunnerFacts), applied around
    the console lines and trusted: they follow §5.3 as written (ValueError if one is not JSON),
    while console lines may only add to ``studioml`` and are subject to ``limits``.
    """
    scraper = _Scraper(schema_logs=schema_logs, now=now, limits=limits)
    scraper.begin(before)
    for line in lines:
        scraper.feed(line)
    return scraper.finish(after)


def write_scrape_file(
    output_file: Path,
    metadata_dir: Path,
    accession: str,
    *,
    before: Sequence[Any] = (),
    after: Sequence[Any] = (),
    schema_logs: bool = True,
    limits: ScrapeLimits = DEFAULT_LIMITS,
    now: Callable[[], str] | None = None,
) -> Path | None:
    """Scrape the console log into ``metadata_dir/scrape-host-<accession>.json``, one JSON line.

    Returns the path, or None when the scrape was rejected: then a stale file of that name is
    removed, as upstream left no scrape file for such a pass. A missing console log counts as an
    empty one, so an attempt that failed before its workload started still records the facts.
    """
    target = metadata_dir / scrape_file_name(accession)
    scraper = _Scraper(schema_logs=schema_logs, now=now, limits=limits)
    try:
        scraper.begin(before)
        try:
            with open(output_file, "rb") as stream:
                for line in _console_lines(stream, limits.max_line_length):
                    scraper.feed(line)
        except FileNotFoundError:
            logger.info("console log %s is missing; scraping the runner's facts only", output_file)
        document = scraper.finish(after)
    except ScrapeRejected as rejected:
        logger.warning("no scrape file for %s this pass: %s", accession, rejected)
        target.unlink(missing_ok=True)
        return None
    text = json.dumps(document, sort_keys=True, allow_nan=False) + "\n"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed so that an upload never sees half a document.
    partial = metadata_dir / f".{target.name}.partial"
    try:
        partial.write_text(text, encoding="ascii")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _console_lines(stream: BinaryIO, max_length: int) -> Iterator[str | None]:
    """Lines of a console log split on ``\\n`` only (as upstream), None for each overlong one.

    An overlong line is skipped without holding it in memory; invalid UTF-8 becomes U+FFFD.
    """
    while True:
        chunk = stream.readline(max_length + 1)
        if not chunk:
            return
        if chunk.endswith(b"\n"):
            yield chunk[:-1].decode("utf-8", errors="replace")
        elif len(chunk) <= max_length:
            yield chunk.decode("utf-8", errors="replace")
        else:
            while chunk and not chunk.endswith(b"\n"):
                chunk = stream.readline(1 << 20)
            yield None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _loads(line: str) -> Any:
    """Strict JSON: NaN, Infinity and numbers that overflow a float are not JSON."""
    return json.loads(line, parse_float=_finite_float, parse_constant=_no_constant)


def _nesting(value: Any, cap: int) -> int:
    """Depth of a JSON value (scalars 0), or a number over ``cap`` as soon as it is deeper."""
    if not isinstance(value, (dict, list)):
        return 0
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if level > deepest:
            deepest = level
            if deepest > cap:
                return deepest
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, level + 1))
    return deepest


def _pointer_parts(pointer: Any) -> list[str] | None:
    """Tokens of a JSON pointer, or None when it is not one (jsonpatch will then refuse it)."""
    if not isinstance(pointer, str):
        return None
    try:
        return JsonPointer(pointer).parts
    except JsonPointerException:
        return None


def _short(error: BaseException) -> str:
    text = _DOCUMENT_TAIL.sub("", str(error)) or type(error).__name__
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def _is_patch(value: list[Any]) -> bool:
    """A console array is a patch when every element is an operation; other arrays are data."""
    return all(isinstance(op, dict) and "op" in op for op in value)


class _Scraper:
    """Folds directives into the document one at a time, keeping the size and depth bounds."""

    def __init__(self, *, schema_logs: bool, now: Callable[[], str] | None, limits: ScrapeLimits) -> None:
        self.schema_logs = schema_logs
        self.limits = limits
        self._now = now or utc_now
        self._stamp: str | None = None
        self.document: dict[str, Any] = {}
        self.line = 0
        self.log_lines = 0
        self.dropped: Counter[str] = Counter()
        self.size = 0
        self.depth = 0
        self.full = False

    # The runner's directives: trusted, §5.3 as written.

    def begin(self, before: Sequence[Any]) -> None:
        seed = {STUDIOML: {"log": [{"ts": "0", "msg": "Init"}, {"ts": "1", "msg": ""}]}}
        self._trusted(seed, "seed")
        for index, directive in enumerate(before, 1):
            self._trusted(directive, f"runner directive {index} (before)")
        self.size = len(json.dumps(self.document))
        self.depth = _nesting(self.document, 1 << 30)

    def finish(self, after: Sequence[Any]) -> dict[str, Any]:
        if isinstance(self.document.get(STUDIOML), dict):
            dropped = dict(sorted(self.dropped.items()))
            self.document[STUDIOML]["dropped_lines"] = dropped
        for index, directive in enumerate(after, 1):
            self._trusted(directive, f"runner directive {index} (after)")
        return self.document

    def _trusted(self, directive: Any, where: str) -> None:
        try:
            value = json.loads(json.dumps(directive, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where} is not JSON: {error}") from None
        if isinstance(value, list):
            self._check_ops(value, where, guarded=False)
            self._apply_ops(value, where, guarded=False)
        elif isinstance(value, dict):
            for key, new in value.items():
                _merge_member(self.document, key, new, None)

    # Console lines: untrusted, append-only under /studioml, bounded.

    def feed(self, raw: str | None) -> None:
        """One console line; None stands for a line too long to read."""
        self.line += 1
        if raw is None or len(raw) > self.limits.max_line_length:
            self.dropped["too_long"] += 1
            return
        line = raw.strip()
        if len(line) <= 2:
            return
        if (line[0] == "{" and line[-1] == "}") or (line[0] == "[" and line[-1] == "]"):
            self._console_directive(line)
        elif self.schema_logs:
            self._console_log(line)

    def _console_log(self, line: str) -> None:
        if self.full:
            self.dropped["size_limit"] += 1
            return
        if self.log_lines >= self.limits.max_log_lines:
            self.dropped["log_limit"] += 1
            return
        if self._stamp is None:
            self._stamp = self._now()
        entry = {"ts": self._stamp, "msg": line}
        if not self._fits(len(json.dumps(entry)) + 2):  # and the ", " before it
            return
        studioml = self.document.get(STUDIOML)
        log = studioml.get("log") if isinstance(studioml, dict) else None
        if isinstance(log, list):
            log.append(entry)
        else:
            self._apply_ops(log_patch(line, self._stamp), self._where(), guarded=True)
        self.log_lines += 1

    def _console_directive(self, line: str) -> None:
        if self.full:
            self.dropped["size_limit"] += 1
            return
        try:
            value = _loads(line)
        except RecursionError:
            self.dropped["too_deep"] += 1
            return
        except ValueError:
            return  # JSON-looking but not JSON: ignored (spec §5.2)
        where = self._where()
        cap = self.limits.max_depth
        if isinstance(value, dict):
            depth = _nesting(value, cap)
            if depth > cap:
                self.dropped["too_deep"] += 1
                return
            if not self._fits(len(json.dumps(value))):
                return
            try:
                for key, new in value.items():
                    _merge_member(self.document, key, new, "/studioml" if key == STUDIOML else None)
            except _AppendOnly as refused:
                raise self._append_only(refused, where) from None
            self.depth = max(self.depth, depth)
        elif isinstance(value, list) and _is_patch(value):
            self._check_ops(value, where, guarded=True)
            depth = self._patch_depth(value, _nesting(value, cap + 2))
            if depth > cap:
                self.dropped["too_deep"] += 1
                return
            if not self._fits(self._patch_growth(value)):
                return
            self._apply_ops(value, where, guarded=True)
            self.depth = depth

    def _where(self) -> str:
        return f"console line {self.line}"

    def _append_only(self, refused: _AppendOnly, where: str) -> ScrapeRejected:
        return self._rejected(
            where,
            f"the merge would change {_clip(refused.pointer)}, and the studioml subtree is "
            "append-only (print new keys, or append to its arrays)",
        )

    def _fits(self, growth: int) -> bool:
        """Whether the document may grow by ``growth``; once it may not, the console is cut off."""
        if self.size + growth > self.limits.max_document_bytes:
            self.full = True
            self.dropped["size_limit"] += 1
            return False
        self.size += growth
        return True

    def _patch_depth(self, ops: list[dict[str, Any]], line_depth: int) -> int:
        """An upper bound of the document's depth after the patch, from the ops alone."""
        if line_depth > self.limits.max_depth + 2:
            return line_depth  # some value is too deep wherever it goes
        bound = self.depth
        value_depth = max(line_depth - 2, 0)  # the patch array and the operation object
        for op in ops:
            target = _pointer_parts(op.get("path"))
            if target is None:
                continue
            if op["op"] in ("add", "replace"):
                bound = max(bound, len(target) + value_depth)
            elif op["op"] in ("copy", "move"):
                source = _pointer_parts(op.get("from"))
                if source is not None:
                    bound = max(bound, len(target) + bound - len(source))
        return bound

    def _patch_growth(self, ops: list[dict[str, Any]]) -> int:
        """An upper bound of the bytes the patch adds; a copy may be as large as its source.

        An ``add`` adds at most its own text (which holds the key, the value and room for the
        separators); a move or copy adds a key name, and a copy its source as well.
        """
        growth = 0
        for op in ops:
            length = len(json.dumps(op.get("path"))) + 8
            if op["op"] in ("add", "replace"):
                growth += len(json.dumps(op))
            elif op["op"] == "move":
                growth += length
            elif op["op"] == "copy":
                source = op.get("from")
                source_size = self.size
                if isinstance(source, str) and source:
                    try:
                        source_size = len(json.dumps(JsonPointer(source).resolve(self.document)))
                    except (JsonPointerException, TypeError, ValueError):
                        source_size = self.size
                # Earlier operations of this patch may have grown the source by up to `growth`.
                growth += length + source_size + growth
        return growth

    def _check_ops(self, ops: list[Any], where: str, *, guarded: bool) -> None:
        """Refusals that need no document: §5.3's rule, and for the console, moves and the root."""
        for index, op in enumerate(ops, 1):
            if not isinstance(op, dict):
                raise self._rejected(where, f"operation {index} is not an object")
            name = op.get("op")
            path = op.get("path")
            if not isinstance(name, str) or name not in RFC6902_OPS:
                raise self._rejected(where, f"operation {index} has unknown op {_clip(name)}")
            if not isinstance(path, str):
                raise self._rejected(where, f"operation {index} ({name}) has no string 'path'")
            if name != "add" and path.lower().startswith("/studioml"):
                raise self._rejected(
                    where,
                    f"operation {name!r} is not permitted on {_clip(path)}: only 'add' may touch /studioml",
                )
            if not guarded:
                continue
            source = op.get("from")
            if name == "move" and isinstance(source, str) and source.lower().startswith("/studioml"):
                raise self._rejected(
                    where, f"operation 'move' from {_clip(source)} would remove it from /studioml"
                )
            if path == "" and name != "test":
                raise self._rejected(
                    where, f"operation {name!r} on the root would replace the whole document"
                )

    def _apply_ops(self, ops: list[dict[str, Any]], where: str, *, guarded: bool) -> None:
        for index, op in enumerate(ops, 1):
            if guarded and op["op"] == "add":
                self._guard_add(op["path"], where)
            try:
                result = jsonpatch.JsonPatch([op]).apply(self.document, in_place=True)
            except _PATCH_ERRORS as error:
                raise self._rejected(
                    where, f"operation {index} ({op['op']} {_clip(op['path'])}) failed: {_short(error)}"
                ) from None
            if not isinstance(result, dict):
                raise self._rejected(where, "the patch made the document something other than an object")
            self.document = result

    def _guard_add(self, path: str, where: str) -> None:
        """An ``add`` under /studioml may create a key or append, never overwrite or insert."""
        parts = _pointer_parts(path)
        if not parts or parts[0] != STUDIOML:
            return
        node: Any = self.document
        for part in parts[:-1]:
            if isinstance(node, list):
                raise self._rejected(
                    where, f"'add' at {_clip(path)} would change an existing entry of a /studioml array"
                )
            if not isinstance(node, dict) or part not in node:
                return  # jsonpatch refuses the missing parent
            node = node[part]
        last = parts[-1]
        if isinstance(node, dict) and last in node:
            raise self._rejected(where, f"'add' at {_clip(path)} would replace an existing /studioml value")
        if isinstance(node, list) and _ARRAY_INDEX.fullmatch(last) and int(last) < len(node):
            raise self._rejected(
                where, f"'add' at {_clip(path)} would insert before existing entries; append with '-'"
            )

    def _rejected(self, where: str, reason: str) -> ScrapeRejected:
        return ScrapeRejected(where, reason, self.line if where.startswith("console") else None)


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."
