"""Unpacking environment packs with GNU tar keeps the guards of the standard library's ``data``
filter: nothing lands outside the target, and special files, set-id bits and escaping links are
refused (the pack is then discarded and the environment rebuilt)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard
from studio_runner.archive import ZSTD, ArchiveError, ArchiveTooLarge, gnu_tar, pack, unpack_with_gnu_tar

TAR = gnu_tar()


@pytest.fixture(scope="module")
def tar() -> str:
    assert TAR is not None, "GNU tar is on every Debian system and in the runner image; this machine lacks it"
    return TAR


def tar_stream(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    return info


def test_a_packed_folder_comes_back_whole(tmp_path: Path, tar: str) -> None:
    source = tmp_path / "env"
    (source / "bin").mkdir(parents=True)
    (source / "lib" / "site-packages" / "pkg").mkdir(parents=True)
    (source / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (source / "bin" / "tool").chmod(0o755)
    (source / "lib" / "site-packages" / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (source / "lib64").symlink_to("lib")
    packed = io.BytesIO()
    pack(source, packed, compression=ZSTD)
    packed.seek(0)
    target = tmp_path / "restored"
    target.mkdir()
    (target / "python").symlink_to("/usr/bin/python3")  # a venv skeleton's interpreter link, kept as it is

    fed = unpack_with_gnu_tar(packed, target, budget=1 << 20, tar=tar)

    assert fed > 0
    assert (target / "lib" / "site-packages" / "pkg" / "__init__.py").read_text() == "VALUE = 1\n"
    assert os.access(target / "bin" / "tool", os.X_OK)
    assert os.readlink(target / "lib64") == "lib"
    assert os.readlink(target / "python") == "/usr/bin/python3"


@pytest.mark.parametrize(
    "members",
    [
        pytest.param([(entry("../escaped"), b"x")], id="dot-dot name"),
        pytest.param([(entry("link", tarfile.SYMTYPE, linkname="{outside}"), None)], id="absolute link outside"),
        pytest.param([(entry("link", tarfile.SYMTYPE, linkname="../../.."), None)], id="relative link outside"),
        pytest.param(
            [(entry("link", tarfile.SYMTYPE, linkname="{outside}"), None), (entry("link/escaped"), b"x")],
            id="write through a link",
        ),
        pytest.param([(entry("pipe", tarfile.FIFOTYPE), None)], id="fifo"),
    ],
)
def test_what_the_data_filter_refuses_is_refused_and_nothing_lands_outside(
    tmp_path: Path, tar: str, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for info, _ in members:
        info.linkname = info.linkname.format(outside=outside)
    target = tmp_path / "deep" / "er" / "target"
    target.mkdir(parents=True)

    with pytest.raises(ArchiveError):
        unpack_with_gnu_tar(tar_stream(*members), target, budget=1 << 20, tar=tar)

    assert list(outside.iterdir()) == []
    assert not (tmp_path / "deep" / "er" / "escaped").exists()


def test_a_set_id_bit_never_survives(tmp_path: Path, tar: str) -> None:
    target = tmp_path / "target"
    stream = tar_stream((entry("tool", mode=0o4755), b"#!/bin/sh\n"))
    try:
        unpack_with_gnu_tar(stream, target, budget=1 << 20, tar=tar)
    except ArchiveError as error:
        assert "set-id" in str(error)
    else:
        assert not os.lstat(target / "tool").st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_a_bomb_is_stopped_at_its_budget(tmp_path: Path, tar: str) -> None:
    stream = tar_stream((entry("zeros"), bytes(80 << 20)))
    compressed = io.BytesIO(zstandard.ZstdCompressor().compress(stream.getvalue()))
    with pytest.raises(ArchiveTooLarge):
        unpack_with_gnu_tar(compressed, tmp_path / "target", budget=0, tar=tar)


def test_a_cut_short_pack_is_an_archive_error(tmp_path: Path, tar: str) -> None:
    whole = zstandard.ZstdCompressor().compress(tar_stream((entry("data"), os.urandom(300_000))).getvalue())
    with pytest.raises(ArchiveError):
        unpack_with_gnu_tar(io.BytesIO(whole[: len(whole) // 2]), tmp_path / "target", budget=1 << 30, tar=tar)
