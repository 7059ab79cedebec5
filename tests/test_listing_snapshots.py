"""Review of session 21's listing speed-ups with real tools on a real mount.

- d9b0c32: a layers/ or manifests/ listing whose digests were all stated in bulk is the
  cached listing object itself, held by the readdir snapshot its offsets name. Whatever
  changes (a layer pushed with `cp`, one removed with `rm`, SIGHUP, --tag-ttl expiry, a
  registry DELETE beside the mount) while a reader is half way through, that reader ends
  its listing with exactly the names it began with, once each, and a reader that begins
  after the change sees it. Two readers at once, each a few entries at a time, while layers
  are pushed: each sees one state of the directory, whole.
- 8173149: entries whose attributes the daemon holds go to the kernel in runs
  (`readdir_reply_many`): what `ls -l`, `ls -i` and `find` show of them is what `stat`
  shows once the kernel dropped them (a LOOKUP each, one entry at a time), and a damaged
  layer in the middle of such a run is listed (size 0) and its stat is EIO, the entries
  after it listed with their own attributes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.mounts import Mount, hang_up, wait_until
from support.roots import build_root, write_tags
from support.tools import errno_of, run

from storage.digests import digest_bytes
from storage.paths import BlobData, LayerLink, path_for

pytestmark = pytest.mark.mount

NAME = "review/s21"
LAYERS = 400
_SYS_GETDENTS64 = 217  # x86_64
_LIBC = ctypes.CDLL(None, use_errno=True)


def add_layers(root: Path, count: int, first: int = 0) -> dict[str, bytes]:
    """`count` blobs of distinct sizes linked into NAME, written as the registry lays them out."""
    blobs: dict[str, bytes] = {}
    for i in range(first, first + count):
        data = b"layer %d " % i + b"x" * i
        digest = digest_bytes(data)
        for location, content in ((BlobData(digest), data), (LayerLink(NAME, digest), None)):
            path = root / path_for(location).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if content is not None else str(digest).encode())
        blobs[str(digest)] = data
    return blobs


def blob(i: int) -> tuple[str, bytes]:
    data = b"pushed %d" % i
    return str(digest_bytes(data)), data


class Reader:
    """A directory read a few entries at a time (getdents64 with a small buffer), as a
    reader that is slow, or that another thread interrupts, would."""

    def __init__(self, path: Path, size: int = 1024) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self.buffer = ctypes.create_string_buffer(size)
        self.names: list[str] = []

    def step(self) -> bool:
        """One getdents64: False once the listing ended."""
        got = _LIBC.syscall(_SYS_GETDENTS64, self.fd, self.buffer, len(self.buffer))
        if got < 0:
            raise OSError(ctypes.get_errno(), "getdents64")
        raw, at = self.buffer.raw, 0
        while at < got:
            reclen = int.from_bytes(raw[at + 16 : at + 18], "little")
            name = raw[at + 19 : at + reclen].split(b"\0", 1)[0].decode()
            if name not in (".", ".."):
                self.names.append(name)
            at += reclen
        return bool(got > 0)

    def rest(self) -> list[str]:
        try:
            while self.step():
                pass
        finally:
            os.close(self.fd)
        return self.names


def listing(path: Path) -> set[str]:
    return set(os.listdir(path))


@pytest.fixture
def root(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "root"
    return root, add_layers(root, LAYERS)


Changed = tuple[dict[str, bytes], set[str]]  # the layers added, the layers removed


def change_through_mount(m: Mount, root: Path, blobs: dict[str, bytes]) -> Changed:
    """cp a new layer in (a digest-named upload finishes on close), rm one."""
    digest, data = blob(1)
    (m.path(NAME, "uploads") / digest).write_bytes(data)
    gone = sorted(blobs)[LAYERS // 2]
    os.unlink(m.path(NAME, "layers", gone))
    return {digest: data}, {gone}


def change_beside_mount(m: Mount, root: Path, blobs: dict[str, bytes]) -> Changed:
    """A registry DELETE of one layer and a push of another beside the mount, then SIGHUP."""
    gone = sorted(blobs)[LAYERS // 3]
    shutil.rmtree((root / path_for(LayerLink(NAME, digest_bytes(blobs[gone]))).lstrip("/")).parent)
    added = add_layers(root, 1, first=LAYERS + 7)
    hang_up(m)
    return added, {gone}


def change_by_expiry(m: Mount, root: Path, blobs: dict[str, bytes]) -> Changed:
    """The same beside the mount, seen once --tag-ttl (0.3 s) passed, no SIGHUP."""
    gone = sorted(blobs)[LAYERS - 3]
    shutil.rmtree((root / path_for(LayerLink(NAME, digest_bytes(blobs[gone]))).lstrip("/")).parent)
    added = add_layers(root, 1, first=LAYERS + 11)
    time.sleep(0.6)
    return added, {gone}


def sorting_before(first: str) -> tuple[str, bytes]:
    """A blob whose digest sorts before `first`."""
    i = 0
    while (found := blob(i))[0] >= first:
        i += 1
    return found


def read_near_the_end(layers: Path, count: int) -> Reader:
    """A reader a few entries short of the end: the kernel's last READDIR (one page, more
    entries than its getdents buffer takes) was answered with the listing's end."""
    reader = Reader(layers, 700)
    while len(reader.names) < count - 8:  # a step takes 7 at most (96-byte dirents)
        assert reader.step()
    assert len(reader.names) < count
    return reader


