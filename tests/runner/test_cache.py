"""The ETag-keyed download cache (studio_runner.cache)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
from studio_runner.cache import PARTIAL_DIR, DownloadCache


def filler(data: bytes, calls: list[str] | None = None, pause: float = 0.0) -> Callable[[BinaryIO], None]:
    def fill(out: BinaryIO) -> None:
        if calls is not None:
            calls.append(threading.current_thread().name)
        if pause:
            time.sleep(pause)
        out.write(data)

    return fill


def test_miss_then_hit(tmp_path: Path) -> None:
    cache = DownloadCache(tmp_path / "cache", max_bytes=10_000)
    calls: list[str] = []

    with cache.open("abc123", filler(b"payload", calls)) as first:
        assert first.read() == b"payload"
    with cache.open("abc123", filler(b"payload", calls)) as second:
        assert second.read() == b"payload"

    assert len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    assert list((tmp_path / "cache" / PARTIAL_DIR).iterdir()) == []


def test_two_threads_fill_once(tmp_path: Path) -> None:
    cache = DownloadCache(tmp_path / "cache", max_bytes=10_000)
    calls: list[str] = []
    start = threading.Barrier(2)
    seen: dict[str, bytes] = {}

    def fetch() -> None:
        start.wait()
        with cache.open(
            "d41d8cd98f00b204e9800998ecf8427e-2", filler(b"x" * 5000, calls, pause=0.5)
        ) as stream:
            seen[threading.current_thread().name] = stream.read()

    threads = [threading.Thread(target=fetch, name=f"fetcher-{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(calls) == 1
    assert list(seen.values()) == [b"x" * 5000, b"x" * 5000]
    assert (cache.hits, cache.misses) == (1, 1)


def _fill_in_process(root: str, marker: str, start: multiprocessing.synchronize.Barrier) -> None:  # type: ignore[name-defined]
    cache = DownloadCache(Path(root), max_bytes=10_000)
    start.wait()

    def fill(out: BinaryIO) -> None:
        with open(marker, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        out.write(b"shared")

    with cache.open("feedface", fill) as stream:
        assert stream.read() == b"shared"


def test_two_processes_fill_once(tmp_path: Path) -> None:
    """Runner processes on one machine share the cache folder; flock keeps fills single."""
    context = multiprocessing.get_context("spawn")  # no fork: the session holds client threads
    start = context.Barrier(2)
    marker = tmp_path / "fills.log"
    processes = [
        context.Process(target=_fill_in_process, args=(str(tmp_path / "cache"), str(marker), start))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)

    assert [p.exitcode for p in processes] == [0, 0]
    assert len(marker.read_text().splitlines()) == 1


def test_least_recently_used_is_evicted(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = DownloadCache(root, max_bytes=300)
    for name in ("aaaa", "bbbb", "cccc"):
        with cache.open(name, filler(b"." * 100)):
            pass
    now = time.time()
    for age, name in ((300, "aaaa"), (200, "bbbb"), (100, "cccc")):
        os.utime(root / name, (now - age, now - age))

    with cache.open("aaaa", filler(b"never called")) as hit:  # a hit makes "aaaa" the most recent
        assert hit.read() == b"." * 100
    with cache.open("dddd", filler(b"." * 100)):
        pass

    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["aaaa", "cccc", "dddd"]
    assert cache.size == 300


def test_objects_bigger_than_the_cache_are_not_kept(tmp_path: Path) -> None:
    cache = DownloadCache(tmp_path / "cache", max_bytes=100)
    calls: list[str] = []

    for size_hint in (None, None, 500, 500):
        with cache.open("bigbig", filler(b"#" * 500, calls), size=size_hint) as stream:
            assert stream.read() == b"#" * 500

    assert len(calls) == 4
    assert cache.misses == 4 and cache.hits == 0
    assert cache.size == 0
    assert list((tmp_path / "cache" / PARTIAL_DIR).iterdir()) == []


def test_failed_fill_leaves_nothing_and_the_next_caller_fills(tmp_path: Path) -> None:
    cache = DownloadCache(tmp_path / "cache", max_bytes=10_000)

    def broken(out: BinaryIO) -> None:
        out.write(b"half")
        raise ConnectionError("storage went away")

    with pytest.raises(ConnectionError), cache.open("cafe01", broken):
        pass
    with cache.open("cafe01", filler(b"whole")) as stream:
        assert stream.read() == b"whole"

    assert list((tmp_path / "cache" / PARTIAL_DIR).iterdir()) == []


def test_unusual_etags_get_safe_names(tmp_path: Path) -> None:
    cache = DownloadCache(tmp_path / "cache", max_bytes=10_000)

    with cache.open("../../etc/passwd", filler(b"data")) as stream:
        assert stream.read() == b"data"

    names = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(names) == 1 and names[0].startswith("h") and "/" not in names[0]
    assert not (tmp_path / "etc").exists()
