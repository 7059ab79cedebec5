"""One driver suite, run for every driver; each test must leave the driver empty.

The filesystem driver runs twice: with openat2, and with the walk it falls back to where the
kernel lacks openat2. Then the attacks of whoever can write a storage root (issue 13): symlinks
and hard links to what lies outside it, and a reader's flock on an upload's data.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from support.users import OtherUser, shared_directory

from storage.drivers import (
    FilesystemDriver,
    InMemoryDriver,
    InvalidPath,
    PathNotFound,
    StorageDriver,
)
from storage.drivers.base import CONTENT_LIMIT
from storage.drivers.filesystem import LOCK_SUFFIX
from storage.drivers.s3 import ANYWHERE, MIN_PART, S3Driver
from storage.errors import Busy, CorruptEntry, InvalidOffset, UnsafeEntry
from storage.registry import Registry

pytestmark = pytest.mark.storage


@pytest.fixture(params=["inmemory", "filesystem", "filesystem-walk", "s3"])
def driver(request, tmp_path) -> StorageDriver:
    """conftest's driver, plus the filesystem driver on its openat2-less fallback, and the
    S3 driver on a moto server (multipart uploads looked for at every path, least parts)."""
    if request.param == "inmemory":
        return InMemoryDriver()
    if request.param == "s3":
        server = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        return S3Driver(
            bucket, "/regroot", client=server.client(), multipart=ANYWHERE, chunksize=MIN_PART
        )
    return FilesystemDriver(tmp_path / "root", openat2=request.param == "filesystem")


# What the S3 driver legitimately cannot do, and why: tests assert its documented behaviour
# for these instead, never skip silently.
S3_CANNOT = {
    "empty_directories": "S3 has no directories: one is there while some key lies below it",
    "write_below_the_end": "S3 uploads are written in order (SPEC §10): only a truncate cuts",
}


def can(drv: StorageDriver, capability: str) -> bool:
    return not (isinstance(drv, S3Driver) and capability in S3_CANNOT)


@pytest.fixture
async def drv(driver: StorageDriver):
    yield driver
    leftovers = [info.path async for info in driver.walk("/")]
    assert leftovers == [], f"test left {leftovers}"


async def test_being_written_is_asked_without_taking_the_lock(drv):
    """What purge-uploads asks before it deletes an upload: True while a writer holds the
    file, False before, after, and for a file that is not there."""
    assert not await drv.being_written("/w/data")
    writer = await drv.writer("/w/data")
    try:
        await writer.write_at(0, b"x")
        assert await drv.being_written("/w/data")
    finally:
        await writer.aclose()
    assert not await drv.being_written("/w/data")
    with trio.fail_after(1):  # the questions left no lock: no wait of LOCK_WAIT, no Busy
        await (await drv.writer("/w/data")).aclose()
    await drv.delete("/w")


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


async def test_get_content_reads_no_more_than_a_manifest_may_hold(drv):
    """A file over CONTENT_LIMIT (a hostile root's 'link' or 'manifest') is CorruptEntry,
    not read whole into memory; one at the limit is read."""
    await drv.put_content("/big/at", b"x" * CONTENT_LIMIT)
    assert len(await drv.get_content("/big/at")) == CONTENT_LIMIT
    await drv.put_content("/big/over", b"x" * (CONTENT_LIMIT + 1))
    with pytest.raises(CorruptEntry, match="too big"):
        await drv.get_content("/big/over")
    await drv.delete("/big")


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
    if can(drv, "write_below_the_end"):
        await w.write_at(2, b"XY")
    else:  # refused, nothing changes
        with pytest.raises(InvalidOffset):
            await w.write_at(2, b"XY")
    with pytest.raises(InvalidOffset):
        await w.write_at(20, b"gap")
    assert w.size == 8
    await w.truncate(4)
    await w.aclose()
    expected = b"abXY" if can(drv, "write_below_the_end") else b"abcd"
    assert await drv.get_content("/up/data") == expected
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
    if can(drv, "empty_directories"):
        for top in ("/src", "/dst"):
            assert await drv.list(top) == ([] if top == "/src" else ["deep"])
            await drv.delete(top)
    else:
        for top in ("/src", "/dst"):
            with pytest.raises(PathNotFound):
                await drv.stat(top)
    await drv.delete("/x")


async def test_walk_depth_first_sorted(drv):
    for path in ("/w/b/2", "/w/a", "/w/b/1"):
        await drv.put_content(path, b"")
    assert [i.path async for i in drv.walk("/w")] == ["/w/a", "/w/b", "/w/b/1", "/w/b/2"]
    await drv.delete("/w")


async def test_entries_say_what_stat_says(drv):
    """The walk's hook: a driver may answer from its listing, never differently from stat
    (a directory's time aside: S3 keeps none). A file being written counts its writes."""
    for path, data in (("/e/a-x", b"12"), ("/e/a/1", b"345"), ("/e/b", b"")):
        await drv.put_content(path, data)
    writer = await drv.writer("/e/c")
    try:
        await writer.write_at(0, b"written")
        entries = await drv.entries("/e")
        assert [i.path for i in entries] == [f"/e/{name}" for name in await drv.list("/e")]
        assert {"/e/a", "/e/a-x", "/e/b", "/e/c"} <= {i.path for i in entries}
        for info in entries:
            stat = await drv.stat(info.path)
            assert (info.size, info.is_dir) == (stat.size, stat.is_dir), info.path
            if not info.is_dir and info.path != "/e/c":
                assert info.mtime_ns == stat.mtime_ns, info.path
        assert next(i for i in entries if i.path == "/e/c").size == 7
        with pytest.raises(PathNotFound):
            await drv.entries("/e/b")  # a file
        with pytest.raises(PathNotFound):
            await drv.entries("/nothing")
    finally:
        await writer.aclose()
        await drv.delete("/e")


async def test_files_say_what_walk_says(drv):
    """A driver that lists a whole tree at once (`files`, S3) names every file the walk
    meets, with the same size and time; the others say None."""
    for path, data in (("/f/a-x", b"12"), ("/f/a/1", b"345"), ("/f/a/b/2", b"")):
        await drv.put_content(path, data)
    try:
        files = await drv.files("/f")
        assert await drv.files("/f", sizes=False) == files  # no upload in progress: the same
        if isinstance(drv, S3Driver):
            walked = [i async for i in drv.walk("/f") if not i.is_dir]
            assert sorted(files, key=str) == sorted(walked, key=str)
            assert {i.path for i in files} == {"/f/a-x", "/f/a/1", "/f/a/b/2"}
            assert await drv.files("/nothing") == []
        else:
            assert files is None
    finally:
        await drv.delete("/f")


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
async def test_bulk_reads_say_what_get_content_and_stat_say(drv, inline, monkeypatch):
    """`contents` and `linked_stats` (a listing's links and blobs, read in one call): the
    same bytes, size and time as one call each, a file stated only where its link holds
    just the target; None for what one call would not answer plainly, for the caller to ask
    it. A store without a cheaper way says None for the whole."""
    from storage.drivers import filesystem

    monkeypatch.setattr(filesystem, "INLINE_ENTRIES", 1_000 if inline else 0)
    for path, data in (("/c/a/link", b"sha256:a"), ("/c/b/link", b""), ("/c/d/x", b"x")):
        await drv.put_content(path, data)
    names = ["a/link", "b/link", "gone/link", "d", "d/x"]
    linked = [  # (the link, what it must hold, the file then stated)
        ("a/link", b"sha256:a", "d/x"),
        ("a/link", b"sha256:a", "d"),  # a directory
        ("a/link", b"sha256:", "d/x"),  # the link holds more
        ("a/link", b"sha256:ab", "d/x"),  # ... or less
        ("a/link", b"sha256:b", "d/x"),  # ... or other bytes
        ("b/link", b"", "d/x"),
        ("gone/link", b"", "d/x"),
        ("d", b"", "d/x"),  # a directory
        ("d/x", b"x", "a/link"),
        ("d/x", b"x", "gone"),
    ]
    links, targets, files = ([row[i] for row in linked] for i in range(3))
    try:
        read = await drv.contents("/c", names)
        stated = await drv.linked_stats("/c", links, targets, "/c", files)
        if not isinstance(drv, FilesystemDriver):
            assert (read, stated) == (None, None)
            return
        mtimes = {n: (await drv.stat(f"/c/{n}")).mtime_ns for n in ("a/link", "b/link", "d/x")}
        assert read == [
            (b"sha256:a", mtimes["a/link"]),
            (b"", mtimes["b/link"]),
            None,  # absent
            None,  # a directory
            (b"x", mtimes["d/x"]),
        ]
        x, link = (1, mtimes["d/x"]), (8, mtimes["a/link"])
        assert stated == [x, None, None, None, None, x, None, None, link, None]
        assert await drv.contents("/nothing", names[:2]) == [None, None]
        gone = await drv.linked_stats("/nothing", links[:1], targets[:1], "/c", files[:1])
        assert gone == [None]
        assert await drv.linked_stats("/c", [], [], "/c", []) == []
        with pytest.raises(ValueError, match="a target and a file for each link"):
            await drv.linked_stats("/c", links, targets[1:], "/c", files)
    finally:
        await drv.delete("/c")


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "/x", "x/", "a//b", "a/./b", "a/..", "sp ace", "ü", "a\nb"]
)
async def test_bulk_reads_refuse_names_that_are_no_relative_paths(drv, bad):
    """Every name of a bulk call is checked (all at once, then the culprit named)."""
    with pytest.raises(InvalidPath) as raised:
        await drv.contents("/c", ["ok", bad, "ok/x"])
    assert raised.value.path == bad
    for links, files in ((["ok", bad], ["ok", "ok"]), (["ok", "ok"], [bad, "ok"])):
        with pytest.raises(InvalidPath) as raised:
            await drv.linked_stats("/c", links, [b"", b""], "/c", files)
        assert raised.value.path == bad


