"""Metadata scraping (spec §5), ported from upstream's json_test.go and the §5 rules."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from studio_runner.metadata import (
    RunnerFacts,
    ScrapeLimits,
    ScrapeRejected,
    accession_id,
    base62,
    iso_timestamp,
    log_patch,
    merge,
    parse_scrape_file_name,
    scrape,
    scrape_file_name,
    utc_now,
    write_scrape_file,
)

SEED_LOG = [{"ts": "0", "msg": "Init"}, {"ts": "1", "msg": ""}]
FACTS = RunnerFacts(
    host="runner-7d9f",
    key="1718031122_6b1f3c2e",
    project="orchard",
    artifacts={"output": "s3://minio:9000/bucket/output.tar"},
    load_time=1718031122.25,
    start_time=1718031130.5,
)


def now() -> str:
    return "2024-06-10T15:00:00.000000Z"


def run(lines: list[str], **kwargs) -> dict:
    kwargs.setdefault("now", now)
    return scrape(lines, **kwargs)


def log_of(document: dict) -> list[dict]:
    return document["studioml"]["log"]


def messages(document: dict) -> list[str]:
    return [entry["msg"] for entry in log_of(document)]


def rejected(lines: list[str], **kwargs) -> ScrapeRejected:
    with pytest.raises(ScrapeRejected) as caught:
        run(lines, **kwargs)
    return caught.value


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0, "0"),
        (9, "9"),
        (10, "A"),
        (35, "Z"),
        (36, "a"),
        (61, "z"),
        (62, "10"),
        (3843, "zz"),
        (3844, "100"),
        (1718031122, "1sGgNO"),
    ],
)
def test_base62_known_values(number: int, text: str) -> None:
    assert base62(number) == text


def test_base62_refuses_negative_and_non_integers() -> None:
    with pytest.raises(ValueError):
        base62(-1)
    with pytest.raises(TypeError):
        base62(1.5)  # type: ignore[arg-type]


def test_base62_names_sort_chronologically_for_one_host() -> None:
    seconds = [1_500_000_000, 1_500_000_061, 1_718_031_122, 1_900_000_000]
    names = [scrape_file_name(accession_id("h", s, tag="7")) for s in seconds]
    assert names == sorted(names)


def test_the_suffix_is_the_start_time_in_whole_seconds_as_the_spec_says() -> None:
    """§5.1's own example: a decoder of the suffix reads the start second, not microseconds."""
    assert accession_id("runner-7d9f", 1718031122.0, tag="") == "runner-7d9f-1sGgNO"
    name = scrape_file_name(accession_id("runner-7d9f", 1718031122.9))
    suffix = name[: -len(".json")].rpartition("-")[2]
    assert suffix == "1sGgNO" and base62(1718031122) == suffix
    host, seconds = parse_scrape_file_name(name)
    assert seconds == 1718031122.0 and host.startswith("runner-7d9f_")


def test_attempts_in_one_second_on_one_host_get_distinct_names() -> None:
    """Same host, same second: this process's attempts and another process's all differ."""
    second = 1718031122
    here = [accession_id("runner-7d9f", second + f / 10) for f in range(5)]
    assert len(set(here)) == 5
    program = (
        f"from studio_runner.metadata import accession_id\nprint(accession_id('runner-7d9f', {second}.5))\n"
    )
    other = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    there = other.stdout.strip()
    assert there not in here
    names = [scrape_file_name(a) for a in [*here, there]]
    decoded = [parse_scrape_file_name(n) for n in names]
    assert {seconds for _host, seconds in decoded} == {float(second)}  # one second, decoded as seconds
    assert len({host for host, _seconds in decoded}) == 6  # told apart by the host part
    assert all(host.startswith("runner-7d9f_") for host, _seconds in decoded)


def test_a_later_second_sorts_later_for_the_same_host_part() -> None:
    earlier = scrape_file_name(accession_id("h", 1718031122.99, tag="42"))
    later = scrape_file_name(accession_id("h", 1718031123.0, tag="42"))
    assert earlier < later
    assert parse_scrape_file_name(earlier)[1] < parse_scrape_file_name(later)[1]


def test_upstream_whole_second_names_still_parse() -> None:
    assert parse_scrape_file_name("scrape-host-runner-7d9f-1sGgNO.json") == ("runner-7d9f", 1718031122.0)