@pytest.mark.parametrize("how", ["rm-first", "cp-first"])
def test_a_reader_near_the_end_sees_each_entry_once_when_an_earlier_one_changes(
    root: tuple[Path, dict[str, bytes]], mount: Callable[..., Mount], how: str
) -> None:
    """POSIX: an entry neither added nor removed since the reader began is returned once.
    A reader with a small getdents buffer (700 bytes: a slow `readdir(3)` loop has 32 KiB,
    as many entries fall out of a page) is a few entries short of the end when the first
    layer (sorted) is removed, or a layer sorting first is pushed, through the mount."""
    path, blobs = root
    m = mount(path, "--tag-ttl", "60")
    layers = m.path(NAME, "layers")
    reader = read_near_the_end(layers, LAYERS)
    if how == "rm-first":
        removed = {min(blobs)}
        os.unlink(layers / min(blobs))
    else:
        removed = set()
        digest, data = sorting_before(min(blobs))
        (m.path(NAME, "uploads") / digest).write_bytes(data)
    names = reader.rest()
    assert len(names) == len(set(names)), "an entry listed twice"
    assert set(blobs) - removed <= set(names), "an entry that stayed was skipped"


@pytest.mark.parametrize(
    "change",
    [change_through_mount, change_beside_mount, change_by_expiry],
    ids=["cp-and-rm", "beside-and-sighup", "beside-and-ttl"],
)
def test_a_reader_half_way_ends_the_listing_it_began(
    root: tuple[Path, dict[str, bytes]],
    mount: Callable[..., Mount],
    change: Callable[[Mount, Path, dict[str, bytes]], Changed],
) -> None:
    """The snapshot a reader's offsets name is the cached listing itself (d9b0c32): a
    change that drops or replaces the cached listing must leave the old list as it was.
    Two readers are half way (one began cold, one from the kernel's kept copy after a
    warm `ls -l`, which stated every digest in bulk) when the change comes."""
    path, blobs = root
    m = mount(path, "--tag-ttl", "0.3")
    layers = m.path(NAME, "layers")
    before = set(blobs)
    cold = Reader(layers)
    for _ in range(3):
        assert cold.step()
    run("ls", "-l", layers)
    warm = Reader(layers)
    for _ in range(5):
        assert warm.step()
    added, removed = change(m, path, blobs)
    after = {d: data for d, data in (blobs | added).items() if d not in removed}
    for which, reader in (("cold", cold), ("warm", warm)):  # removed ones may still show
        names = reader.rest()
        assert len(names) == len(set(names)), "an entry listed twice"
        assert before - removed <= set(names) <= before, which
    wait_until(lambda: listing(layers) == set(after), 3, "a new reader to see the change")
    assert {e.name: e.stat().st_size for e in os.scandir(layers)} == {
        d: len(data) for d, data in after.items()
    }


