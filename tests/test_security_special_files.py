"""Nothing but a regular file (or a directory) in a storage root is ever opened.

A root's owner can plant a FIFO (no privilege needed), a socket, or, with CAP_MKNOD or in a
root copied from elsewhere, a device node where a link, a blob's data or an upload's lock
file belongs. The bulk reads of the stat worker (`bulkstat.contents`, `linked_stats`) and
the driver's reads and writers opened such a name before they looked at what it was
(O_NONBLOCK kept a FIFO from blocking, but a device's open runs its driver: a tape rewinds,
a terminal becomes the daemon's controlling terminal). Now each name is opened O_PATH,
fstat'ed, and only a regular file opened for its bytes (`bulkstat.open_regular`).

The witness is inotify's IN_OPEN on each planted node: the kernel reports every open of
the inode, by any process (the stat worker's too), O_NONBLOCK or not, and none for an O_PATH
open. (A FIFO's blocking open cannot witness it: every open here is O_NONBLOCK, which never
blocks.) Each test first checks that the witness sees an open it should see.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from support.mounts import Mount
from support.roots import build_root, write_tags
from support.statworkers import put_layers, stat_workers, worker_ready

from storage.digests import Digest
from storage.drivers import FilesystemDriver, bulkstat
from storage.drivers.base import PathNotFound
from storage.errors import CorruptEntry, UnsafeEntry
from storage.paths import BlobData, LayerLink, RevisionLink, TagCurrentLink, path_for

_libc = ctypes.CDLL(None, use_errno=True)
IN_OPEN = 0x20
IN_DONT_FOLLOW = 0x02000000
TARGET = b"sha256:" + b"0" * 64
SPECIAL = ("fifo", "socket", "device")
NAME = "library/demo"


class OpenWitness:
    """inotify IN_OPEN of each watched node itself (IN_DONT_FOLLOW: a symlink's own)."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.watched: dict[int, Path] = {}

    def watch(self, path: Path) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_DONT_FOLLOW)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.watched[wd] = path

    def opened(self) -> set[Path]:
        """The watched nodes opened since the last call."""
        found: set[Path] = set()
        while True:
            try:
                events = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            at = 0
            while at < len(events):
                wd, mask, _, length = struct.unpack_from("iIII", events, at)
                if mask & IN_OPEN and wd in self.watched:
                    found.add(self.watched[wd])
                at += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def witness() -> Iterator[OpenWitness]:
    w = OpenWitness()
    try:
        yield w
    finally:
        w.close()


def plant(path: Path, kind: str) -> Path:
    """A FIFO, a bound unix socket, or a character device with /dev/null's numbers (its
    open is harmless: the witness, not the device, tells whether it happened) at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:  # by its directory's descriptor: a sun_path holds 107 bytes at most
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(f"/proc/self/fd/{parent}/{path.name}")
        finally:
            os.close(parent)
    else:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    return path


@pytest.mark.storage
@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
@pytest.mark.parametrize("many", [False, True], ids=["in-process", "worker"])
async def test_bulk_reads_open_no_fifo_socket_device_or_symlink(
    tmp_path: Path, openat2: bool, many: bool
) -> None:
    """`contents` and `linked_stats` (inline, or past INLINE_ENTRIES in the stat worker) of
    links that are a FIFO, a socket, a device, a symlink out of the root, or a directory:
    None each, never opened; the plain link beside them is read (the witness sees it)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    d = root / "d"
    d.mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "data").write_bytes(b"blob")
    (d / "plain").write_bytes(TARGET)
    (d / "dir").mkdir()
    outside.write_bytes(TARGET)
    (d / "symlink").symlink_to(outside)
    planted = [plant(d / kind, kind) for kind in SPECIAL]
    names = ["plain", *SPECIAL, "symlink", "dir"]
    if many:  # past INLINE_ENTRIES (64): the stat worker's
        names *= 12
    drv = FilesystemDriver(root, openat2=openat2)
    if many:
        await worker_ready(drv)
    blob = (4, os.stat(root / "b" / "data").st_mtime_ns)
    with witness() as w:
        for path in (*planted, outside, d / "plain"):
            w.watch(path)
        with trio.fail_after(10):
            read = await drv.contents("/d", names)
            stated = await drv.linked_stats("/d", names, [TARGET] * len(names), "/b",
                                            ["data"] * len(names))  # fmt: skip
        assert w.opened() == {d / "plain"}  # the witness works: the plain link was read
        assert read == [(TARGET, os.stat(d / "plain").st_mtime_ns) if n == "plain" else None
                        for n in names]  # fmt: skip
        assert stated == [blob if n == "plain" else None for n in names]
        if many:
            assert stat_workers(), "the stat worker answered"
        for kind in SPECIAL:  # asked alone, as a listing then asks: absent, nothing opened
            with pytest.raises(PathNotFound):
                await drv.get_content(f"/d/{kind}")
            with pytest.raises(PathNotFound):
                await drv.reader(f"/d/{kind}")
        with pytest.raises(UnsafeEntry):
            await drv.get_content("/d/symlink")
        assert w.opened() == set()


