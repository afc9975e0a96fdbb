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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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


def _merge_copying(target: dict[str, Any], key: str, new: Any) -> None:
    """``_merge_member`` unguarded, for a ``target`` this pass owns: every object it merges
    into is copied first, as the scraper's live document shares them."""
    if key not in target:
        target[key] = new
        return
    old = target[key]
    if isinstance(new, dict) and isinstance(old, dict):
        owned = target[key] = dict(old)
        for child_key, child in new.items():
            _merge_copying(owned, child_key, child)
    elif new is None and isinstance(old, dict):
        return
    else:
        target[key] = new


def _own_parents(document: dict[str, Any], parts: list[str], fresh: set[int]) -> None:
    """Copy the containers on the way to ``parts`` that this pass does not own yet (``fresh``)."""
    node: Any = document
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            key: Any = part
        elif isinstance(node, list) and _ARRAY_INDEX.fullmatch(part) and int(part) < len(node):
            key = int(part)
        else:
            return  # a missing parent: jsonpatch refuses the operation
        child = node[key]
        if not isinstance(child, (dict, list)):
            return
        if id(child) not in fresh:
            child = node[key] = copy.copy(child)
            fresh.add(id(child))
        node = child


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
    """Scrape the whole console log into ``metadata_dir/scrape-host-<accession>.json`` once.

    See ScrapeFile.write; an attempt that checkpoints keeps a ScrapeFile instead.
    """
    scrape_file = ScrapeFile(
        output_file, metadata_dir, accession, schema_logs=schema_logs, limits=limits, now=now
    )
    return scrape_file.write(before=before, after=after)


_BLOCK_BYTES = 1 << 20


class ScrapeFile:
    """One attempt's scrape file, regenerated at each checkpoint from what the console appended.

    A run of many hours would otherwise re-read its whole console at every checkpoint. This keeps
    the scraper's state and the byte offset of the first line not yet folded in, so a pass reads
    only the new output; the last pass gives the document a single scrape of the whole log gives.
    A checkpoint leaves a last line without its newline for the next pass (it may still grow);
    the final pass takes it. Plain lines are stamped with the time of the pass that first reads
    them, not re-stamped at every pass. Thread-safe: checkpoints run on their own thread.
    """

    def __init__(
        self,
        output_file: Path,
        metadata_dir: Path,
        accession: str,
        *,
        schema_logs: bool = True,
        limits: ScrapeLimits = DEFAULT_LIMITS,
        now: Callable[[], str] | None = None,
    ) -> None:
        self.output_file = output_file
        self.metadata_dir = metadata_dir
        self.accession = accession
        self.target = metadata_dir / scrape_file_name(accession)
        self._options = {"schema_logs": schema_logs, "now": now, "limits": limits}
        self._lock = threading.Lock()
        self._scraper: _Scraper | None = None
        self._before: str | None = None
        self._offset = 0
        self._skipping = False  # inside a line longer than max_line_length, not yet at its end
        self._rejected: ScrapeRejected | None = None

    def write(
        self, *, before: Sequence[Any] = (), after: Sequence[Any] = (), final: bool = True
    ) -> Path | None:
        """Write the document as one JSON line; return its path, or None when it was rejected.

        A rejected document leaves no file (a stale one is removed), as upstream left no scrape
        file for such a pass; a console line's rejection stands for every later pass. A missing
        console log counts as an empty one, so an attempt that failed before its workload
        started still records the facts.
        """
        try:
            document = self.document(before=before, after=after, final=final)
        except ScrapeRejected as rejected:
            logger.warning("no scrape file for %s this pass: %s", self.accession, rejected)
            self.target.unlink(missing_ok=True)
            return None
        text = json.dumps(document, sort_keys=True, allow_nan=False) + "\n"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed so that an upload never sees half a document.
        partial = self.metadata_dir / f".{self.target.name}.partial"
        try:
            partial.write_text(text, encoding="ascii")
            os.replace(partial, self.target)
        finally:
            partial.unlink(missing_ok=True)
        return self.target

    def document(
        self, *, before: Sequence[Any] = (), after: Sequence[Any] = (), final: bool = True
    ) -> dict[str, Any]:
        """This pass's document, after reading what the console appended; raises ScrapeRejected.

        ``before`` is applied once, ahead of the first line: when a pass brings other ``before``
        directives, or the console log has shrunk (replaced), the scrape starts over.
        """
        with self._lock:
            scraper = self._scraper
            key = _directives_key(before)
            if scraper is None or key is None or key != self._before or self._size() < self._offset:
                scraper = self._scraper = _Scraper(**self._options)  # type: ignore[arg-type]
                self._before, self._offset, self._skipping, self._rejected = key, 0, False, None
                try:
                    scraper.begin(before)
                except ScrapeRejected as rejected:
                    self._rejected = rejected
            if self._rejected is not None:
                raise self._rejected
            scraper.new_pass()
            try:
                self._read(scraper, final)
            except ScrapeRejected as rejected:
                self._rejected = rejected
                raise
            return scraper.finish(after)

    def _size(self) -> int:
        try:
            return self.output_file.stat().st_size
        except FileNotFoundError:
            return 0

    def _read(self, scraper: _Scraper, final: bool) -> None:
        """Fold the complete lines after the offset into ``scraper``, and on the final pass the tail."""
        limit = scraper.limits.max_line_length
        tail = b""  # the start of a line whose newline has not been read yet
        try:
            stream = self.output_file.open("rb")
        except FileNotFoundError:
            logger.info("console log %s is missing; scraping the runner's facts only", self.output_file)
            return
        with stream:
            stream.seek(self._offset)
            while block := stream.read(_BLOCK_BYTES):
                if self._skipping:
                    cut = block.find(b"\n")
                    if cut < 0:
                        self._offset += len(block)
                        continue
                    self._skipping = False
                    self._offset += cut + 1
                    scraper.feed(None)
                    block = block[cut + 1 :]
                data = tail + block if tail else block
                cut = data.rfind(b"\n")
                if cut >= 0:
                    _feed_bytes(scraper, data[:cut], limit)
                    self._offset += cut + 1
                    data = data[cut + 1 :]
                tail = data
                if len(tail) > limit:
                    self._skipping = True
                    self._offset += len(tail)
                    tail = b""
        if not final:
            return
        if self._skipping:
            self._skipping = False
            scraper.feed(None)
        elif tail:
            scraper.feed_lines([tail.decode("utf-8", errors="replace")])
            self._offset += len(tail)