def test_names_from_earlier_microsecond_versions_still_parse() -> None:
    name = f"scrape-host-runner-7d9f-{base62(1718031122250000)}.json"
    assert parse_scrape_file_name(name) == ("runner-7d9f", 1718031122.25)


@pytest.mark.parametrize("host", ["", "a/b"])
def test_accession_id_refuses_hosts_that_cannot_name_a_file(host: str) -> None:
    with pytest.raises(ValueError):
        accession_id(host, 1)


@pytest.mark.parametrize("tag", ["a-b", "a/b"])
def test_accession_id_refuses_tags_that_would_move_the_suffix(tag: str) -> None:
    with pytest.raises(ValueError):
        accession_id("h", 1, tag=tag)


def test_scrape_file_name_matches_the_spec_example() -> None:
    assert scrape_file_name("runner-7d9f-1sGgNO") == "scrape-host-runner-7d9f-1sGgNO.json"


@pytest.mark.parametrize("host", ["awsdev", "runner-7d9f", "studioml-go-runner-23ef-c9cb-k6nkk", "a-"])
@pytest.mark.parametrize("seconds", [1500000000.0, 1718031122.5, 1900000000.123456])
def test_scrape_file_name_round_trips_with_dashed_hosts(host: str, seconds: float) -> None:
    name = scrape_file_name(accession_id(host, seconds, tag="31"))
    expected = (f"{host}_31", float(int(seconds)))
    assert parse_scrape_file_name(name) == expected
    assert parse_scrape_file_name(f"metadata/{name}") == expected
    assert parse_scrape_file_name(f"s3://minio:9000/bucket/metadata/{name}") == expected


@pytest.mark.parametrize(
    "name",
    [
        "scrape-host-runner.json",  # no suffix after a dash
        "scrape-host--1sGgNO.json",  # empty host
        "scrape-host-runner-.json",
        "scrape-host-runner-1sG_NO.json",  # not base62
        "scrape-host-runner-01sGgNO.json",  # base62 is never padded
        "scrape-host-runner-1sGgNO.json.tmp",
        "output-host-runner-1sGgNO.log",
        "metadata/runner-1sGgNO.json",
        "",
    ],
)
def test_parse_scrape_file_name_refuses_other_names(name: str) -> None:
    assert parse_scrape_file_name(name) is None


def test_timestamps_are_utc_with_microseconds_and_z() -> None:
    assert iso_timestamp(1718031122.25) == "2024-06-10T14:52:02.250000Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", utc_now())


# --- merge (TestAJSONMergePatch) -------------------------------------------------------------


def test_merge_prefers_the_fragment_and_keeps_absent_keys() -> None:
    first = {"experiment": {"D": "d", "C": "c", "B": "b", "A": "a"}}
    second = {"experiment": {"A": 1, "E": 2}}
    assert merge(second, first) == {"experiment": {"A": "a", "B": "b", "C": "c", "D": "d", "E": 2}}
    assert merge(first, second) == {"experiment": {"A": 1, "B": "b", "C": "c", "D": "d", "E": 2}}


def test_merge_null_never_deletes() -> None:
    document = {"obj": {"keep": 1}, "scalar": "x", "list": [1]}
    result = merge(document, {"obj": None, "scalar": None, "list": None, "new": None})
    # null against an object keeps it; against anything else it is the new value
    assert result == {"obj": {"keep": 1}, "scalar": None, "list": None, "new": None}


def test_merge_non_objects_replace_whole() -> None:
    document = {"a": {"b": 1}, "c": [1, 2, 3], "d": 1}
    result = merge(document, {"a": [0], "c": [9], "d": {"e": None}})
    assert result == {"a": [0], "c": [9], "d": {"e": None}}


def test_merge_of_objects_is_recursive() -> None:
    document = {"a": {"b": {"c": 1, "d": 2}, "x": 0}}
    assert merge(document, {"a": {"b": {"c": 5, "e": 6}}}) == {"a": {"b": {"c": 5, "d": 2, "e": 6}, "x": 0}}


def test_merge_leaves_its_inputs_alone() -> None:
    document = {"a": {"b": 1}}
    fragment = {"a": {"c": [1]}}
    result = merge(document, fragment)
    result["a"]["c"].append(2)
    assert document == {"a": {"b": 1}}
    assert fragment == {"a": {"c": [1]}}


