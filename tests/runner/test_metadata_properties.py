"""Properties of the scraper and the merge for arbitrary console text and JSON directives.

``STUDIO_HYPOTHESIS_EXAMPLES`` sets the number of examples per property (default 300).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from studio_runner.metadata import (
    RunnerFacts,
    ScrapeFile,
    ScrapeLimits,
    ScrapeRejected,
    log_patch,
    merge,
    scrape,
    write_scrape_file,
)

EXAMPLES = int(os.environ.get("STUDIO_HYPOTHESIS_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STAMP = "scrape-time"
FACTS = RunnerFacts(
    host="runner-7d9f",
    key="1718031122_6b1f3c2e",
    project="orchard",
    artifacts={"output": "s3://minio:9000/bucket/output.tar"},
    load_time=1718031122.0,
    start_time=1718031130.0,
)
STOPPED = RunnerFacts(host="runner-7d9f", key="k", stop_time=1718031200.0, status="failed", exit_code=1)


def stamp() -> str:
    return STAMP


def pointer(parts: list[str]) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


# Hypothesis spends its time per draw, so names, pointers and tricky directives come from pools
# (one draw each) and 10,000 examples of the main property take seconds; text, keys and scalars
# stay arbitrary.
KEYS = ["studioml", "STUDIOML", "log", "experiment", "host", "x", "-", "0", "1", "", "a/b", "~"]
POINTERS = sorted(
    {pointer(list(parts)) for size in range(3) for parts in itertools.product(KEYS, repeat=size)}
    | {"/studioml/log/2", "/studioml/log/1/msg", "/studioml/log/0/new", "/studiomlx", "/~2", "no-slash"}
)
OPS = ["add", "add", "add", "remove", "replace", "move", "copy", "test", "append", "ADD"]
SHAPES = [
    [],
    {},
    [1, [2]],
    {"ts": "t", "msg": "m"},
    {"studioml": {}},
    {"log": []},
    {"log": [{"ts": "0", "msg": "Init"}]},
    [{"op": "add"}],
    {"host": None},
    {"experiment": {"key": "k"}},
]
CRAFTED = [
    {"studioml": None},
    {"studioml": {"log": None}},
    {"studioml": {"log": [{"ts": "0", "msg": "Init"}, {"ts": "1", "msg": ""}, {"ts": "t", "msg": "more"}]}},
    {"studioml": {"host": "runner-7d9f"}},
    {"studioml": {"host": "elsewhere", "new": 1}},
    {"studioml": {"experiment": {"project": None, "extra": [1]}}},
    {"studioml": []},
    {"experiment": {"a": {"b": None}}},
    [],
    [{"op": "add", "path": "/studioml/log/-", "value": {"ts": "t", "msg": "m"}}],
    [{"op": "add", "path": "/studioml/log/2", "value": 1}, {"op": "remove", "path": "/x"}],
    [{"op": "add", "path": "/x", "value": {"y": [1]}}, {"op": "copy", "from": "/x", "path": "/x/z"}],
    [{"op": "copy", "from": "", "path": "/copy"}],
    [{"op": "copy", "from": "/studioml", "path": "/copy"}],
    [{"op": "move", "from": "/studioml/log/0", "path": "/x"}],
    [{"op": "move", "from": "/experiment", "path": "/studioml/x"}],
    [{"op": "add", "path": "", "value": {}}],
    [{"op": "test", "path": "", "value": {}}],
    [{"op": "remove", "path": "/STUDIOML"}],
    [{"op": "add", "path": "/STUDIOML", "value": {"log": []}}],
    [{"op": "add", "path": "/studioml/log/0/msg", "value": "x"}],
    [{"name": "not an operation"}],
    [{"op": "add"}, 5],
]

keys = st.sampled_from(KEYS) | st.text(max_size=3)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
values = scalars | st.sampled_from(SHAPES)
fragments = st.dictionaries(keys, values | st.dictionaries(keys, values, max_size=2), max_size=2)


def operation(parts: tuple[str, str, Any, str, int]) -> dict[str, Any]:
    op, path, value, source, members = parts
    built: dict[str, Any] = {"op": op, "path": path}
    if members & 1:
        built["value"] = value
    if members & 2:
        built["from"] = source
    return built


pointers = st.sampled_from(POINTERS)
patches = st.lists(
    st.tuples(st.sampled_from(OPS), pointers, values, pointers, st.integers(0, 3)).map(operation), max_size=2
)
directives = fragments | patches | st.sampled_from(CRAFTED) | values
console_lines = st.one_of(
    st.text(max_size=40),
    directives.map(json.dumps),
    directives.map(lambda value: f" \t{json.dumps(value, separators=(',', ':'))}  "),
    st.text(max_size=8).map(lambda msg: json.dumps(log_patch(msg, "t"))),
)
# For the merge, fully recursive JSON: those examples are cheap enough.
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=8,
)
objects = st.dictionaries(keys, json_values, max_size=4)


def strict(value: Any) -> str:
    """JSON text that tells 1 from 1.0 from true."""
    return json.dumps(value, sort_keys=True)


def outcome(lines: list[str], before: Any = ()) -> dict[str, Any] | None:
    try:
        return scrape(lines, before=before, now=stamp)
    except ScrapeRejected:
        return None


def extends(old: Any, new: Any) -> bool:
    """Whether ``new`` holds everything ``old`` does: same values, objects with more keys,
    arrays with more entries after the same ones."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(
            key in new and extends(value, new[key]) for key, value in old.items()
        )
    if isinstance(old, list):
        return isinstance(new, list) and strict(new[: len(old)]) == strict(old)
    return strict(old) == strict(new)