async def test_bulk_reads_skip_what_is_no_small_regular_file(tmp_path):
    """A FIFO (whose open would block without a writer) and a file over CONTENT_LIMIT: None,
    as get_content refuses them; nothing hangs. A link that is a FIFO is None even while a
    writer holds it open having written just the target (the bulk call reads it by one
    pread, which a FIFO refuses, and takes no fstat)."""
    drv = FilesystemDriver(tmp_path / "root")
    d = tmp_path / "root" / "d"
    d.mkdir(parents=True)
    os.mkfifo(d / "fifo")
    os.mkfifo(d / "fed")
    (d / "big").write_bytes(b"x" * (CONTENT_LIMIT + 1))
    (d / "link").write_bytes(b"sha256:a")
    reader = os.open(d / "fed", os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open returns
    writer = os.open(d / "fed", os.O_WRONLY)
    try:
        os.write(writer, b"sha256:a")
        with trio.fail_after(5):
            assert await drv.contents("/d", ["fifo", "big", "fed"]) == [None, None, None]
            stated = await drv.linked_stats(
                "/d", ["fifo", "fed", "big", "link", "link"], [b"sha256:a"] * 5, "/d",
                ["big", "big", "link", "fifo", "big"],
            )  # fmt: skip
        assert stated == [
            None,
            None,
            None,
            None,
            (CONTENT_LIMIT + 1, os.stat(d / "big").st_mtime_ns),
        ]
        assert os.read(reader, 100) == b"sha256:a"  # nothing read from the FIFO
    finally:
        os.close(writer)
        os.close(reader)


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


HOLDER = """
import fcntl, os, sys
path, flags = sys.argv[1], getattr(os, sys.argv[2])
try:
    fd = os.open(path, flags | os.O_CREAT if flags != os.O_RDONLY else flags, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
except OSError as exc:
    print(exc.strerror, flush=True)
sys.stdin.read()
"""


@contextmanager
def flock_held(path: Path, flags: str, user: OtherUser | None = None) -> Iterator[str]:
    """Another process (as user, when given) that flocks path; yields what it said."""
    # The system's python for another user: the project's venv may be private to root.
    command = [sys.executable] if user is None else user.command("/usr/bin/python3")
    with subprocess.Popen(
        [*command, "-c", HOLDER, str(path), flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:  # closes its pipes at the end
        try:
            yield holder.stdout.readline().strip()
        finally:
            holder.kill()
            holder.wait()


async def test_writer_lock_holds_across_processes_and_dies_with_them(tmp_path):
    drv = FilesystemDriver(tmp_path / "root")
    await drv.put_content("/w/data", b"")
    with flock_held(tmp_path / "root" / "w" / f"data{LOCK_SUFFIX}", "O_WRONLY") as said:
        assert said == "locked"
        with pytest.raises(Busy):
            await drv.writer("/w/data")
    writer = await drv.writer("/w/data")  # a killed holder leaves no lock behind
    await writer.aclose()


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A root every user can reach."""
    with shared_directory(0o755) as top:
        yield top / "root"


async def test_a_reader_cannot_lock_the_writer_out(other_user, shared_root):
    """Issue 13, item 9: another user who can read an upload's data flocks it; the owner's
    writer must still open at once, and that user can open the lock file in no way."""
    drv = FilesystemDriver(shared_root)
    umask = os.umask(0o022)
    try:
        writer = await drv.writer("/up/data")
        await writer.write_at(0, b"first")
        await writer.aclose()
    finally:
        os.umask(umask)
    data = shared_root / "up" / "data"
    lock = shared_root / "up" / f"data{LOCK_SUFFIX}"
    assert lock.stat().st_mode & 0o777 == 0o600
    with flock_held(data, "O_RDONLY", other_user) as said:
        assert said == "locked"  # it can read the data, so it can flock it
        with trio.fail_after(1):  # well inside LOCK_WAIT: no waiting on that lock at all
            writer = await drv.writer("/up/data")
        await writer.write_at(5, b" second")
        await writer.aclose()
    assert data.read_bytes() == b"first second"
    for flags in ("O_RDONLY", "O_WRONLY", "O_RDWR"):
        with flock_held(lock, flags, other_user) as said:
            assert said == "Permission denied", flags


async def test_no_writer_through_a_hard_link(tmp_path):
    """A second name of an upload's data could be a file outside the root: never written."""
    drv = FilesystemDriver(tmp_path / "root")
    await drv.put_content("/up/keep", b"")
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    os.link(outside, tmp_path / "root" / "up" / "data")
    with pytest.raises(UnsafeEntry):
        await drv.writer("/up/data")
    assert outside.read_bytes() == b"precious"


# --------------------------------------------------------------------------- symlinks


@dataclass
class Planted:
    """A root holding symlinks to outside it: `file` to a secret file, `dir` to a directory
    holding a file `keep`, `loop` to itself, `dangling` to nothing, and a plain `real`."""

    drv: FilesystemDriver
    root: Path
    outside: Path

    def untouched(self) -> None:
        found = {
            str(p.relative_to(self.outside)): p.read_bytes() if p.is_file() else None
            for p in sorted(self.outside.rglob("*"))
        }
        assert found == {"secret": b"secret", "dir": None, "dir/keep": b"keep"}


@pytest.fixture(params=["openat2", "walk"])
def planted(request, tmp_path) -> Planted:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    (outside / "dir" / "keep").write_bytes(b"keep")
    (root / "a").mkdir(parents=True)
    (root / "a" / "real").write_bytes(b"real")
    (root / "a" / "file").symlink_to(outside / "secret")
    (root / "a" / "dir").symlink_to(outside / "dir")
    (root / "a" / "loop").symlink_to(root / "a" / "loop")
    (root / "a" / "dangling").symlink_to(outside / "nothing")
    return Planted(FilesystemDriver(root, openat2=request.param == "openat2"), root, outside)


THROUGH = ["/a/file", "/a/dir/keep", "/a/loop", "/a/loop/x", "/a/dangling", "/a/dir/new"]


@pytest.mark.parametrize("path", THROUGH)
async def test_no_read_or_stat_through_a_symlink(planted, path, caplog):
    drv = planted.drv
    for call in (drv.get_content, drv.reader, drv.stat, drv.list):
        with pytest.raises(UnsafeEntry):
            await call(path)
    assert "symbolic link" in caplog.text
    planted.untouched()


@pytest.mark.parametrize("path", THROUGH)
async def test_no_write_through_a_symlink(planted, path):
    drv = planted.drv
    with pytest.raises(UnsafeEntry):
        await drv.writer(path)
    with pytest.raises(UnsafeEntry):
        await drv.move("/a/real", path + "/x")
    with pytest.raises(UnsafeEntry):
        await drv.move(path, "/b")
    with pytest.raises(UnsafeEntry):
        await drv.put_content(path + "/x", b"x")
    planted.untouched()
    assert (planted.root / "a" / "real").read_bytes() == b"real"


async def test_put_content_replaces_a_symlink_never_its_target(planted):
    await planted.drv.put_content("/a/file", b"new")
    assert not (planted.root / "a" / "file").is_symlink()
    assert await planted.drv.get_content("/a/file") == b"new"
    planted.untouched()


async def test_listing_leaves_symlinks_out(planted):
    drv = planted.drv
    assert await drv.list("/a") == ["real"]
    assert await drv.symlinks("/a") == ["dangling", "dir", "file", "loop"]
    assert [i.path async for i in drv.walk("/")] == ["/a", "/a/real"]
    with pytest.raises(PathNotFound):
        await drv.symlinks("/nope")


async def test_bulk_reads_follow_no_symlink(planted, caplog):
    """A listing's links and blobs read in one call resolve each name beneath its directory
    as every other call does: a symlink anywhere (the directory itself too) is None, for the
    call that follows to refuse and log; nothing outside is read."""
    drv = planted.drv
    names = ["real", "file", "dir/keep", "loop", "loop/x", "dangling", "dir"]
    assert await drv.contents("/a", names) == [
        (b"real", (await drv.stat("/a/real")).mtime_ns),
        *[None] * 6,
    ]
    real = (4, (await drv.stat("/a/real")).mtime_ns)
    held = [b"real"] * len(names)
    assert await drv.linked_stats("/a", ["real"] * 7, held, "/a", names) == [real, *[None] * 6]
    assert await drv.linked_stats("/a", names, held, "/a", ["real"] * 7) == [real, *[None] * 6]
    assert await drv.contents("/a/dir", ["keep"]) == [None]
    assert await drv.linked_stats("/a/dir", ["keep"], [b"keep"], "/a", ["real"]) == [None]
    assert await drv.linked_stats("/a", ["real"], [b"real"], "/a/dir", ["keep"]) == [None]
    planted.untouched()


async def test_delete_removes_links_not_their_targets(planted):
    drv = planted.drv
    with pytest.raises(UnsafeEntry):
        await drv.delete("/a/dir/keep")
    await drv.delete("/a/dir")  # the link itself
    assert not (planted.root / "a" / "dir").exists()
    (planted.root / "a" / "sub").mkdir()
    (planted.root / "a" / "sub" / "hashstates").symlink_to(planted.outside / "dir")
    await drv.delete("/a")  # a tree holding links: each unlinked, none followed
    assert not (planted.root / "a").exists()
    planted.untouched()


async def test_delete_of_a_deep_tree_opens_no_fifo_and_follows_no_swap(tmp_path, monkeypatch):
    """A tree 3,000 directories deep goes without recursion; a FIFO in it is unlinked, never
    opened (an open would block); a directory swapped for a link to one outside while the
    tree is removed is unlinked as a name: what it pointed at stays."""
    from storage.drivers import removal

    root = tmp_path / "root"
    (root / "up").mkdir(parents=True)
    fd = os.open(root / "up", os.O_RDONLY)
    for _ in range(3000):  # deeper than PATH_MAX: made through descriptors
        os.mkdir("d", dir_fd=fd)
        fd, above = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(above)
    os.mkfifo("fifo", dir_fd=fd)
    os.close(fd)
    (root / "up" / "d" / "swapped" / "x").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    real_open = os.open

    def swapping_open(path, flags, mode=0o777, *, dir_fd=None):
        if path == "swapped":
            os.rename("swapped", "gone", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.symlink(outside, "swapped", dir_fd=dir_fd)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(removal.os, "open", swapping_open)
    with trio.fail_after(30):
        await FilesystemDriver(root).delete("/up")
    assert not (root / "up").exists()
    assert (outside / "keep").is_dir()


async def test_a_symlinked_parent_is_refused_when_making_directories(planted):
    drv = planted.drv
    for path in ("/a/dir/deeper/new", "/a/file/new"):
        with pytest.raises(UnsafeEntry):
            await drv.put_content(path, b"x")
        with pytest.raises(UnsafeEntry):
            await drv.writer(path)
    planted.untouched()


async def test_without_openat2_paths_are_walked(tmp_path, monkeypatch):
    """A kernel (or seccomp filter) without openat2: ENOSYS once, then the walk, for good."""
    from storage.drivers import filesystem

    def enosys(*args: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(filesystem, "_openat2", enosys)
    monkeypatch.setattr(filesystem, "_openat2_works", None)
    drv = FilesystemDriver(tmp_path / "root")
    assert drv._resolve is filesystem._walk_open
    await drv.put_content("/a/b", b"x")
    (tmp_path / "root" / "a" / "c").symlink_to(tmp_path)
    with pytest.raises(UnsafeEntry):
        await drv.stat("/a/c/root")
    assert await drv.get_content("/a/b") == b"x"


async def test_uploads_through_symlinks_touch_nothing_outside(planted):
    """An upload's `data` linked to a file outside (append, truncate) and its hash states
    linked to a directory outside (old states deleted there): resuming is refused, and
    nothing outside changes; purging the upload removes the links alone."""
    registry = Registry(planted.drv)
    layers = registry.repository("org/app").layers
    linked_data, linked_states = await layers.upload(), await layers.upload()
    for upload in (linked_data, linked_states):
        await upload.write(b"partial")
        await upload.close()
    uploads = planted.root / "docker/registry/v2/repositories/org/app/_uploads"
    (uploads / linked_data.uuid / "data").unlink()
    (uploads / linked_data.uuid / "data").symlink_to(planted.outside / "secret")
    shutil.rmtree(uploads / linked_states.uuid / "hashstates" / "sha256")
    (uploads / linked_states.uuid / "hashstates" / "sha256").symlink_to(planted.outside / "dir")
    for upload in (linked_data, linked_states):
        with pytest.raises(UnsafeEntry):
            resumed = await layers.resume(upload.uuid)
            await resumed.truncate(0)
            await resumed.cancel()
    planted.untouched()
    for upload in (linked_data, linked_states):
        await planted.drv.delete(f"/docker/registry/v2/repositories/org/app/_uploads/{upload.uuid}")
    assert await layers.uploads() == []
    planted.untouched()