@pytest.mark.parametrize("fragment", [None, 5, "text", [1, 2], True])
def test_merge_ignores_fragments_that_are_not_objects(fragment: object) -> None:
    assert merge({"a": 1}, fragment) == {"a": 1}


# --- the editor (TestAJSONzEditor), as console lines -----------------------------------------

EDITOR_TABLE = [
    (
        '{"experiment": {"name": "testExpr", "max_run_length": 24, "run_length": 3.21}}',
        {"name": "testExpr", "max_run_length": 24, "run_length": 3.21},
    ),
    (
        '[{"op": "replace", "path": "/experiment/name", "value": "testExpr1"}]',
        {"name": "testExpr1", "max_run_length": 24, "run_length": 3.21},
    ),
    ('[{"op": "remove", "path": "/experiment/max_run_length"}]', {"name": "testExpr1", "run_length": 3.21}),
    (
        '[{"op": "add", "path": "/experiment/addition_1", "value": "additional data 1"}]',
        {"name": "testExpr1", "run_length": 3.21, "addition_1": "additional data 1"},
    ),
    (
        '{"experiment": {"addition_2": "additional data 2"}}',
        {
            "name": "testExpr1",
            "run_length": 3.21,
            "addition_1": "additional data 1",
            "addition_2": "additional data 2",
        },
    ),
    ('{"experiment": [{"name": "a"}, {"name":"b"}]}', [{"name": "a"}, {"name": "b"}]),
    (
        '[{"op": "add", "path": "/experiment/-", "value": {"name":"c"}}]',
        [{"name": "a"}, {"name": "b"}, {"name": "c"}],
    ),
    ('[{"op": "remove", "path": "/experiment"}]', None),
]


@pytest.mark.parametrize("count", range(1, len(EDITOR_TABLE) + 1))
def test_editor_table_applies_merges_and_patches_in_order(count: int) -> None:
    lines = [line for line, _ in EDITOR_TABLE[:count]]
    document = run(lines)
    expected = EDITOR_TABLE[count - 1][1]
    assert document.get("experiment") == expected
    assert set(document) == ({"studioml"} if expected is None else {"studioml", "experiment"})
    assert log_of(document) == SEED_LOG  # directives are not log lines


def test_multistep_first_pass_edits_then_removes_the_experiment() -> None:
    # upstream assets/multistep/metadata-test.py, first pass
    lines = [
        '{"experiment": {"name": "dummy pass"}}',
        '[{"op": "replace", "path": "/experiment/name", "value": "First pass"}]',
        '[{"op": "remove", "path": "/experiment"}]',
    ]
    assert "experiment" not in run(lines)
    second_pass = run(
        ['{"experiment": {"name": "dummy pass"}}', '{"experiment": {"name": "Zaphod Beeblebrox"}}']
    )
    assert second_pass["experiment"] == {"name": "Zaphod Beeblebrox"}


def test_merge_lines_follow_the_null_rules() -> None:
    document = run(['{"experiment": {"a": {"b": 1}, "c": 2}}', '{"experiment": {"a": null, "c": null}}'])
    assert document["experiment"] == {"a": {"b": 1}, "c": None}


def test_patch_test_move_and_copy_work_on_user_keys() -> None:
    document = run(
        [
            '{"experiment": {"name": "x", "stats": {"loss": 1}}}',
            '[{"op": "test", "path": "/experiment/name", "value": "x"},'
            ' {"op": "copy", "from": "/experiment/stats", "path": "/best"},'
            ' {"op": "move", "from": "/experiment/name", "path": "/experiment/title"}]',
        ]
    )
    assert document["experiment"] == {"title": "x", "stats": {"loss": 1}}
    assert document["best"] == {"loss": 1}


def test_patch_may_copy_from_studioml() -> None:
    document = run(['[{"op": "copy", "from": "/studioml/host", "path": "/where"}]'], before=FACTS.before())
    assert document["where"] == "runner-7d9f"