@pytest.mark.storage
async def test_blob_data_that_is_a_device_is_stated_never_opened(tmp_path: Path) -> None:
    """A link of the right digest whose blob's `data` is a FIFO, socket or device: the bulk
    stat lstats it (None: no regular file) and a read refuses it, without an open."""
    root = tmp_path / "root"
    (root / "l").mkdir(parents=True)
    planted = [plant(root / kind / "data", kind) for kind in SPECIAL]
    for kind in SPECIAL:
        (root / "l" / kind).write_bytes(TARGET)
    drv = FilesystemDriver(root)
    with witness() as w:
        for path in planted:
            w.watch(path)
        stated = await drv.linked_stats(
            "/l", list(SPECIAL), [TARGET] * 3, "/", [f"{k}/data" for k in SPECIAL]
        )
        assert stated == [None] * 3
        for kind in SPECIAL:
            with pytest.raises(PathNotFound):
                await drv.reader(f"/{kind}/data")
        assert w.opened() == set()


@pytest.mark.storage
@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("where", ["data", "lock"])
async def test_a_writer_opens_no_fifo_socket_or_device(
    tmp_path: Path, kind: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload's data (or its writer's lock file, `data.regfs-lock`) planted as a FIFO, a
    socket or a device: the writer is refused (CorruptEntry: EIO, logged) and opens
    nothing; `being_written` takes such a lock file for none. Before, the data was opened
    O_RDWR (a device too, and without O_NOCTTY) and the lock O_WRONLY."""
    root = tmp_path / "root"
    up = root / "up"
    up.mkdir(parents=True)
    planted = plant(up / ("data" if where == "data" else "data.regfs-lock"), kind)
    drv = FilesystemDriver(root)
    with witness() as w:
        w.watch(planted)
        with trio.fail_after(5), pytest.raises(CorruptEntry):
            await drv.writer("/up/data")
        assert await drv.being_written("/up/data") is False
        assert w.opened() == set()
    assert "not a regular file: not opened" in caplog.text
    # A plain upload beside it still writes, locks and is seen as being written.
    writer = await drv.writer("/up/other")
    await writer.write_at(0, b"bytes")
    assert await drv.being_written("/up/other") is True
    await writer.aclose()
    assert (up / "other").read_bytes() == b"bytes"


@pytest.mark.storage
async def test_a_writers_symlinked_data_or_lock_is_refused_and_not_followed(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "up").mkdir(parents=True)
    outside.write_bytes(b"precious")
    (root / "up" / "data").symlink_to(outside)
    (root / "up" / "other.regfs-lock").symlink_to(outside)
    drv = FilesystemDriver(root)
    with witness() as w:
        w.watch(outside)
        for path in ("/up/data", "/up/other"):
            with pytest.raises(UnsafeEntry):
                await drv.writer(path)
        assert await drv.being_written("/up/other") is False
        assert w.opened() == set()
    assert outside.read_bytes() == b"precious"


def _errno_of(path: Path) -> int:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.mount
async def test_a_mount_lists_and_reads_around_planted_nodes_opening_none(
    tmp_path: Path, mount
) -> None:
    """Through a real mount: tag links, layer links, a manifest's revision link and blob
    data planted as FIFOs, sockets and devices (and a tag link that is a symlink out of the
    root), among 100 good tags and 100 good layers (so the listings' bulk reads go to the
    stat worker): `ls -l` of tags/, layers/ and manifests/ answers, each planted entry is
    ENOENT or EIO alone with a log line, nothing planted is ever opened, and the daemon
    keeps serving."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    image = await build_root(root, size=1000)
    put_layers(root, NAME, 100)
    write_tags(root, NAME, image["digest"], [f"good{i:03d}" for i in range(100)], index=False)
    outside.write_bytes(image["digest"].encode())
    planted: list[Path] = []

    def at(location: object) -> Path:
        return root / path_for(location).lstrip("/")  # type: ignore[arg-type]

    fake = [f"sha256:{i:064x}" for i in range(1, 4)]
    write_tags(root, NAME, image["digest"], [f"t-{k}" for k in SPECIAL] + ["t-symlink"])
    for kind in SPECIAL:
        planted.append(plant(at(TagCurrentLink(NAME, f"t-{kind}")), kind))
    link = at(TagCurrentLink(NAME, "t-symlink"))
    link.unlink()
    link.symlink_to(outside)
    for digest, kind in zip(fake, SPECIAL, strict=True):
        planted.append(plant(at(LayerLink(NAME, Digest.parse(digest))), kind))
        planted.append(plant(at(RevisionLink(NAME, Digest.parse(digest))), kind))
    # A layer whose link is right and whose blob data is a device.
    blob_digest = Digest.parse(f"sha256:{9:064x}")
    at(LayerLink(NAME, blob_digest)).parent.mkdir(parents=True)
    at(LayerLink(NAME, blob_digest)).write_bytes(str(blob_digest).encode())
    planted.append(plant(at(BlobData(blob_digest)), "device"))

    m: Mount = mount(root, "--tag-ttl", "0")
    repo = m.path(*NAME.split("/"))
    with witness() as w:
        for path in (*planted, outside):
            w.watch(path)
        for section in ("tags", "layers", "manifests"):
            done = subprocess.run(
                ["ls", "-l", str(repo / section)], capture_output=True, text=True, timeout=30
            )
            assert done.stdout.count("\n") > 0, done
        for kind in (*SPECIAL, "symlink"):
            assert _errno_of(repo / "tags" / f"t-{kind}") in (errno.ENOENT, errno.EIO), kind
        for digest in (*fake, str(blob_digest)):
            assert _errno_of(repo / "layers" / digest) in (errno.ENOENT, errno.EIO), digest
        for digest in fake:
            assert _errno_of(repo / "manifests" / digest) in (errno.ENOENT, errno.EIO)
        assert w.opened() == set(), "a planted node was opened"
    assert (repo / "tags" / "good042").read_bytes() == image["manifest"]
    assert (repo / "layers" / image["layer"]).read_bytes() == image["blobs"][image["layer"]]
    assert m.pids(), "the daemon lives"
    log = m.log_text()
    assert "is a FIFO, not a regular file" in log
    assert "is a character device, not a regular file" in log
    assert "a symbolic link in the storage root" in log


