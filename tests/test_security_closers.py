"""Security review of stop 23's new code (H7): what a process closing a file, a state
directory or a bucket can do to the daemon. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.parsers
import botocore.session
import pytest
import trio
from support.h7_processes import process
from support.mounts import Mount
from support.roots import build_root

from regfs import closers as closers_module
from regfs.closers import INLINE_DESCRIPTORS, MAX_CHILDREN, MAX_DESCRIPTORS, Close, Closers, Opener
from regfs.mountpoint import mounted_filesystem
from storage.drivers.s3 import LOCK_TTL, _lock_age
from storage.remote.uploads import MADE, MADE_MAX, UploadRecords

pytestmark = pytest.mark.mount  # the daemon's side of a mount (its scan of /proc)


class Scanned(Closers):
    """Closers that note each process whose descriptors a scan reads."""

    def __init__(self, mountpoint: str) -> None:
        super().__init__(mountpoint)
        self.scanned: list[int] = []

    def _held(self, pid: int, fds: list[str], inode: int) -> int | None:
        self.scanned.append(pid)
        return super()._held(pid, fds, inode)


def test_a_closer_with_thousands_of_children_is_scanned_for_max_children(tmp_path: Path) -> None:
    """A closer's children that hold no descriptor cost nothing against the scan's budget,
    and all of one thread's children were taken, however many: a writer that forked
    thousands had each one listed at each close, on the trio thread (every request of
    every user waits)."""
    closers = Scanned(str(tmp_path))
    with process("children", 1000) as pid:
        assert len(closers._children(pid)) <= MAX_CHILDREN
        assert closers._scan(pid, 1, {}, MAX_DESCRIPTORS) is Close.LAST
    assert len(closers.scanned) <= MAX_CHILDREN + 1


def test_a_closer_holding_many_descriptors_is_not_listed_whole_inline(tmp_path: Path) -> None:
    """The inline scan (on the trio thread) listed the closer's whole descriptor table
    before it looked at its budget: a writer holding 19,000 descriptors cost every close
    ~40 ms of the daemon's one thread (a million, seconds). Now it stops past the budget."""
    closers = Closers(str(tmp_path))

    def cpu(call: Any) -> float:
        start = time.thread_time()
        call()
        return time.thread_time() - start

    count = min(19_000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64)
    with process("descriptors", count) as pid:
        listing = statistics.median(
            cpu(lambda: os.listdir(f"/proc/{pid}/fdinfo")) for _ in range(5)
        )
        scans = [cpu(lambda: closers._scan(pid, 1, {}, INLINE_DESCRIPTORS)) for _ in range(5)]
        assert closers._scan(pid, 1, {}, INLINE_DESCRIPTORS) is None  # over budget: a thread's
    assert statistics.median(scans) < listing / 5, (scans, listing)


async def test_a_child_exiting_mid_scan_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child of the closer that exits between the open of one of its fdinfo files and the
    read (ENOENT) made the flush fail: close(2) of the writer returned ENOENT and its tag
    was not stored at that close. A child gone holds nothing."""
    child = subprocess.Popen(["sleep", "60"])
    held = tmp_path / "held"
    held.write_bytes(b"")

    class Exiting:
        """os, but the child exits just before its first fdinfo file is read."""

        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def read(self, fd: int, size: int) -> bytes:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/proc/{child.pid}/"):
                child.kill()
                child.wait()
            return os.read(fd, size)

    monkeypatch.setattr(closers_module, "os", Exiting())
    try:
        opener = Opener(os.getpid(), held.stat().st_ino)
        close = await Closers(str(tmp_path)).close_of(opener, threading.get_native_id(), {})
    finally:
        child.kill()
        child.wait()
    assert close is Close.LAST
    assert child.returncode is not None


@pytest.fixture
def forging_mount_point() -> Iterator[Callable[[Path, str], None]]:
    """forge(source, name): bind-mount source (as root: fusermount3 lets any user mount a
    FUSE file system of theirs) at name, which holds \r and \x1f: cut where str.splitlines
    and str.split cut, its line in /proc reads as another. Unmounted at the end."""
    top = Path(tempfile.mkdtemp(prefix="h7-forge-", dir="/tmp"))
    made: list[Path] = []

    def forge(source: Path, name: str) -> None:
        at = top / name  # its slashes make directories: the name of the last holds none
        at.mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(source), str(at)], check=True)
        made.append(at)

    try:
        yield forge
    finally:
        for at in reversed(made):
            subprocess.run(["umount", str(at)], check=True)
        shutil.rmtree(top)


async def test_a_mount_at_a_forging_name_cannot_steer_which_descriptors_are_this_mount_s(
    tmp_path: Path, mount: Callable[..., Mount], forging_mount_point: Callable[[Path, str], None]
) -> None:
    """The daemon found its device in its mountinfo with str.splitlines and str.split, which
    cut at \\r, \\x1c-\\x1f and U+2028 too; the kernel escapes only space, tab, newline and
    backslash in a name. Another user's mount at such a name (mounted after this one, so
    read as on top) named a device of its choosing as this mount's: a writer's descriptors
    on this mount then counted as none, so the close of a parent that handed its descriptor
    to a child ended the tag or upload under the child (half a file stored, EIO)."""
    await build_root(tmp_path / "root", size=1_000)
    mounted = mount(tmp_path / "root")
    # a line of device 6:66 mounted at this mount's mountpoint, after a "\r"
    forged = "\x1f".join(["x\r1", "2", "6:66", "/", os.path.realpath(mounted.mountpoint)])
    forging_mount_point(mounted.mountpoint, forged)
    closers = Closers(str(mounted.mountpoint))
    device = os.stat(mounted.mountpoint).st_dev
    with open(mounted.path("library", "demo", "tags", "latest"), "r+b") as held:
        opener = Opener(os.getpid(), os.fstat(held.fileno()).st_ino)
        close = await closers.close_of(opener, threading.get_native_id(), {})
    assert close is Close.NOT_LAST  # this process holds the tag
    assert closers._device == b"%d:%d" % (os.major(device), os.minor(device))


def test_a_mount_at_a_forging_name_cannot_show_a_mount_where_there_is_none(
    tmp_path: Path, forging_mount_point: Callable[[Path, str], None]
) -> None:
    """regfs/mountpoint.py reads /proc/mounts and mountinfo with str.splitlines and
    str.split: a mount at a name holding \r and \x1f shows a FUSE mount of its choosing at
    any path (here where nothing is mounted). By the same parse, mount_owner gives such a
    mount's user_id (its maker's) as the owner of the mount at a path, and root's
    `regfs umount` takes that user's look-alike for the daemon (not tested: another user
    cannot run a FUSE file system on this machine: /dev/fuse and Python are root's)."""
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    forging_mount_point(tmp_path, "\x1f".join(["x\ra", str(nothing), "fuse.evil", "rw"]))
    assert mounted_filesystem(str(nothing)) is None


