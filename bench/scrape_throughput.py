"""How fast the runner scrapes a console log, whole and at a checkpoint (issue 11, item 3).

Writes a console log of ``--lines`` lines (default 1,000,000), one in ten a JSON merge fragment
of training metrics as a workload prints them, the rest plain log lines, then measures in this
one process:

  (a) a bare loop: read the lines, ``json.loads`` every line that starts with ``{`` and merge it
      into a dict, nothing else (the floor any scraper in Python pays);
  (b) a full pass: ``ScrapeFile.write`` of the whole log into a fresh scrape file, as the final
      pass of an attempt does;
  (c) a checkpoint pass: a ``ScrapeFile`` that already read all but the last ``--new-lines`` lines
      reads them and writes the document, and the same with nothing new (what writing the
      document costs on its own);
  (d) a run checkpointing every ``--lines / --checkpoints`` lines: the cost of each checkpoint
      when it re-scrapes the whole log (what the runner did before) and when it reads only what
      was appended (what it does now).

Each figure is the median of ``--repeat`` runs, wall-clock seconds.

    .venv/bin/python bench/scrape_throughput.py [--lines 1000000] [--repeat 3]
        [--new-lines 10000] [--checkpoints 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "runner_image"))

from studio_runner.metadata import RunnerFacts, ScrapeFile  # noqa: E402

FACTS = RunnerFacts(host="bench-host", key="1790000000_bench", project="bench", start_time=1_790_000_000.0)


def console_lines(first: int, count: int) -> list[str]:
    """Lines ``first`` .. ``first + count - 1`` of the log, newline-terminated; same every run."""
    rnd = random.Random(first)
    lines = []
    for i in range(first, first + count):
        if i % 10 == 5:
            fragment = {
                "metrics": {"step": i, "loss": round(rnd.random(), 6), "accuracy": round(rnd.random(), 4)},
                "experiment": {"epoch": i // 1000},
            }
            lines.append(json.dumps(fragment) + "\n")
        else:
            lines.append(
                f"epoch {i // 1000} step {i} loss {rnd.random():.6f} lr 0.001 elapsed {i * 0.01:.2f}s\n"
            )
    return lines


def append(path: Path, first: int, count: int) -> None:
    with path.open("a", encoding="utf-8") as stream:
        stream.writelines(console_lines(first, count))


def bare_loop(path: Path) -> dict[str, Any]:
    def merge(target: dict[str, Any], fragment: dict[str, Any]) -> None:
        for key, value in fragment.items():
            old = target.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                merge(old, value)
            else:
                target[key] = value

    document: dict[str, Any] = {}
    with path.open("rb") as stream:
        for line in stream:
            if line.startswith(b"{"):
                merge(document, json.loads(line))
    return document


def median_seconds(
    action: Callable[[], object], repeat: int, setup: Callable[[], object] = lambda: None
) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of ``action`` (CPU time shows contention on shared machines)."""
    walls, cpus = [], []
    for _ in range(repeat):
        setup()
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def rate(lines: int, seconds: tuple[float, float]) -> str:
    wall, cpu = seconds
    return (
        f"{lines / wall / 1e6:5.2f} M lines/s ({wall:.3f} s; by CPU time {lines / cpu / 1e6:.2f} M lines/s)"
    )


def without_stamps(document: dict[str, Any]) -> str:
    """The document with its log's scrape times blanked: each pass stamps the lines it reads."""
    log = [{**entry, "ts": ""} for entry in document["studioml"]["log"]]
    return json.dumps({**document, "studioml": {**document["studioml"], "log": log}}, sort_keys=True)


def full_pass(log: Path, metadata: Path) -> Path | None:
    scrape_file = ScrapeFile(log, metadata, "bench-host-full")
    return scrape_file.write(before=FACTS.before(), after=FACTS.after(), final=True)


def checkpoint(scrape_file: ScrapeFile) -> Path | None:
    return scrape_file.write(before=FACTS.before(), after=FACTS.after(), final=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-lines", type=int, default=10_000)
    parser.add_argument("--checkpoints", type=int, default=10)
    options = parser.parse_args()
    total, new, repeat = options.lines, options.new_lines, options.repeat
    print(
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as folder:
        log, metadata = Path(folder) / "output", Path(folder) / "_metadata"
        append(log, 0, total)
        print(
            f"console log: {total:,} lines ({log.stat().st_size / 1e6:.1f} MB), one in ten a JSON merge fragment"
        )

        bare = median_seconds(lambda: bare_loop(log), repeat)
        full = median_seconds(lambda: full_pass(log, metadata), repeat)
        print(f"(a) bare json.loads + merge loop: {rate(total, bare)}")
        print(f"(b) full pass (ScrapeFile.write): {rate(total, full)}")
        print(f"    full pass / bare loop: {bare[0] / full[0]:.2f} (wall), {bare[1] / full[1]:.2f} (CPU)")

        # (c) the last `new` lines arrive after a checkpoint that read the rest
        head = Path(folder) / "head"
        append(head, 0, total - new)
        tail = "".join(console_lines(total - new, new))
        state: dict[str, ScrapeFile] = {}

        def caught_up() -> None:
            head_copy = Path(folder) / "growing"
            head_copy.write_bytes(head.read_bytes())
            state["file"] = ScrapeFile(head_copy, metadata, "bench-host-checkpoint")
            checkpoint(state["file"])
            with head_copy.open("a", encoding="utf-8") as stream:
                stream.write(tail)

        step = median_seconds(lambda: checkpoint(state["file"]), repeat, setup=caught_up)[0]
        idle = median_seconds(lambda: checkpoint(state["file"]), repeat)[0]
        print(
            f"(c) checkpoint pass: {new:,} new lines after {total - new:,} in {step * 1e3:.1f} ms "
            f"({new / step / 1e6:.2f} M new lines/s); with nothing new {idle * 1e3:.1f} ms (writing the document)"
        )

        # (d) one run, checkpointing as its log grows
        every = total // options.checkpoints
        growing = Path(folder) / "run"
        growing.write_bytes(b"")
        incremental = ScrapeFile(growing, metadata, "bench-host-run")
        print(f"(d) a run checkpointing every {every:,} lines: cost of each checkpoint, seconds")
        print(f"    {'lines so far':>12}  {'full rescan':>11}  {'new lines only':>14}")
        rescans, passes = [], []
        for index in range(options.checkpoints):
            append(growing, index * every, every)
            rescan_file = ScrapeFile(growing, metadata, "bench-host-rescan")
            started = time.perf_counter()
            checkpoint(rescan_file)
            rescans.append(time.perf_counter() - started)
            started = time.perf_counter()
            checkpoint(incremental)
            passes.append(time.perf_counter() - started)
            print(f"    {(index + 1) * every:>12,}  {rescans[-1]:>11.3f}  {passes[-1]:>14.3f}")
        print(f"    {'total':>12}  {sum(rescans):>11.3f}  {sum(passes):>14.3f}")
        final = incremental.document(before=FACTS.before(), after=FACTS.after(), final=True)
        whole = ScrapeFile(growing, metadata, "bench-host-whole").document(
            before=FACTS.before(), after=FACTS.after(), final=True
        )
        same = without_stamps(final) == without_stamps(whole)
        print(f"    the last incremental pass gives the full scrape's document (time stamps aside): {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
