"""Tar packing and guarded unpacking (studio_runner.archive)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import stat
import tarfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from studio_runner.archive import (
    ArchiveError,
    compression_for_key,
    detect_compression,
    has_content,
    pack,
    unpack,
)

BUDGET = 64 * 1024 * 1024


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]], compression: str | None = None) -> bytes:
    """A tar built member by member, so tests can write entries no well-behaved tool would."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_entry(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_700_000_000
    return info, data


def link_entry(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def dir_entry(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """The extraction folder, alone inside a sandbox whose other contents reveal escapes."""
    (tmp_path / "sandbox").mkdir()
    return tmp_path / "sandbox" / "target"


def assert_sandbox_clean(target: Path) -> None:
    assert sorted(p.name for p in target.parent.iterdir()) == ["target"]


# --- compression by magic bytes ------------------------------------------------------------
@pytest.mark.parametrize(
    ("compression", "misleading_name"),
    [
        ("gz", "workspace.tar"),
        ("bz2", "workspace.tgz"),
        ("xz", "workspace.tar.gz"),
        (None, "workspace.tar.bz2"),
    ],
)
def test_unpack_detects_compression_by_magic_not_name(
    target: Path, compression: str | None, misleading_name: str
) -> None:
    data = tar_bytes([file_entry("hello.py", b"print('hi')\n")], compression)
    stream = io.BytesIO(data)
    stream.name = misleading_name  # type: ignore[attr-defined]

    written = unpack(stream, target, budget=BUDGET)

    assert written == len(b"print('hi')\n")
    assert (target / "hello.py").read_bytes() == b"print('hi')\n"


def test_bzip2_of_any_block_size_is_recognised(target: Path) -> None:
    """tarfile's own sniffing only knows ``BZh9``; clients may compress with ``-1``."""
    plain = tar_bytes([file_entry("a.txt", b"a" * 1000)])
    compressed = bz2.compress(plain, compresslevel=1)
    assert compressed.startswith(b"BZh1")

    unpack(io.BytesIO(compressed), target, budget=BUDGET)

    assert (target / "a.txt").read_bytes() == b"a" * 1000


def test_detect_compression_magic_table() -> None:
    assert detect_compression(gzip.compress(b"x")) == "gz"
    assert detect_compression(bz2.compress(b"x")) == "bz2"
    assert detect_compression(lzma.compress(b"x")) == "xz"
    assert detect_compression(b"hello.py\0\0\0") is None
    assert detect_compression(b"BZhx") is None


def test_unpack_reads_a_non_seekable_stream(target: Path) -> None:
    data = tar_bytes([file_entry("big.bin", os.urandom(3 * 1024 * 1024))], "gz")
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as writer:
        import threading

        feeder = threading.Thread(target=lambda: (writer.write(data), writer.close()))
        feeder.start()
        with os.fdopen(read_fd, "rb") as reader:
            written = unpack(reader, target, budget=BUDGET)
        feeder.join()
    assert written == 3 * 1024 * 1024


def test_studioml_client_archives_unpack(target: Path, tmp_path: Path) -> None:
    """Directory tars with bare member names and single-file tars with ``./name``."""
    source = tmp_path / "ws"
    (source / "pkg").mkdir(parents=True)
    (source / "hello.py").write_text("print('hello')\n")
    (source / "pkg" / "mod.py").write_text("X = 1\n")
    directory_tar = io.BytesIO()
    with tarfile.open(fileobj=directory_tar, mode="w") as archive:
        for name in os.listdir(source):
            archive.add(source / name, arcname=name)
    single_tar = io.BytesIO()
    with tarfile.open(fileobj=single_tar, mode="w") as archive:
        archive.add(source / "hello.py", arcname="./hello.py")

    unpack(io.BytesIO(directory_tar.getvalue()), target, budget=BUDGET)
    unpack(io.BytesIO(single_tar.getvalue()), tmp_path / "single", budget=BUDGET)

    assert (target / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert (target / "hello.py").read_text() == "print('hello')\n"
    assert [p.name for p in (tmp_path / "single").iterdir()] == ["hello.py"]


# --- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([file_entry("../escape.txt", b"x")], "../escape.txt"),
        ([file_entry("sub/../../escape.txt", b"x")], "sub/../../escape.txt"),
        ([file_entry("/etc/escape.txt", b"x")], "absolute"),
        ([link_entry("up", "../..")], "'up'"),
        ([link_entry("abs", "/etc")], "'abs'"),
        ([dir_entry("d"), link_entry("d/l", "../../x")], "'d/l'"),
        ([link_entry("inside", "."), file_entry("inside/../../escape.txt", b"x")], "inside/../../escape.txt"),
        ([link_entry("hard", "../outside.txt", tarfile.LNKTYPE)], "'hard'"),
        ([link_entry("hard", "/etc/passwd", tarfile.LNKTYPE)], "'hard'"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink-up",
        "symlink-absolute",
        "symlink-nested-up",
        "write-through-symlink",
        "hardlink-up",
        "hardlink-absolute",
    ],
)
def test_escaping_entries_are_refused(target: Path, entries: list, words: str) -> None:
    data = tar_bytes(entries)

    with pytest.raises(ArchiveError) as refused:
        unpack(io.BytesIO(data), target, budget=BUDGET)

    assert words in str(refused.value)
    assert_sandbox_clean(target)


def test_symlink_chain_escape_is_refused(target: Path) -> None:
    """``a -> b`` is harmless until ``b -> ..`` arrives; the second link must be refused."""
    data = tar_bytes([link_entry("a", "b"), link_entry("b", ".."), file_entry("a/escape.txt", b"x")])

    with pytest.raises(ArchiveError, match="'b'"):
        unpack(io.BytesIO(data), target, budget=BUDGET)
    assert_sandbox_clean(target)


def test_hard_link_to_an_inside_symlink_is_refused(target: Path) -> None:
    """A hard link to a symlink would re-anchor its relative target in another folder."""
    data = tar_bytes(
        [dir_entry("sub"), link_entry("sub/l", "../x"), link_entry("h", "sub/l", tarfile.LNKTYPE)]
    )

    with pytest.raises(ArchiveError, match="'h'"):
        unpack(io.BytesIO(data), target, budget=BUDGET)


@pytest.mark.parametrize(
    "kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE], ids=["chr", "blk", "fifo"]
)
def test_devices_and_fifos_are_refused(target: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("dev")
    info.type = kind
    info.devmajor, info.devminor = 1, 3

    with pytest.raises(ArchiveError, match="'dev'"):
        unpack(io.BytesIO(tar_bytes([(info, None)])), target, budget=BUDGET)
    assert not (target / "dev").exists()


def test_inside_links_are_kept(target: Path) -> None:
    data = tar_bytes(
        [
            dir_entry("data"),
            file_entry("data/a.txt", b"alpha"),
            link_entry("latest", "data/a.txt"),
            link_entry("copy.txt", "data/a.txt", tarfile.LNKTYPE),
        ]
    )

    unpack(io.BytesIO(data), target, budget=BUDGET)

    assert os.readlink(target / "latest") == "data/a.txt"
    assert (target / "copy.txt").read_bytes() == b"alpha"
    assert (target / "copy.txt").stat().st_ino == (target / "data" / "a.txt").stat().st_ino


def test_gzip_bomb_over_budget_is_refused_without_filling_the_disk(target: Path) -> None:
    """100 MiB of zeros in ~100 KiB of gzip, against a 4 MiB budget."""
    bomb = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=bomb, mode="wb", compresslevel=6) as compressed,
        tarfile.open(fileobj=compressed, mode="w|") as archive,
    ):
        info = tarfile.TarInfo("zeros.bin")
        info.size = 100 * 1024 * 1024
        archive.addfile(info, io.BufferedReader(_Zeros(info.size)))  # type: ignore[arg-type]
    assert len(bomb.getvalue()) < 1024 * 1024

    with pytest.raises(ArchiveError, match=r"zeros\.bin"):
        unpack(io.BytesIO(bomb.getvalue()), target, budget=4 * 1024 * 1024)

    assert _disk_bytes(target) == 0


def test_many_small_files_are_counted_against_the_budget(target: Path) -> None:
    entries = [file_entry(f"part{i:02}.bin", b"\0" * 1024 * 1024) for i in range(10)]
    charged: list[int] = []

    with pytest.raises(ArchiveError, match=r"part0[56]"):
        unpack(
            io.BytesIO(tar_bytes(entries, "gz")), target, budget=5 * 1024 * 1024 + 10, charge=charged.append
        )

    assert sum(charged) <= 5 * 1024 * 1024 + 10
    assert _disk_bytes(target) <= 5 * 1024 * 1024 + 10


def test_shared_budget_refusal_removes_the_partial_file(target: Path) -> None:
    """``charge`` stands for a budget shared with other artifacts; its refusal ends the unpack."""

    class Full(Exception):
        pass

    taken = 0

    def charge(size: int) -> None:
        nonlocal taken
        if taken + size > 1536 * 1024:
            raise Full("shared budget spent")
        taken += size

    data = tar_bytes([file_entry("a.bin", b"\1" * 1024 * 1024), file_entry("b.bin", b"\2" * 1024 * 1024)])

    with pytest.raises(Full):
        unpack(io.BytesIO(data), target, budget=BUDGET, charge=charge)

    assert (target / "a.bin").stat().st_size == 1024 * 1024
    assert not (target / "b.bin").exists()


def test_oversized_pax_header_is_refused_before_it_is_read(target: Path) -> None:
    """tarfile reads pax headers whole into memory; the stream cap must stop a huge one."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 96 * 1024 * 1024
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [compressor.compress(header.tobuf(format=tarfile.USTAR_FORMAT))]
    block = b"\0" * (1024 * 1024)
    for _ in range(96):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())

    with pytest.raises(ArchiveError, match=r"decompression bomb|byte budget"):
        unpack(io.BytesIO(b"".join(parts)), target, budget=1024 * 1024)


def test_too_many_entries_are_refused(target: Path) -> None:
    data = tar_bytes([file_entry(f"f{i}", b"") for i in range(20)])

    with pytest.raises(ArchiveError, match="more than 10 entries"):
        unpack(io.BytesIO(data), target, budget=BUDGET, max_entries=10)


@pytest.mark.parametrize(
    "data",
    [b"this is not an archive at all" * 40, gzip.compress(b"not a tar inside" * 100)[:-20], b""],
    ids=["garbage", "truncated-gzip", "empty"],
)
def test_unreadable_archives_raise_archive_error(target: Path, data: bytes) -> None:
    with pytest.raises(ArchiveError, match="cannot unpack"):
        unpack(io.BytesIO(data), target, budget=BUDGET)


# --- packing ---------------------------------------------------------------------------------
def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    (root / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub" / "deeper" / "run.sh").chmod(0o755)
    (root / "link").symlink_to("sub/b.bin")


@pytest.mark.parametrize("compression", [None, "gz", "bz2", "xz"])
def test_pack_unpack_round_trip(tmp_path: Path, compression: str | None) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    packed = io.BytesIO()

    count = pack(source, packed, compression=compression)
    unpack(io.BytesIO(packed.getvalue()), tmp_path / "copy", budget=BUDGET)

    copy = tmp_path / "copy"
    assert count == 7
    assert (copy / "a.txt").read_text() == "alpha\n"
    assert (copy / "sub" / "b.bin").read_bytes() == (source / "sub" / "b.bin").read_bytes()
    assert (copy / "empty").is_dir()
    assert os.readlink(copy / "link") == "sub/b.bin"
    assert os.stat(copy / "sub" / "deeper" / "run.sh").st_mode & stat.S_IXUSR
    assert int((copy / "a.txt").stat().st_mtime) == int((source / "a.txt").stat().st_mtime)


def test_pack_names_every_entry_dot_slash_and_omits_the_root(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    packed = io.BytesIO()

    pack(source, packed, compression=None)

    with tarfile.open(fileobj=io.BytesIO(packed.getvalue())) as archive:
        names = archive.getnames()
        link = archive.getmember("./link")
    assert names == [
        "./a.txt",
        "./empty",
        "./link",
        "./sub",
        "./sub/b.bin",
        "./sub/deeper",
        "./sub/deeper/run.sh",
    ]
    assert "." not in names and "./" not in names
    assert link.issym() and link.linkname == "sub/b.bin"


def test_retval_tar_is_what_the_studioml_client_accepts(tmp_path: Path) -> None:
    """The client's check (STUDIOML_CLIENT.md): one member, ``./``-prefixed, newer, unpickles."""
    submitted_at = time.time()
    folder = tmp_path / "retval"
    folder.mkdir()
    (folder / "retval").write_bytes(pickle.dumps({"fitness": 0.93, "id": 7}, protocol=2))
    upload_time = submitted_at + 0.25
    packed = io.BytesIO()

    pack(folder, packed, compression=None, mtime=upload_time)

    assert client_reads_retval(packed.getvalue(), submitted_at, tmp_path / "client") == {
        "fitness": 0.93,
        "id": 7,
    }


def client_reads_retval(tar_data: bytes, submitted_at: float, scratch: Path) -> object:
    """What the StudioML client does with ``retval.tar`` (storage_util.untar_artifact + caller)."""
    with tarfile.open(fileobj=io.BytesIO(tar_data)) as archive:
        names = archive.getnames()
        assert len(names) == 1 and names[0].startswith("./"), f"client would unpack a folder: {names}"
        member = archive.getmember(names[0])
        assert member.mtime > submitted_at, "client would treat this retval as older than its task"
        archive.extractall(scratch, filter="data")
    with open(scratch / names[0][2:], "rb") as result:
        return pickle.load(result)


def test_pack_with_mtime_stamps_every_entry(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    packed = io.BytesIO()

    pack(source, packed, compression="gz", mtime=2_000_000_000.5)

    with tarfile.open(fileobj=io.BytesIO(packed.getvalue())) as archive:
        assert {m.mtime for m in archive.getmembers()} == {2_000_000_000.5}


def test_has_content_ignores_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert not has_content(tmp_path)
    (tmp_path / "a" / "b" / "f").write_text("x")
    assert has_content(tmp_path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-. ", min_size=1, max_size=12).filter(
            lambda n: n not in (".", "..")
        ),
        st.binary(max_size=3000),
        min_size=1,
        max_size=8,
    ),
    compression=st.sampled_from([None, "gz", "bz2"]),
)
def test_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes], compression: str | None
) -> None:
    root = tmp_path_factory.mktemp("prop")
    source = root / "s"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    packed = io.BytesIO()

    pack(source, packed, compression=compression)
    written = unpack(io.BytesIO(packed.getvalue()), root / "t", budget=BUDGET)

    assert written == sum(len(d) for d in files.values())
    assert {p.name: p.read_bytes() for p in (root / "t").iterdir()} == files


# --- key names -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "compression"),
    [
        ("experiments/k/modeldir.tar", None),
        ("experiments/k/modeldir.tar.gz", "gz"),
        ("experiments/k/modeldir.tgz", "gz"),
        ("experiments/k/modeldir.gz", "gz"),
        ("experiments/k/modeldir.tar.bz2", "bz2"),
        ("experiments/k/modeldir.bz2", "bz2"),
        ("experiments/k/modeldir.tbz", "bz2"),
        ("experiments/k/modeldir.tbz2", "bz2"),
        ("experiments/k/modeldir.tar.xz", "xz"),
        ("experiments/k/MODELDIR.TAR.GZ", "gz"),
    ],
)
def test_compression_for_key(key: str, compression: str | None) -> None:
    assert compression_for_key(key) == compression


@pytest.mark.parametrize("key", ["experiments/k/modeldir.zip", "experiments/k/modeldir", "model.tar.zst"])
def test_non_tar_keys_are_refused(key: str) -> None:
    with pytest.raises(ArchiveError, match="not a tar archive name"):
        compression_for_key(key)


# --- helpers ---------------------------------------------------------------------------------
class _Zeros(io.RawIOBase):
    """An endless-looking source of zeros that never holds them all in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def _disk_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