def test_two_readers_at_once_each_see_one_state_while_layers_are_pushed(
    root: tuple[Path, dict[str, bytes]], mount: Callable[..., Mount]
) -> None:
    """Two threads list layers/ over and over, a few entries per getdents each, while a
    third pushes layers with cp: every listing is the directory at one moment (the first
    layers, and the first k pushed), never a mix, never an entry twice."""
    path, blobs = root
    m = mount(path, "--tag-ttl", "0.2")
    layers, uploads = m.path(NAME, "layers"), m.path(NAME, "uploads")
    pushed = [blob(i) for i in range(100, 130)]
    order = {digest: k for k, (digest, _) in enumerate(pushed)}
    done = threading.Event()
    seen: list[list[str]] = []
    errors: list[BaseException] = []

    def read(size: int) -> None:
        try:
            while not done.is_set():
                seen.append(Reader(layers, size).rest())
        except BaseException as exc:  # reported below
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(size,)) for size in (700, 1500)]
    for reader in readers:
        reader.start()
    try:
        for digest, data in pushed:
            (uploads / digest).write_bytes(data)
            time.sleep(0.05)
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert not errors, errors
    assert len(seen) > 10
    for names in seen:
        assert len(names) == len(set(names)), "an entry listed twice"
        new = set(names) - set(blobs)
        assert set(blobs) <= set(names), "a layer missing"
        assert new == {d for d, k in order.items() if k < len(new)}, "not one state"
    assert listing(layers) == set(blobs) | set(order)


def stats_of(directory: Path) -> dict[str, tuple[int, ...]]:
    """What stat shows of each entry, asked name by name."""
    found: dict[str, tuple[int, ...]] = {}
    for name in os.listdir(directory):
        s = os.stat(directory / name)
        found[name] = (s.st_ino, s.st_mode, s.st_nlink, s.st_uid, s.st_gid, s.st_size,
                       s.st_blocks, s.st_blksize, s.st_mtime_ns, s.st_ctime_ns)  # fmt: skip
    return found


def listed_by_find(directory: Path) -> dict[str, tuple[str, ...]]:
    """What find shows of each entry from a listing with attributes (READDIRPLUS)."""
    out = run(
        "find", directory, "-mindepth", "1", "-printf", "%P %i %m %n %U %G %s %b %T@\\n"
    ).stdout.decode()
    return {line.split()[0]: tuple(line.split()[1:]) for line in out.splitlines()}