@pytest.mark.storage
def test_an_s3_lock_whose_last_modified_cannot_be_read_is_live_not_a_crash() -> None:
    """The HEAD answer of a `.regfs-lock` object comes from the bucket's server: a
    Last-Modified botocore cannot parse (garbage, year 9999) is left out of the answer, and
    `_lock_age` raised KeyError: purge-uploads stopped at that upload (exit 2, nothing after
    it purged) and a writer taking the lock over failed EIO with a traceback."""
    model = botocore.session.get_session().get_service_model("s3")
    parser = botocore.parsers.create_parser("rest-xml")
    headers = {
        "date": "Mon, 30 Nov 2026 20:00:00 GMT",
        "last-modified": "Fri, 31 Dec 9999 23:59:59 GMT",
        "etag": '"0"',
    }
    answer = {"headers": headers, "status_code": 200, "body": b""}
    shape = model.operation_model("HeadObject").output_shape
    assert shape is not None
    head = parser.parse(answer, shape)
    assert "LastModified" not in head
    assert _lock_age(head) < LOCK_TTL


@pytest.mark.storage
@pytest.mark.parametrize("planted", ["link", "fifo", "directory", "huge", "deep", "not names"])
def test_what_is_planted_as_the_list_of_mkdir_s_repositories_is_none(
    tmp_path: Path, planted: str
) -> None:
    """The repositories made by mkdir over https:// are a file beside the upload records
    (`made-by-mkdir`): whatever is found there instead is read as no repository, at once,
    through no link and no more than 4 MiB, and the next mkdir replaces it (a link as a
    name: its target stays as it was)."""
    records = UploadRecords(tmp_path / "state" / "records", base=tmp_path / "state")
    assert records.made() == frozenset()
    made = tmp_path / "state" / "records" / MADE
    target = tmp_path / "target"
    target.write_text('["org/secret"]')
    match planted:
        case "link":
            made.symlink_to(target)
        case "fifo":
            os.mkfifo(made)
        case "directory":
            made.mkdir()
            (made / "x").write_text("[]")
        case "huge":
            made.write_text(json.dumps(["org/app"] * (MADE_MAX // 8)))
        case "deep":
            made.write_text("[" * 100_000 + "]" * 100_000)
        case "not names":
            made.write_text(json.dumps(["../..", "/etc", "org/app\n", {"a": 1}, "Org/App"]))
    records.close()  # read again, as another mount or a remount does
    started = time.monotonic()
    assert records.made() == frozenset()
    assert time.monotonic() - started < 1
    if planted != "directory":  # a directory cannot be replaced by a file: mkdir fails
        trio.run(records.change_made, "org/app")
        records.close()
        assert records.made() == frozenset({"org/app"})
    assert target.read_text() == '["org/secret"]'


def test_a_proc_of_another_pid_namespace_tells_no_closer() -> None:
    """FUSE numbers a request's thread in the daemon's pid namespace; a daemon started in a
    new one without a /proc of its own (`unshare --pid`, a container given the host's /proc)
    read another process's /proc under that number: its own thread 1 was the host's init,
    so the opener and the closer of a tag were whatever the host ran under their numbers.
    Now no closer is known there (each close with writes ends the file, as before stop 23)."""
    probe = (
        "import threading\n"
        "from regfs.closers import Closers\n"
        "print(Closers('/nowhere').thread_group(threading.get_native_id()))\n"
    )
    result = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-P", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout == "0\n", result.stderr