@pytest.mark.storage
def test_a_forked_child_reopens_through_its_own_descriptor_table(tmp_path: Path) -> None:
    """`open_regular`'s reopen goes through a descriptor of /proc/self/fd opened at import;
    a fork's child opens its own (os.register_at_fork): the inherited one names the
    parent's table, where the child's O_PATH descriptor is some other file or none."""
    (tmp_path / "f").write_bytes(b"the child's")
    dirfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 2
            try:
                fd, _ = bulkstat.open_regular(bulkstat.walk_open, dirfd, "f", bulkstat.READ)
                code = 0 if os.read(fd, 100) == b"the child's" else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(dirfd)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.storage
async def test_without_proc_the_name_is_opened_again_only_for_a_regular_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc is not mounted, a regular file is opened again by its name (and kept only
    if it is the inode fstat saw); a FIFO, socket or device is still never opened."""
    monkeypatch.setattr(bulkstat, "_FDS", [-1])
    d = tmp_path / "root" / "d"
    d.mkdir(parents=True)
    (d / "plain").write_bytes(TARGET)
    planted = [plant(d / kind, kind) for kind in SPECIAL]
    drv = FilesystemDriver(tmp_path / "root")
    with witness() as w:
        for path in planted:
            w.watch(path)
        read = await drv.contents("/d", ["plain", *SPECIAL])
        assert read == [(TARGET, os.stat(d / "plain").st_mtime_ns), None, None, None]
        assert await drv.get_content("/d/plain") == TARGET
        assert w.opened() == set()


@pytest.mark.storage
@pytest.mark.xfail(
    strict=True,
    reason="without /proc, `_reopen` opens the name again (O_NONBLOCK): a FIFO swapped in after "
    "the O_PATH open and its fstat is opened (a writer blocked on it is woken), then refused "
    "as another inode (ESTALE); security.md names only a device (CAP_MKNOD), mkfifo takes none",
)
def test_without_proc_a_fifo_swapped_in_before_the_second_open_is_not_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap is made where a racing renamer would win: after `open_regular`'s O_PATH open
    (the resolve's first call), before `_reopen`'s open by name (its second)."""
    monkeypatch.setattr(bulkstat, "_FDS", [-1])
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_bytes(TARGET)
    fifo = plant(d / "spare", "fifo")
    calls = []

    def racing(dirfd: int, path: str, flags: int, mode: int) -> int:
        calls.append(flags)
        if len(calls) == 2:  # the second open by name: a renamer swapped the FIFO in
            os.rename(fifo, d / "f")
        return bulkstat.walk_open(dirfd, path, flags, mode)

    dirfd = os.open(d, os.O_DIRECTORY)
    try:
        with witness() as w:
            w.watch(fifo)
            with pytest.raises(OSError) as caught:
                bulkstat.open_regular(racing, dirfd, "f", bulkstat.READ)
            assert caught.value.errno == errno.ESTALE
            assert w.opened() == set()
    finally:
        os.close(dirfd)