# --- aborting the document -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        '[{"op": "remove", "path": "/studioml/log/0"}]',
        '[{"op": "replace", "path": "/studioml/host", "value": "x"}]',
        '[{"op": "remove", "path": "/studioml/name/c"}]',
        '[{"op": "replace", "path": "/studioml/name/c", "value": "x"}]',
        '[{"op": "move", "from": "/experiment", "path": "/studioml/experiment2"}]',
        '[{"op": "copy", "from": "/experiment", "path": "/studioml/copy"}]',
        '[{"op": "test", "path": "/studioml/host", "value": "runner-7d9f"}]',
        '[{"op": "remove", "path": "/studioml"}]',
        '[{"op": "remove", "path": "/STUDIOML/log"}]',
        '[{"op": "replace", "path": "/StudioML", "value": {}}]',
        '[{"op": "remove", "path": "/studiomlish"}]',  # upstream's check is a plain prefix
    ],
)
def test_non_add_operations_on_studioml_abort_the_document(line: str) -> None:
    error = rejected(["hello", '{"experiment": {"a": 1}}', line], before=FACTS.before())
    assert error.line == 3
    assert "only 'add' may touch /studioml" in error.reason
    assert str(error).startswith("console line 3: ")


def test_the_studioml_rule_is_checked_before_any_operation_applies() -> None:
    error = rejected(['[{"op": "add", "path": "/a", "value": 1}, {"op": "remove", "path": "/studioml/log"}]'])
    assert "only 'add'" in error.reason


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('[{"op": "remove", "path": "/missing"}]', "failed"),
        ('[{"op": "replace", "path": "/missing", "value": 1}]', "failed"),
        ('[{"op": "add", "path": "/missing/deeper", "value": 1}]', "failed"),
        ('[{"op": "test", "path": "/experiment", "value": 2}]', "failed"),
        ('[{"op": "add", "path": "/x"}]', "failed"),  # no value
        ('[{"op": "add", "path": "no-slash", "value": 1}]', "failed"),
        ('[{"op": "move", "from": "/nowhere", "path": "/x"}]', "failed"),
        ('[{"op": "append", "path": "/x", "value": "y"}]', "unknown op"),
        ('[{"op": 7, "path": "/x"}]', "unknown op"),
        ('[{"op": "add", "value": 1}]', "no string 'path'"),
    ],
)
def test_a_patch_that_cannot_apply_aborts_the_document(line: str, why: str) -> None:
    error = rejected(['{"experiment": 1}', line])
    assert error.line == 2
    assert why in error.reason


def test_adding_to_the_studioml_log_is_accepted() -> None:
    entry = {"ts": "2024-06-10T15:00:01Z", "msg": "epoch 1"}
    document = run([json.dumps(log_patch(entry["msg"], entry["ts"]))], before=FACTS.before())
    assert log_of(document)[-1] == entry


def test_adding_new_studioml_keys_is_accepted() -> None:
    document = run(
        [
            '[{"op": "add", "path": "/studioml/pipdeptree", "value": []}]',
            '[{"op": "add", "path": "/studioml/pipdeptree/-", "value": {"package": "numpy"}}]',
            '[{"op": "add", "path": "/studioml/pipdeptree/1", "value": {"package": "scipy"}}]',
            '{"studioml": {"notes": {"a": 1}}}',
            '{"studioml": {"notes": {"b": 2}, "host": "runner-7d9f"}}',  # same value: no change
            '{"studioml": null}',
            '{"studioml": {"experiment": null}}',
            '[{"op": "add", "path": "/STUDIOML", "value": {"free": "form"}}]',  # another key
        ],
        before=FACTS.before(),
    )
    assert document["studioml"]["pipdeptree"] == [{"package": "numpy"}, {"package": "scipy"}]
    assert document["studioml"]["notes"] == {"a": 1, "b": 2}
    assert document["studioml"]["experiment"] == {"key": "1718031122_6b1f3c2e", "project": "orchard"}
    assert document["STUDIOML"] == {"free": "form"}


