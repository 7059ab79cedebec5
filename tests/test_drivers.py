"""One driver suite, run for every driver; each test must leave the driver empty."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from storage.drivers import FilesystemDriver, InvalidPath, PathNotFound, StorageDriver
from storage.errors import Busy, InvalidOffset


@pytest.fixture
async def drv(driver: StorageDriver):
    yield driver
    leftovers = [info.path async for info in driver.walk("/")]
    assert leftovers == [], f"test left {leftovers}"


async def test_put_get_stat_delete(drv):
    await drv.put_content("/a/b/c", b"hello")
    assert await drv.get_content("/a/b/c") == b"hello"
    info = await drv.stat("/a/b/c")
    assert (info.size, info.is_dir) == (5, False)
    assert (await drv.stat("/a/b")).is_dir
    await drv.put_content("/a/b/c", b"replaced")
    assert await drv.get_content("/a/b/c") == b"replaced"
    await drv.delete("/a")
    with pytest.raises(PathNotFound):
        await drv.stat("/a/b/c")


async def test_missing_paths(drv):
    for call in (drv.get_content, drv.stat, drv.list, drv.delete, drv.reader):
        with pytest.raises(PathNotFound):
            await call("/nope")
    with pytest.raises(PathNotFound):
        await drv.move("/nope", "/other")


async def test_list_is_sorted_names(drv):
    for name in ("b", "a", "c/d"):
        await drv.put_content(f"/dir/{name}", b"x")
    assert await drv.list("/dir") == ["a", "b", "c"]
    assert "dir" in await drv.list("/")
    await drv.delete("/dir")


async def test_reader_at_offsets(drv):
    data = os.urandom(300_000)
    await drv.put_content("/f", data)
    reader = await drv.reader("/f")
    assert reader.size == len(data)
    assert await reader.read_at(123_456, 1000) == data[123_456:124_456]
    assert await reader.read_at(299_990, 100) == data[299_990:]
    assert await reader.read_at(400_000, 10) == b""
    with pytest.raises(InvalidOffset):
        await reader.read_at(-1, 10)
    await reader.aclose()
    await drv.delete("/f")


async def test_writer_appends_overwrites_truncates_refuses_gaps(drv):
    w = await drv.writer("/up/data")
    assert w.size == 0
    await w.write_at(0, b"abcdef")
    await w.write_at(6, b"gh")
    await w.write_at(2, b"XY")
    with pytest.raises(InvalidOffset):
        await w.write_at(20, b"gap")
    assert w.size == 8
    await w.truncate(4)
    await w.aclose()
    assert await drv.get_content("/up/data") == b"abXY"
    w = await drv.writer("/up/data")  # reopening keeps the content
    assert w.size == 4
    await w.aclose()
    await drv.delete("/up")


async def test_move_replaces_and_creates_parents(drv):
    await drv.put_content("/src/f", b"new")
    await drv.put_content("/dst/deep/f", b"old")
    await drv.move("/src/f", "/dst/deep/f")
    assert await drv.get_content("/dst/deep/f") == b"new"
    await drv.move("/dst/deep/f", "/x/y/z")
    with pytest.raises(PathNotFound):
        await drv.stat("/dst/deep/f")
    assert await drv.get_content("/x/y/z") == b"new"
    for top in ("/src", "/dst", "/x"):
        await drv.delete(top)


async def test_walk_depth_first_sorted(drv):
    for path in ("/w/b/2", "/w/a", "/w/b/1"):
        await drv.put_content(path, b"")
    assert [i.path async for i in drv.walk("/w")] == ["/w/a", "/w/b", "/w/b/1", "/w/b/2"]
    await drv.delete("/w")


@pytest.mark.parametrize(
    "bad", ["", "relative", "/a/../b", "/..", "/a/./b", "/a//b", "/a/", "/a\0b", "/sp ace", "/ü"]
)
async def test_invalid_paths_never_reach_the_driver(drv, bad):
    with pytest.raises(InvalidPath):
        await drv.put_content(bad, b"x")
    with pytest.raises(InvalidPath):
        await drv.get_content(bad)


async def test_filesystem_root_cannot_be_escaped(tmp_path):
    drv = FilesystemDriver(tmp_path / "root")
    (tmp_path / "outside").write_bytes(b"secret")
    for path in ("/../outside", "/x/../../outside"):
        with pytest.raises(InvalidPath):
            await drv.get_content(path)
    await drv.put_content("/inside", b"ok")
    assert (tmp_path / "root" / "inside").read_bytes() == b"ok"
    assert not [p for p in os.listdir(tmp_path / "root") if p.startswith(".tmp-")]


async def test_filesystem_file_modes_follow_umask_like_the_registry(tmp_path):
    """The registry creates files 0666 minus umask; mkstemp's 0600 would lock out a registry
    running as another user (Debian's service user) from the links regfs writes."""
    drv = FilesystemDriver(tmp_path / "root")
    umask = os.umask(0o022)
    try:
        await drv.put_content("/a/link", b"x")
        writer = await drv.writer("/a/data")
        await writer.aclose()
    finally:
        os.umask(umask)
    for name in ("link", "data"):
        assert (tmp_path / "root" / "a" / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "root" / "a").stat().st_mode & 0o777 == 0o755


async def test_one_writer_at_a_time(drv):
    first = await drv.writer("/w/data")
    with pytest.raises(Busy):
        await drv.writer("/w/data")
    await first.aclose()
    second = await drv.writer("/w/data")
    await second.aclose()
    await drv.delete("/w")


async def test_writer_lock_holds_across_processes_and_dies_with_them(tmp_path):
    drv = FilesystemDriver(tmp_path / "root")
    await drv.put_content("/w/data", b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR);"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(tmp_path / "root" / "w" / "data"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Busy):
            await drv.writer("/w/data")
    finally:
        holder.kill()
        holder.wait()
    writer = await drv.writer("/w/data")  # a killed holder leaves no lock behind
    await writer.aclose()