def nesting(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


# The runner's own directives: whole lists from a pool (one draw) or free-form.
befores = st.sampled_from([[], FACTS.before(), *([c] for c in CRAFTED)]) | st.lists(directives, max_size=2)
afters = st.sampled_from([[], STOPPED.after(), *([c] for c in CRAFTED)]) | st.lists(directives, max_size=2)


@PROPERTY
@given(lines=st.lists(console_lines, max_size=6), before=befores, after=afters, schema_logs=st.booleans())
def test_scrape_returns_a_json_object_or_rejects(
    lines: list[str], before: list[Any], after: list[Any], schema_logs: bool
) -> None:
    try:
        document = scrape(lines, before=before, after=after, schema_logs=schema_logs, now=stamp)
    except ScrapeRejected as rejected:
        assert rejected.reason
        return
    assert isinstance(document, dict)
    assert json.loads(json.dumps(document, allow_nan=False)) == document


@PROPERTY
@given(
    lines=st.lists(console_lines, max_size=10),
    cut=st.integers(min_value=0, max_value=10),
    before=st.sampled_from([(), tuple(FACTS.before())]),
)
def test_later_lines_only_append_to_studioml(lines: list[str], cut: int, before: tuple[Any, ...]) -> None:
    earlier = outcome(lines[:cut], before)
    later = outcome(lines, before)
    if earlier is None:
        assert later is None, "a rejection is for good: later lines cannot undo it"
        return
    if later is None:
        return
    old_log, new_log = earlier["studioml"]["log"], later["studioml"]["log"]
    assert strict(new_log[: len(old_log)]) == strict(old_log)
    # dropped_lines is the scraper's own count, not something a line wrote
    old = {k: v for k, v in earlier["studioml"].items() if k != "dropped_lines"}
    assert extends(old, later["studioml"])


@PROPERTY
@given(document=objects, fragment=objects)
def test_merge_is_idempotent_for_objects(document: dict[str, Any], fragment: dict[str, Any]) -> None:
    once = merge(document, fragment)
    assert strict(merge(once, fragment)) == strict(once)


@PROPERTY
@given(document=objects, fragment=objects)
def test_merge_keeps_absent_keys_and_takes_new_values(
    document: dict[str, Any], fragment: dict[str, Any]
) -> None:
    before = strict(document), strict(fragment)
    result = merge(document, fragment)
    assert (strict(document), strict(fragment)) == before
    assert set(result) == set(document) | set(fragment)
    for key, value in fragment.items():
        if value is not None and not isinstance(value, dict):
            assert strict(result[key]) == strict(value)
        if value is None and isinstance(document.get(key), dict):
            assert strict(result[key]) == strict(document[key])


SMALL = ScrapeLimits(max_log_lines=3, max_line_length=60, max_document_bytes=1_500, max_depth=5)


@PROPERTY
@given(lines=st.lists(console_lines, max_size=12))
def test_limits_bound_the_document(lines: list[str]) -> None:
    try:
        document = scrape(lines, limits=SMALL, now=stamp)
    except ScrapeRejected:
        return
    # the estimate only over-counts; the drop counts are added after it
    assert len(json.dumps(document)) <= SMALL.max_document_bytes + 100
    assert sum(entry == {"ts": STAMP, "msg": entry.get("msg")} for entry in document["studioml"]["log"]) <= 3
    assert nesting(document) <= SMALL.max_depth


@settings(PROPERTY, max_examples=max(EXAMPLES // 3, 10))
@given(
    console=st.binary(max_size=300)
    | st.lists(console_lines, max_size=6).map(lambda ls: "\n".join(ls).encode())
)
def test_write_scrape_file_writes_one_json_line_or_nothing(console: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "output"
        output.write_bytes(console)
        path = write_scrape_file(output, Path(folder) / "_metadata", "runner-7d9f-1sGgNO", now=stamp)
        files = sorted((Path(folder) / "_metadata").glob("*")) if path else []
        if path is None:
            assert not (Path(folder) / "_metadata" / "scrape-host-runner-7d9f-1sGgNO.json").exists()
            return
        assert files == [path]
        text = path.read_text(encoding="ascii")
        assert text.endswith("\n") and text.count("\n") == 1
        assert isinstance(json.loads(text), dict)


# --- incremental passes ----------------------------------------------------------------------

# Console bytes: lines as workloads print them, raw bytes (broken UTF-8, \r, no final newline),
# and lines past a small max_line_length.
consoles = (
    st.lists(console_lines, max_size=8).map(lambda ls: "\n".join(ls).encode())
    | st.lists(console_lines, max_size=8).map(lambda ls: "".join(f"{line}\n" for line in ls).encode())
    | st.binary(max_size=200)
    | st.lists(
        st.sampled_from([b"x" * 70, b"\xc3\xa9" * 31, b'{"a": 1e5}', b"\n", b" \r\n"]), max_size=6
    ).map(b"".join)
)
limit_sets = st.sampled_from([ScrapeLimits(), SMALL])


def file_outcome(scrape_file: ScrapeFile, before: list[Any], after: list[Any], final: bool) -> str | None:
    try:
        return strict(scrape_file.document(before=before, after=after, final=final))
    except ScrapeRejected:
        return None


@PROPERTY
@given(
    console=consoles,
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=4),
    before=befores,
    checkpoint_afters=st.lists(afters, min_size=4, max_size=4),
    after=afters,
    limits=limit_sets,
    schema_logs=st.booleans(),
)
def test_checkpoints_then_a_final_pass_give_what_one_full_scrape_gives(
    console: bytes,
    cuts: list[int],
    before: list[Any],
    checkpoint_afters: list[list[Any]],
    after: list[Any],
    limits: ScrapeLimits,
    schema_logs: bool,
) -> None:
    """However the output arrives between passes (mid-line, mid-character), and whatever the
    checkpoints' own ``after`` directives did, the final document is the full scrape's."""
    options: dict[str, Any] = {"schema_logs": schema_logs, "limits": limits, "now": stamp}
    with tempfile.TemporaryDirectory() as folder:
        output, metadata = Path(folder) / "output", Path(folder) / "_metadata"
        incremental = ScrapeFile(output, metadata, "h-1", **options)
        written = 0
        for cut, checkpoint_after in zip(sorted(cuts), checkpoint_afters, strict=False):
            with output.open("ab") as stream:
                stream.write(console[written:cut])
            written = max(written, min(cut, len(console)))
            file_outcome(incremental, before, checkpoint_after, final=False)
        with output.open("ab") as stream:
            stream.write(console[written:])
        whole = file_outcome(ScrapeFile(output, metadata, "h-2", **options), before, after, final=True)
        assert file_outcome(incremental, before, after, final=True) == whole


@PROPERTY
@given(console=consoles, limits=limit_sets, schema_logs=st.booleans())
def test_the_file_reader_folds_the_lines_scrape_would(
    console: bytes, limits: ScrapeLimits, schema_logs: bool
) -> None:
    """Blocks decoded at once and fed in bulk give what decoding and feeding each line gives."""
    pieces = console.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    lines = [None if len(p) > limits.max_line_length else p.decode("utf-8", errors="replace") for p in pieces]
    try:
        expected = strict(scrape(lines, schema_logs=schema_logs, limits=limits, now=stamp))  # type: ignore[arg-type]
    except ScrapeRejected:
        expected = None
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "output"
        output.write_bytes(console)
        scrape_file = ScrapeFile(
            output, Path(folder), "h-1", schema_logs=schema_logs, limits=limits, now=stamp
        )
        assert file_outcome(scrape_file, [], [], final=True) == expected