def test_a_merge_may_extend_a_studioml_array_but_not_rewrite_it() -> None:
    extended = {"studioml": {"log": [*SEED_LOG, {"ts": "t", "msg": "m"}]}}
    assert messages(run([json.dumps(extended)])) == ["Init", "", "m"]
    rewritten = {"studioml": {"log": [{"ts": "t", "msg": "m"}]}}
    assert "append-only" in rejected([json.dumps(rewritten)]).reason


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"studioml": {"host": "elsewhere"}}', "the merge would change '/studioml/host'"),
        ('{"studioml": {"log": []}}', "the merge would change '/studioml/log'"),
        ('{"studioml": {"log": null}}', "the merge would change '/studioml/log'"),
        ('{"studioml": {"experiment": {"key": "forged"}}}', "'/studioml/experiment/key'"),
        ('{"studioml": "gone"}', "the merge would change '/studioml'"),
        ('{"studioml": [{"name": "a"}]}', "the merge would change '/studioml'"),
        ('[{"op": "add", "path": "/studioml", "value": {}}]', "would replace an existing /studioml value"),
        ('[{"op": "add", "path": "/studioml/host", "value": "x"}]', "would replace an existing"),
        ('[{"op": "add", "path": "/studioml/log", "value": []}]', "would replace an existing"),
        ('[{"op": "add", "path": "/studioml/log/0", "value": {}}]', "would insert before existing"),
        (
            '[{"op": "add", "path": "/studioml/log/1/msg", "value": "x"}]',
            "existing entry of a /studioml array",
        ),
        (
            '[{"op": "add", "path": "/studioml/log/0/new", "value": "x"}]',
            "existing entry of a /studioml array",
        ),
        ('[{"op": "move", "from": "/studioml/host", "path": "/stolen"}]', "would remove it from /studioml"),
        ('[{"op": "move", "from": "/STUDIOML/x", "path": "/y"}]', "would remove it from /studioml"),
        ('[{"op": "add", "path": "", "value": {}}]', "would replace the whole document"),
        ('[{"op": "replace", "path": "", "value": {"studioml": {}}}]', "would replace the whole document"),
        ('[{"op": "copy", "from": "/experiment", "path": ""}]', "would replace the whole document"),
    ],
)
def test_console_lines_cannot_change_what_studioml_holds(line: str, why: str) -> None:
    # §5.4: the studioml subtree is an audit trail; an `add` that overwrites or a merge that
    # replaces is a `replace` in disguise, so it aborts the document as §5.3 does for replace.
    error = rejected(['{"experiment": {}}', line], before=FACTS.before())
    assert why in error.reason
    assert error.line == 2


def test_appending_at_the_end_index_is_accepted() -> None:
    document = run(['[{"op": "add", "path": "/studioml/log/2", "value": {"ts": "t", "msg": "at end"}}]'])
    assert messages(document) == ["Init", "", "at end"]


def test_rejection_names_the_line_not_its_content() -> None:
    error = rejected(["password=hunter2", '[{"op": "remove", "path": "/studioml/log"}]'])
    assert "hunter2" not in str(error)
    assert error.where == "console line 2"
    error = rejected(['{"token": "hunter2"}', '[{"op": "add", "path": "/missing/x", "value": 1}]'])
    assert "hunter2" not in str(error)
    assert "'missing' not found" in error.reason


def test_runner_directives_follow_the_spec_rule_too() -> None:
    with pytest.raises(ScrapeRejected) as caught:
        scrape([], before=[[{"op": "remove", "path": "/studioml/log"}]])
    assert caught.value.where == "runner directive 1 (before)"
    assert caught.value.line is None


def test_runner_directives_may_overwrite_studioml() -> None:
    document = scrape([], before=[{"studioml": {"host": "a"}}, {"studioml": {"host": "b"}}])
    assert document["studioml"]["host"] == "b"


def test_runner_directives_must_be_json() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        scrape([], before=[{"x": float("nan")}])


# --- lines -----------------------------------------------------------------------------------


def test_the_document_is_seeded_with_the_init_log() -> None:
    assert scrape([]) == {"studioml": {"log": SEED_LOG, "dropped_lines": {}}}


def test_plain_lines_become_log_entries_stamped_with_scrape_time() -> None:
    document = run(["  Epoch 1/10 \t", "loss: 0.25", "\u00e9t\u00e9 \u2713"])
    assert log_of(document)[2:] == [
        {"ts": now(), "msg": "Epoch 1/10"},
        {"ts": "2024-06-10T15:00:00.000000Z", "msg": "loss: 0.25"},
        {"ts": now(), "msg": "\u00e9t\u00e9 \u2713"},
    ]


def test_the_clock_is_read_once_per_scrape() -> None:
    calls = []

    def clock() -> str:
        calls.append(1)
        return f"t{len(calls)}"

    document = scrape(["one", "two", "three"], now=clock)
    assert [entry["ts"] for entry in log_of(document)[2:]] == ["t1", "t1", "t1"]


