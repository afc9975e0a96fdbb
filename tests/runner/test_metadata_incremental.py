"""ScrapeFile: checkpoints that read only what the console appended, and a final pass that gives
the document one full scrape gives (properties in test_metadata_properties.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from studio_runner.metadata import RunnerFacts, ScrapeFile, ScrapeLimits, write_scrape_file

FACTS = RunnerFacts(host="runner-7d9f", key="1718031122_6b1f3c2e", project="orchard", start_time=1718031130.5)
RUNNING = RunnerFacts(host="runner-7d9f", key="k", status="running")
STOPPED = RunnerFacts(host="runner-7d9f", key="k", stop_time=1718031200.0, status="completed", exit_code=0)


def now() -> str:
    return "2024-06-10T15:00:00.000000Z"


def messages(document: dict[str, Any]) -> list[str]:
    return [entry["msg"] for entry in document["studioml"]["log"]]


def append(path: Path, data: str | bytes) -> None:
    with path.open("ab") as stream:
        stream.write(data.encode() if isinstance(data, str) else data)


def full(output: Path, **options: Any) -> dict[str, Any]:
    options.setdefault("now", now)
    scrape_file = ScrapeFile(output, output.parent / "full", "h-full", **options)
    return scrape_file.document(before=FACTS.before(), after=STOPPED.after(), final=True)


@pytest.fixture
def output(tmp_path: Path) -> Path:
    return tmp_path / "output"


@pytest.fixture
def scrape_file(output: Path) -> ScrapeFile:
    return ScrapeFile(output, output.parent / "_metadata", "h-1", now=now)


def checkpoint(scrape_file: ScrapeFile, after: list[Any] | None = None) -> dict[str, Any]:
    return scrape_file.document(
        before=FACTS.before(), after=RUNNING.after() if after is None else after, final=False
    )


def final(scrape_file: ScrapeFile) -> dict[str, Any]:
    return scrape_file.document(before=FACTS.before(), after=STOPPED.after(), final=True)


def test_checkpoints_then_the_final_pass_equal_one_full_scrape(output: Path, scrape_file: ScrapeFile) -> None:
    append(output, 'starting\n{"metrics": {"loss": 0.9, "step": 1}}\n')
    assert messages(checkpoint(scrape_file))[3:] == ["starting"]
    append(
        output,
        'epoch 1\n{"metrics": {"loss": 0.5, "step": 2}}\n[{"op": "add", "path": "/best", "value": 1}]\n',
    )
    middle = checkpoint(scrape_file)
    assert middle["metrics"] == {"loss": 0.5, "step": 2}
    assert middle["studioml"]["status"] == "running"
    append(output, "done")
    document = final(scrape_file)
    assert document == full(output)
    assert messages(document)[3:] == ["starting", "epoch 1", "done", "Stop"]
    assert document["studioml"]["status"] == "completed"


def test_a_checkpoint_leaves_a_line_without_its_newline_for_the_next_pass(
    output: Path, scrape_file: ScrapeFile
) -> None:
    append(output, 'first\n{"metrics": {"lo')
    document = checkpoint(scrape_file)
    assert messages(document)[3:] == ["first"]
    assert "metrics" not in document
    append(output, 'ss": 0.5}}\nsecond half')
    document = checkpoint(scrape_file)
    assert document["metrics"] == {"loss": 0.5}
    assert messages(document)[3:] == ["first"]
    append(output, " and its end\n")
    assert messages(checkpoint(scrape_file))[3:] == ["first", "second half and its end"]
    assert messages(final(scrape_file))[3:] == ["first", "second half and its end", "Stop"]


def test_a_character_split_between_passes_is_read_whole(output: Path, scrape_file: ScrapeFile) -> None:
    append(output, b"caf\xc3")
    checkpoint(scrape_file)
    append(output, b"\xa9 au lait\n")
    assert messages(final(scrape_file))[3:] == ["caf\u00e9 au lait", "Stop"]


def test_a_checkpoint_reads_only_what_was_appended(output: Path, scrape_file: ScrapeFile) -> None:
    """Lines already folded in are not read again: rewriting them in place changes nothing."""
    append(output, "alpha\nbravo\n")
    checkpoint(scrape_file)
    with output.open("r+b") as stream:
        stream.write(b"ALPHA\nBRAVO\n")
    append(output, "charlie\n")
    assert messages(checkpoint(scrape_file))[3:] == ["alpha", "bravo", "charlie"]


def test_a_checkpoint_with_nothing_new_gives_the_same_document(output: Path, scrape_file: ScrapeFile) -> None:
    append(output, 'one\n{"metrics": {"loss": 0.5}}\n')
    assert checkpoint(scrape_file) == checkpoint(scrape_file)


def test_what_a_checkpoint_applies_after_the_lines_does_not_stay(
    output: Path, scrape_file: ScrapeFile
) -> None:
    append(output, '{"experiment": {"a": {"b": 1}}}\n')
    odd_after = [
        {"studioml": {"experiment": {"extra": 1}}, "experiment": {"a": {"c": 2}}},
        [
            {"op": "add", "path": "/experiment/a/d", "value": 3},
            {"op": "move", "from": "/experiment/a", "path": "/x"},
        ],
        [{"op": "add", "path": "/studioml/log/-", "value": {"ts": "t", "msg": "checkpoint"}}],
    ]
    document = checkpoint(scrape_file, odd_after)
    assert document["x"] == {"b": 1, "c": 2, "d": 3}
    assert document["studioml"]["experiment"]["extra"] == 1
    append(output, "later\n")
    assert final(scrape_file) == full(output)


def test_each_pass_stamps_only_the_lines_it_reads(output: Path) -> None:
    stamps = iter(["2024-06-10T15:00:00.000000Z", "2024-06-10T15:01:00.000000Z"])
    scrape_file = ScrapeFile(output, output.parent / "md", "h-1", now=lambda: next(stamps))
    append(output, "early\n")
    checkpoint(scrape_file)
    append(output, "late\n")
    log = checkpoint(scrape_file)["studioml"]["log"][3:]
    assert log == [
        {"ts": "2024-06-10T15:00:00.000000Z", "msg": "early"},
        {"ts": "2024-06-10T15:01:00.000000Z", "msg": "late"},
    ]


def test_a_rejected_line_rejects_every_later_pass(
    output: Path, scrape_file: ScrapeFile, caplog: pytest.LogCaptureFixture
) -> None:
    append(output, "fine\n")
    assert scrape_file.write(before=FACTS.before(), final=False) == scrape_file.target
    append(output, '[{"op": "remove", "path": "/studioml/log"}]\nmore\n')
    with caplog.at_level(logging.WARNING, logger="studio_runner.metadata"):
        assert scrape_file.write(before=FACTS.before(), final=False) is None
        assert not scrape_file.target.exists()
        append(output, "and more\n")
        assert scrape_file.write(before=FACTS.before(), final=True) is None
    assert caplog.text.count("console line 2") == 2
    assert not scrape_file.target.exists()


def test_other_runner_facts_before_the_lines_start_the_scrape_over(
    output: Path, scrape_file: ScrapeFile
) -> None:
    append(output, "one\n")
    scrape_file.document(before=RunnerFacts(host="runner-7d9f", key="k").before(), final=False)
    append(output, "two\n")
    assert final(scrape_file) == full(output)


def test_a_replaced_shorter_log_is_read_from_its_start(output: Path, scrape_file: ScrapeFile) -> None:
    append(output, "a long first line\nand another\n")
    checkpoint(scrape_file)
    output.write_text("new\n")
    assert messages(final(scrape_file))[3:] == ["new", "Stop"]


def test_a_log_that_appears_after_the_first_pass_is_read_whole(output: Path, scrape_file: ScrapeFile) -> None:
    assert messages(checkpoint(scrape_file)) == ["Init", "", "Start"]
    append(output, "hello\n")
    assert final(scrape_file) == full(output)


def test_an_overlong_line_written_across_passes_is_dropped_once(output: Path) -> None:
    limits = ScrapeLimits(max_line_length=100)
    scrape_file = ScrapeFile(output, output.parent / "md", "h-1", limits=limits, now=now)
    append(output, "short\n" + "x" * 60)
    checkpoint(scrape_file)
    append(output, "x" * 60)
    checkpoint(scrape_file)
    append(output, "x" * 500 + '\n{"after": true}\n' + "y" * 101)
    assert checkpoint(scrape_file)["studioml"]["dropped_lines"] == {"too_long": 1}
    document = final(scrape_file)
    assert messages(document)[3:] == ["short", "Stop"]
    assert document["after"] is True
    assert document["studioml"]["dropped_lines"] == {"too_long": 2}
    assert document == full(output, limits=limits)


def test_a_line_exactly_at_the_length_limit_is_kept_in_a_big_log(output: Path) -> None:
    """Lines reach the scraper in blocks of a MiB: limits hold across block boundaries."""
    limits = ScrapeLimits(max_line_length=1000, max_log_lines=1_000_000)
    lines = [f"{index:07d} " + "z" * (992 if index % 997 == 0 else 50) for index in range(40_000)]
    lines.insert(20_000, "w" * 1001)
    append(output, "\n".join(lines) + "\n")
    document = full(output, limits=limits)
    assert messages(document)[3:-1] == [line for line in lines if len(line) <= 1000]
    assert document["studioml"]["dropped_lines"] == {"too_long": 1}


def test_write_scrape_file_is_one_full_pass(output: Path, tmp_path: Path) -> None:
    append(output, "hello\nlast")
    path = write_scrape_file(
        output, tmp_path / "md", "h-1", before=FACTS.before(), after=STOPPED.after(), now=now
    )
    assert json.loads(path.read_text()) == full(output)


def lines_near_the_limit(value: str, count: int) -> Iterator[str]:
    for index in range(count):
        yield f'{{"k{index}":{value}}}'


@pytest.mark.parametrize(
    "value",
    [
        "[" + ",".join(["1e5"] * 40) + "]",  # each 1e5 is written as 100000.0
        "[" + ",".join(["1E-7"] * 40) + "]",
        '{"a":1,"b":[2,3],"c":{"d":"e"}}',  # compact: dumps adds a space after each , and :
        '"\u00e9\u00e9\u00e9\U0001f600"',  # written as \\u escapes
        "[" + ",".join(["12345678901234567890.5"] * 10) + "]",
    ],
)
def test_the_size_bound_holds_for_lines_that_grow_when_written(output: Path, value: str) -> None:
    limits = ScrapeLimits(max_document_bytes=4_000)
    append(output, "\n".join(lines_near_the_limit(value, 200)) + "\n")
    document = full(output, limits=limits, schema_logs=False)
    assert document["studioml"]["dropped_lines"]["size_limit"] >= 1
    without_counts = {**document, "studioml": {**document["studioml"], "dropped_lines": {}}}
    assert len(json.dumps(without_counts)) <= limits.max_document_bytes + 300  # the runner's own facts