def _directives_key(directives: Sequence[Any]) -> str | None:
    """Directives as canonical JSON, to tell whether a pass brings the same ones; None if not JSON."""
    try:
        return json.dumps(list(directives), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None


def _feed_bytes(scraper: _Scraper, chunk: bytes, limit: int) -> None:
    """Feed complete console lines (``chunk`` holds no final newline), split on ``\\n`` only.

    Decoded at once, invalid UTF-8 as U+FFFD: a newline byte ends any broken sequence, so each
    line reads as if decoded alone. A line over ``limit`` bytes counts as one too long.
    """
    lines = chunk.decode("utf-8", errors="replace").split("\n")
    if max(map(len, lines)) * 4 <= limit:  # no character takes more than 4 bytes
        scraper.feed_lines(lines)
        return
    batch: list[str] = []
    for raw, line in zip(chunk.split(b"\n"), lines, strict=True):
        if len(raw) <= limit:
            batch.append(line)
            continue
        scraper.feed_lines(batch)
        batch = []
        scraper.feed(None)
    scraper.feed_lines(batch)


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


class _StrictDecoder(json.JSONDecoder):
    """Strict JSON (NaN, Infinity and numbers that overflow a float are not JSON), one per scraper.

    It also counts how much longer ``json.dumps`` writes the floats of the last value than its
    text did (``1e5`` becomes ``100000.0``), for the size bound of ``_growth``.
    """

    def __init__(self) -> None:
        super().__init__(parse_float=self._float, parse_constant=_no_constant)
        self.float_growth = 0

    def _float(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text} is out of range")
        # Without an exponent and under 19 characters, repr is never longer than the text.
        if len(text) > 18 or "e" in text or "E" in text:
            self.float_growth += max(len(repr(value)) - len(text), 0)
        return value

    def value(self, line: str) -> Any:
        self.float_growth = 0
        return self.decode(line)


def _growth(line: str, value: Any, float_growth: int) -> int:
    """At least ``len(json.dumps(value))`` for ``value`` decoded from ``line``, without encoding it.

    For ASCII text, ``json.dumps`` writes no token longer than the line did except floats (counted
    by the decoder), and adds at most a space after each ``,`` and ``:`` not already followed by
    one (counting those inside strings too only over-counts).
    """
    if not line.isascii():
        return len(json.dumps(value))  # "\uXXXX" escapes: rare enough to encode
    return len(line) + line.count(",") - line.count(", ") + line.count(":") - line.count(": ") + float_growth


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
        self._decoder = _StrictDecoder()

    def new_pass(self) -> None:
        """Lines read from here on get this pass's time stamp (read when the first is logged)."""
        self._stamp = None

    # The runner's directives: trusted, §5.3 as written.

    def begin(self, before: Sequence[Any]) -> None:
        seed = {STUDIOML: {"log": [{"ts": "0", "msg": "Init"}, {"ts": "1", "msg": ""}]}}
        self._trusted(seed, "seed")
        for index, directive in enumerate(before, 1):
            self._trusted(directive, f"runner directive {index} (before)")
        self.size = len(json.dumps(self.document))
        self.depth = _nesting(self.document, 1 << 30)

    def finish(self, after: Sequence[Any]) -> dict[str, Any]:
        """The document with the drop counts and ``after``; the scraper's own state is left as it
        was (the containers ``after`` edits are copied first), so it can go on with more lines."""
        live = self.document
        self.document = dict(live)
        fresh = {id(self.document)}
        try:
            studioml = self.document.get(STUDIOML)
            if isinstance(studioml, dict):
                studioml = self.document[STUDIOML] = dict(studioml)
                fresh.add(id(studioml))
                studioml["dropped_lines"] = dict(sorted(self.dropped.items()))
            for index, directive in enumerate(after, 1):
                self._trusted(directive, f"runner directive {index} (after)", fresh=fresh)
            return self.document
        finally:
            self.document = live

    def _trusted(self, directive: Any, where: str, *, fresh: set[int] | None = None) -> None:
        """Apply a runner directive; with ``fresh`` (ids of containers this pass owns), copy
        every other container it would change before changing it."""
        try:
            value = json.loads(json.dumps(directive, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where} is not JSON: {error}") from None
        if isinstance(value, list):
            self._check_ops(value, where, guarded=False)
            self._apply_ops(value, where, guarded=False, fresh=fresh)
        elif isinstance(value, dict):
            for key, new in value.items():
                if fresh is None:
                    _merge_member(self.document, key, new, None)
                else:
                    _merge_copying(self.document, key, new)

    # Console lines: untrusted, append-only under /studioml, bounded.

    def feed_lines(self, lines: Iterable[str]) -> None:
        """``feed`` for lines no longer than ``max_line_length``: the hot loop of a scrape.

        Once the log is full, a plain line costs a strip and a count here.
        """
        schema_logs = self.schema_logs
        number = self.line
        quiet = self._quiet()
        skipped = 0
        for raw in lines:
            number += 1
            line = raw.strip()
            if len(line) <= 2:
                continue
            first = line[0]
            last = line[-1]
            if (first == "{" and last == "}") or (first == "[" and last == "]"):
                self.line = number
                self._console_directive(line)
            elif not schema_logs:
                continue
            elif quiet is not None:
                skipped += 1
                continue
            else:
                self.line = number
                self._console_log(line)
            now_quiet = self._quiet()
            if now_quiet != quiet:
                if skipped:
                    self.dropped[quiet] += skipped  # type: ignore[index]
                    skipped = 0
                quiet = now_quiet
        self.line = number
        if skipped:
            self.dropped[quiet] += skipped  # type: ignore[index]

    def _quiet(self) -> str | None:
        """Why a plain console line would be dropped now, or None while it would be logged."""
        if self.full:
            return "size_limit"
        if self.log_lines >= self.limits.max_log_lines:
            return "log_limit"
        return None

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
            value = self._decoder.value(line)
        except RecursionError:
            self.dropped["too_deep"] += 1
            return
        except ValueError:
            return  # JSON-looking but not JSON: ignored (spec §5.2)
        cap = self.limits.max_depth
        if isinstance(value, dict):
            # as many brackets as the document is deep already: the walk cannot change anything
            if line.count("{") + line.count("[") <= min(self.depth, cap):
                depth = self.depth
            else:
                depth = _nesting(value, cap)
            if depth > cap:
                self.dropped["too_deep"] += 1
                return
            if not self._fits(_growth(line, value, self._decoder.float_growth)):
                return
            try:
                for key, new in value.items():
                    _merge_member(self.document, key, new, "/studioml" if key == STUDIOML else None)
            except _AppendOnly as refused:
                raise self._append_only(refused, self._where()) from None
            self.depth = max(self.depth, depth)
        elif isinstance(value, list) and _is_patch(value):
            where = self._where()
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

    def _apply_ops(
        self, ops: list[dict[str, Any]], where: str, *, guarded: bool, fresh: set[int] | None = None
    ) -> None:
        for index, op in enumerate(ops, 1):
            if guarded and op["op"] == "add":
                self._guard_add(op["path"], where)
            if fresh is not None:
                for pointer in (op.get("path"), op.get("from") if op["op"] == "move" else None):
                    parts = _pointer_parts(pointer)
                    if parts:
                        _own_parents(self.document, parts, fresh)
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