def test_entries_listed_in_runs_show_what_a_lookup_each_shows(
    root: tuple[Path, dict[str, bytes]], mount: Callable[..., Mount]
) -> None:
    """A first `find` of layers/ states every digest in bulk, then its READDIRPLUS hands
    them in runs (8173149), and find's stat of each within their 0.1 s entry timeout shows
    what the run handed (the kernel keeps it: attributes of a digest never time out). Each
    layer shows what a stat of it must: mode 644, one link, the mount's owner, its blob's
    size, blocks and mtime; `ls -i` (the kept listing's d_ino) the inode `stat` gives once
    its entry expired (a LOOKUP), and `find -inum` finds each by it."""
    path, blobs = root
    m = mount(path, "--tag-ttl", "60")
    layers = m.path(NAME, "layers")
    listed = listed_by_find(layers)
    by_ls = {
        name: int(number)
        for number, name in map(str.split, run("ls", "-i", layers).stdout.decode().splitlines())
    }
    time.sleep(0.2)  # each name's 0.1 s went: stat looks it up
    stated = stats_of(layers)
    assert set(listed) == set(stated) == set(by_ls) == set(blobs)
    for name, data in blobs.items():
        data_file = path / path_for(BlobData(digest_bytes(data))).lstrip("/")
        ino, mtime_ns = stated[name][0], data_file.stat().st_mtime_ns
        size, uid, gid = len(data), os.getuid(), os.getgid()
        want = (str(ino), "644", "1", str(uid), str(gid), str(size), str((size + 511) // 512))
        assert listed[name][:-1] == want, name
        assert abs(float(listed[name][-1]) - mtime_ns / 1e9) < 1e-3, name
        assert by_ls[name] == ino, name
        assert stated[name] == (ino, stat.S_IFREG | 0o644, 1, uid, gid, size, (size + 511) // 512,
                                1 << 20, mtime_ns, mtime_ns)  # fmt: skip
    for name in sorted(stated)[:: LAYERS // 8]:
        found = run("find", layers, "-inum", str(stated[name][0]), "-printf", "%P\\n")
        assert found.stdout.decode().split() == [name]


def test_a_damaged_layer_in_the_middle_of_a_run_is_listed_and_its_stat_is_eio(
    root: tuple[Path, dict[str, bytes]], mount: Callable[..., Mount]
) -> None:
    """A layer link holding garbage, in the middle of layers/: `ls -l` lists every layer
    (the damaged one with size 0, the daemon logs it), the ones after it with their own
    sizes (a run resumes after it), and its stat is EIO; listed again warm, the same."""
    path, blobs = root
    damaged = sorted(blobs)[LAYERS // 2]
    link = path / path_for(LayerLink(NAME, digest_bytes(blobs[damaged]))).lstrip("/")
    link.write_bytes(b"garbage")
    m = mount(path, "--tag-ttl", "60", allow_tracebacks=False)
    layers = m.path(NAME, "layers")
    for _ in range(2):
        sizes = {e.name: e.stat().st_size for e in os.scandir(layers) if e.name != damaged}
        assert set(os.listdir(layers)) == set(blobs)
        assert sizes == {d: len(data) for d, data in blobs.items() if d != damaged}
        out = run("ls", "-l", layers, check=False)
        lines = {line.split()[-1]: line for line in out.stdout.decode().splitlines()[1:]}
        assert set(lines) == set(blobs)
        assert lines[damaged].startswith("-?????????"), lines[damaged]
        assert damaged in out.stderr.decode()
        assert errno_of(lambda: os.stat(layers / damaged)) == errno.EIO
    assert damaged.removeprefix("sha256:")[:12] in m.log_text()


def test_a_tag_being_written_in_the_middle_of_a_run_shows_its_writer_size(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    """Tags read ahead (a first `ls -l`) are handed in runs; one tag in the middle has a
    writer open (`cp` of a manifest half way): the run stops before it (`Attributes.held`),
    it goes one by one with what its writer holds (the size written so far), and the run
    goes on after it. `ls -l` shows that size for it, every other tag its manifest's, and
    `ls -i` the inode stat gives."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    tags = [f"t{i:03d}" for i in range(120)]
    write_tags(root, NAME, image["digest"], tags)
    m = mount(root, "--tag-ttl", "60")
    listed = m.path(NAME, "tags")
    run("ls", "-l", listed)
    run("ls", "-l", listed)  # every tag's attributes held now
    half = image["manifest"][:100]
    with open(listed / "t060", "r+b") as writer:
        writer.truncate(0)
        writer.write(half)
        writer.flush()
        out = run("ls", "-ln", listed).stdout.decode().splitlines()[1:]
        sizes = {line.split()[-1]: int(line.split()[4]) for line in out}
        by_ls = dict(
            (name, int(number))
            for number, name in map(str.split, run("ls", "-i", listed).stdout.decode().splitlines())
        )
        assert sizes.pop("t060") == len(half)
        assert sizes == {tag: len(image["manifest"]) for tag in ["latest", *tags] if tag != "t060"}
        for tag in ("t000", "t059", "t060", "t061", "t119"):
            assert by_ls[tag] == os.stat(listed / tag).st_ino, tag
        writer.write(image["manifest"][100:])  # the last close stores what was written