@pytest.mark.parametrize("line", ["", " ", "ok", "  a ", "{}", "[]", "\t[] ", "\n", "ab\n"])
def test_lines_of_two_characters_or_fewer_are_ignored(line: str) -> None:
    assert log_of(run([line])) == SEED_LOG


def test_three_characters_are_a_line() -> None:
    assert messages(run(["abc"]))[-1] == "abc"


def test_only_bracketed_lines_are_json_candidates() -> None:
    assert messages(run(['{"a": 1', '"a": 1}', "[1, 2"]))[2:] == ['{"a": 1', '"a": 1}', "[1, 2"]


@pytest.mark.parametrize(
    "line",
    [
        "[INFO] model saved [ok]",
        "{not json}",
        '{"a": 1}}',
        "[1, 2,]",
        '{"a": NaN}',
        '{"a": Infinity}',
        '{"a": 1e999}',
        "[-Infinity]",
        "{'single': 'quotes'}",
    ],
)
def test_json_looking_lines_that_do_not_parse_are_ignored(line: str) -> None:
    document = run([line])
    assert log_of(document) == SEED_LOG
    assert set(document) == {"studioml"}


@pytest.mark.parametrize("line", ["[1, 2, 3]", '["a", "b"]', '[{"name": "x"}]', '[{"op": "add"}, 5]'])
def test_json_arrays_that_are_not_patches_are_data_and_ignored(line: str) -> None:
    # upstream replaced the whole document with such an array (or aborted it)
    assert run([line]) == run([])


def test_schema_logs_off_keeps_only_directives() -> None:
    lines = ["plain text", '{"experiment": {"a": 1}}', "[x] looks like [json]"]
    document = run(lines, schema_logs=False)
    assert log_of(document) == SEED_LOG
    assert document["experiment"] == {"a": 1}
    assert messages(run(lines, schema_logs=True))[2:] == ["plain text"]


def test_lines_are_logged_verbatim_even_when_they_look_like_pointers() -> None:
    text = 'value with "quotes", \\backslashes\\ and /studioml/log'
    assert messages(run([text]))[-1] == text


# --- the runner's facts ----------------------------------------------------------------------


def test_runner_facts_fill_the_documented_layout() -> None:
    finished = FACTS.__class__(
        **{**FACTS.__dict__, "stop_time": 1718031200.0, "status": "completed", "exit_code": 0}
    )
    document = run(
        ["training", '{"experiment": {"score": 0.9}}'], before=finished.before(), after=finished.after()
    )
    studioml = document["studioml"]
    assert studioml["host"] == "runner-7d9f"
    assert studioml["experiment"] == {"key": "1718031122_6b1f3c2e", "project": "orchard"}
    assert studioml["artifacts"] == {"output": "s3://minio:9000/bucket/output.tar"}
    assert studioml["load_time"] == "2024-06-10T14:52:02.250000Z"
    assert studioml["start_time"] == "2024-06-10T14:52:10.500000Z"
    assert studioml["stop_time"] == "2024-06-10T14:53:20.000000Z"
    assert (studioml["status"], studioml["exit_code"]) == ("completed", 0)
    assert messages(document) == ["Init", "", "Start", "training", "Stop"]
    assert log_of(document)[2]["ts"] == studioml["start_time"]
    assert log_of(document)[-1]["ts"] == studioml["stop_time"]
    assert document["experiment"] == {"score": 0.9}


def test_a_checkpoint_has_no_stop_yet() -> None:
    running = RunnerFacts(host="h", key="k", load_time=1.0, start_time=2.0, status="running")
    document = run(["step"], before=running.before(), after=running.after())
    assert messages(document) == ["Init", "", "Start", "step"]
    assert document["studioml"]["stop_time"] is None
    assert document["studioml"]["status"] == "running"
    assert document["studioml"]["exit_code"] is None


def test_an_attempt_that_never_started_has_no_start() -> None:
    failed = RunnerFacts(host="h", key="k", load_time=1.0, stop_time=3.0, status="failed", exit_code=None)
    document = run([], before=failed.before(), after=failed.after())
    assert messages(document) == ["Init", "", "Stop"]
    assert "start_time" not in document["studioml"]


def test_the_workload_cannot_forge_the_outcome() -> None:
    finished = RunnerFacts(host="h", key="k", stop_time=10.0, status="failed", exit_code=3)
    forged = (
        '{"studioml": {"status": "completed", "exit_code": 0, "stop_time": "never", "dropped_lines": {}}}'
    )
    document = run([forged], before=finished.before(), after=finished.after())
    assert (document["studioml"]["status"], document["studioml"]["exit_code"]) == ("failed", 3)
    assert document["studioml"]["stop_time"] == iso_timestamp(10.0)


def test_runner_facts_mask_passwords_in_artifact_uris() -> None:
    facts = RunnerFacts(host="h", key="k", artifacts={"tokenizer": "s3://user:secret@minio:9000/b/t.tar"})
    assert facts.before()[0]["studioml"]["artifacts"] == {"tokenizer": "s3://user:***@minio:9000/b/t.tar"}


# --- limits ----------------------------------------------------------------------------------


def test_the_log_keeps_the_first_lines_and_counts_the_rest() -> None:
    lines = [f"line {i}" for i in range(5)] + ['{"experiment": {"done": true}}']
    document = run(lines, limits=ScrapeLimits(max_log_lines=3))
    assert messages(document)[2:] == ["line 0", "line 1", "line 2"]
    assert document["studioml"]["dropped_lines"] == {"log_limit": 2}
    assert document["experiment"] == {"done": True}  # directives still apply after the log is full


def test_long_lines_are_dropped_whole() -> None:
    limits = ScrapeLimits(max_line_length=20)
    document = run(["x" * 21, "y" * 20, '{"experiment": {"long": "' + "z" * 30 + '"}}'], limits=limits)
    assert messages(document)[2:] == ["y" * 20]
    assert "experiment" not in document
    assert document["studioml"]["dropped_lines"] == {"too_long": 2}


def test_the_document_size_is_capped_and_later_lines_are_cut_off() -> None:
    limits = ScrapeLimits(max_document_bytes=2_000)
    lines = [f"line {i:04d} " + "x" * 80 for i in range(100)] + ['{"experiment": {"late": 1}}']
    document = run(lines, limits=limits)
    assert len(json.dumps(document)) <= 2_000 + 100
    kept = len(log_of(document)) - 2
    assert 0 < kept < 100
    assert document["studioml"]["dropped_lines"] == {"size_limit": 101 - kept}
    assert "experiment" not in document
    assert messages(document)[2:] == [line.strip() for line in lines[:kept]]


def test_a_copy_bomb_stops_at_the_size_limit() -> None:
    limits = ScrapeLimits(max_document_bytes=100_000)
    lines = ['{"a": {"b": "' + "x" * 1000 + '"}}']
    lines += ['[{"op": "copy", "from": "", "path": "/a/c"}]'] * 40
    lines += ['[{"op": "copy", "from": "/a", "path": "/a/d"}]'] * 40
    document = run(lines, limits=limits)
    assert len(json.dumps(document)) <= 100_000
    assert document["studioml"]["dropped_lines"]["size_limit"] >= 40


def test_deep_lines_are_dropped() -> None:
    limits = ScrapeLimits(max_depth=8)
    deep = '{"a": ' * 9 + "1" + "}" * 9
    fine = '{"b": ' * 7 + "1" + "}" * 7
    document = run([deep, fine], limits=limits)
    assert "a" not in document and "b" in document
    assert document["studioml"]["dropped_lines"] == {"too_deep": 1}


def test_patches_cannot_nest_the_document_past_the_depth_limit() -> None:
    limits = ScrapeLimits(max_depth=8)
    lines = ['{"a": {"b": {"c": {"d": 1}}}}']
    lines += ['[{"op": "copy", "from": "/a", "path": "/a/b/c/e"}]'] * 5  # each copy nests deeper
    lines += ['[{"op": "add", "path": "/x/y/z/w/v/u/t/s", "value": {"r": 1}}]']  # dropped before it fails
    document = run(lines, limits=limits)
    depth_text = json.dumps(document)
    assert max_nesting(depth_text) <= 8
    assert document["studioml"]["dropped_lines"]["too_deep"] >= 1


def max_nesting(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped = not escaped and char == "\\"
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def test_absurdly_deep_json_is_dropped_not_a_crash() -> None:
    line = "[" * 100_000 + "]" * 100_000
    document = run([line, '{"experiment": ' + "[" * 5000 + "]" * 5000 + "}"])
    assert log_of(document) == SEED_LOG
    assert document["studioml"]["dropped_lines"] == {"too_deep": 2}


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_log_lines"):
        ScrapeLimits(max_log_lines=0)


# --- the file --------------------------------------------------------------------------------


def read_one_line(path: Path) -> dict:
    text = path.read_text(encoding="ascii")
    assert text.endswith("\n") and text.count("\n") == 1
    return json.loads(text)


def test_write_scrape_file_writes_one_json_line(tmp_path: Path) -> None:
    output = tmp_path / "output" / "output"
    output.parent.mkdir()
    output.write_text('starting\n{"experiment": {"name": "x"}}\n\n  \nfinished\n')
    metadata = tmp_path / "_metadata"
    path = write_scrape_file(output, metadata, "runner-7d9f-1sGgNO", before=FACTS.before(), now=now)
    assert path == metadata / "scrape-host-runner-7d9f-1sGgNO.json"
    document = read_one_line(path)
    assert messages(document) == ["Init", "", "Start", "starting", "finished"]
    assert document["experiment"] == {"name": "x"}
    assert sorted(p.name for p in metadata.iterdir()) == [path.name]


def test_write_scrape_file_splits_on_newlines_only_and_replaces_bad_utf8(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.write_bytes(
        b"caf\xc3\xa9 ok\r\n"
        b"bad \xff\xfe bytes\n"
        b"progress 10%\rprogress 20%\n"
        b'{"experiment": {"note": "\\ud800 lone"}}\n'
        b"no final newline"
    )
    path = write_scrape_file(output, tmp_path / "md", "h-1", now=now)
    document = read_one_line(path)
    assert messages(document)[2:] == [
        "caf\u00e9 ok",
        "bad \ufffd\ufffd bytes",
        "progress 10%\rprogress 20%",
        "no final newline",
    ]
    assert document["experiment"] == {"note": "\ud800 lone"}


def test_write_scrape_file_drops_overlong_lines_without_reading_them_whole(tmp_path: Path) -> None:
    output = tmp_path / "output"
    with output.open("wb") as stream:
        stream.write(b"before\n")
        stream.write(b"x" * (3 << 20) + b"\n")
        stream.write(b'{"experiment": {"after": true}}\n')
        stream.write(b"y" * 1025)
    path = write_scrape_file(output, tmp_path, "h-1", limits=ScrapeLimits(max_line_length=1024), now=now)
    document = read_one_line(path)
    assert messages(document)[2:] == ["before"]
    assert document["experiment"] == {"after": True}
    assert document["studioml"]["dropped_lines"] == {"too_long": 2}


def test_write_scrape_file_regenerates_under_the_same_name(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.write_text("first\n")
    first = write_scrape_file(output, tmp_path / "md", "h-1", now=now)
    with output.open("a") as stream:
        stream.write("second\n")
    second = write_scrape_file(output, tmp_path / "md", "h-1", now=now)
    assert first == second
    assert messages(read_one_line(second))[2:] == ["first", "second"]


def test_a_rejected_scrape_removes_the_stale_file_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "output"
    output.write_text("fine\n")
    metadata = tmp_path / "md"
    assert write_scrape_file(output, metadata, "h-1", now=now) is not None
    with output.open("a") as stream:
        stream.write('[{"op": "remove", "path": "/studioml/log"}]\n')
    with caplog.at_level(logging.WARNING, logger="studio_runner.metadata"):
        assert write_scrape_file(output, metadata, "h-1", now=now) is None
    assert list(metadata.iterdir()) == []
    assert "console line 2" in caplog.text
    assert "only 'add' may touch /studioml" in caplog.text


def test_a_missing_console_log_still_records_the_runner_facts(tmp_path: Path) -> None:
    path = write_scrape_file(tmp_path / "nothing", tmp_path / "md", "h-1", before=FACTS.before(), now=now)
    document = read_one_line(path)
    assert document["studioml"]["host"] == "runner-7d9f"
    assert messages(document) == ["Init", "", "Start"]


def test_write_scrape_file_passes_before_and_after_through(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.write_text("hello\n")
    facts = RunnerFacts(host="h", key="k", start_time=1.0, stop_time=2.0, status="completed", exit_code=0)
    path = write_scrape_file(
        output, tmp_path, "h-1", before=facts.before(), after=facts.after(), schema_logs=False, now=now
    )
    document = read_one_line(path)
    assert messages(document) == ["Init", "", "Start", "Stop"]
    assert document["studioml"]["status"] == "completed"
