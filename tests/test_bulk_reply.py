"""`pyfuse3.readdir_reply_many` (regfs's pyfuse3 build, third_party/pyfuse3) hands the kernel
exactly what one `readdir_reply` per entry hands it: two mounts of the small filesystem below,
one listing its directories entry by entry and one in bulk, show `ls`, `find` and `stat` the
same names, inodes, types, modes, owners, sizes and times, across many READDIRPLUS (each ends
at an entry that does not fit; the next resumes at its offset), with entries the bulk mount
hands one by one between bulk calls (as regfs's entries that need Python), names of 255 bytes
and non-ASCII names. Its lookups answer ENOENT, so whatever `stat` shows came in the listing.
Hostile arguments raise before anything is written. And the fields regfs packs for a run of a
listing (`Attributes.rows`) are what stat shows of each.

    python tests/test_bulk_reply.py MOUNTPOINT single|bulk   (the filesystem, mounted)
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from regfs import fusefeatures
from regfs.attributes import Attributes, packed
from regfs.inodes import InodeTable
from regfs.nodes import Attr, AttrColumns, Node
from regfs.options import MountOptions

ENTRIES = 3000
ONE_BY_ONE = 97  # the bulk mount hands every 97th entry with readdir_reply
PLUS, NAMED = pyfuse3.ROOT_INODE + 1, pyfuse3.ROOT_INODE + 2  # plus/ and named/
FIRST = 1000  # the inode of entry 0 (entry i: FIRST + i)
pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(
        not hasattr(pyfuse3, "readdir_reply_many"), reason="a pyfuse3 without the bulk reply"
    ),
]


def _name(i: int) -> bytes:
    if i == 5:
        return b"L" * 250 + b"%05d" % i  # 255 bytes
    if i % 10 == 3:
        return f"é-日本-{i}".encode()
    return b"f%05d" % i


def _fields(i: int) -> tuple[int, ...]:
    """Entry i's PACKED_FIELDS: a directory, a device node or a file, each its own owner,
    size and times (one before 1970)."""
    if i % 7 == 0:
        mode, nlink, rdev = stat.S_IFDIR | 0o750, 2 + i % 3, 0
    elif i % 13 == 0:
        mode, nlink, rdev = stat.S_IFCHR | 0o620, 1, os.makedev(4, i % 64)
    else:
        mode, nlink, rdev = stat.S_IFREG | (0o400 + i % 0o400), 1 + i % 2, 0
    size = i * 4099
    mtime = -1_500_000_000_123_456_789 if i == 9 else 1_600_000_000_123_456_789 + i * 1_000_000_007
    return (mode, nlink, 1000 + i % 5, 2000 + i % 3, rdev, size, (size + 511) // 512,
            4096 << (i % 3), mtime + 17, mtime, mtime + 3_000_000_001)  # fmt: skip


class ListingFs(pyfuse3.Operations):
    """plus/: ENTRIES entries with their attributes; named/: the same names by name and type
    only (lookup=False). Listed one by one or in bulk."""

    def __init__(self, bulk: bool) -> None:
        super().__init__()
        self.bulk = bulk
        self.names = [_name(i) for i in range(ENTRIES)]
        self.inodes = array("q", range(FIRST, FIRST + ENTRIES))
        self.fields = array("q", [f for i in range(ENTRIES) for f in _fields(i)])
        self.template = pyfuse3.EntryAttributes()
        self.template.entry_timeout = self.template.attr_timeout = 300
        self.template.generation = 7

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, PLUS, NAMED):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return _directory(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name in (b"plus", b"named"):
            return _directory(PLUS if name == b"plus" else NAMED)
        raise pyfuse3.FUSEError(errno.ENOENT)  # an entry's attributes come in its listing

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == pyfuse3.ROOT_INODE:
            for index, name in enumerate((b"plus", b"named")[start_id:]):
                entry = _directory(PLUS + start_id + index)
                if not pyfuse3.readdir_reply(token, name, entry, start_id + index + 1):
                    break
            return
        if fh not in (PLUS, NAMED):
            return  # plus/'s directories: empty
        lookup = fh == PLUS
        fields = self.fields if lookup else None
        index = start_id
        while index < ENTRIES:
            if not self.bulk or index % ONE_BY_ONE == 0:
                if not pyfuse3.readdir_reply(
                    token, self.names[index], self._entry(index, lookup), index + 1, lookup
                ):
                    return
                index += 1
                continue
            stop = min(ENTRIES, (index // ONE_BY_ONE + 1) * ONE_BY_ONE)
            done = pyfuse3.readdir_reply_many(
                token, self.names, self.inodes, fields, self.template, 0, index, stop, lookup
            )
            if done < stop:
                return
            index = done

    def _entry(self, i: int, packed: bool) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = FIRST + i
        entry.entry_timeout = entry.attr_timeout = 300
        entry.generation = 7
        if packed:
            for field, value in zip(pyfuse3.PACKED_FIELDS, _fields(i), strict=True):
                setattr(entry, field, value)
        return entry


def _directory(inode: int) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino, entry.st_mode = inode, stat.S_IFDIR | 0o755
    return entry


def _serve(mountpoint: str, mode: str) -> None:
    pyfuse3.init(ListingFs(mode == "bulk"), mountpoint, ["fsname=bulkreply", "ro"])
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


@contextlib.contextmanager
def _mounted(tmp_path: Path, mode: str) -> Iterator[Path]:
    from support.mounts import is_mounted, wait_until

    mountpoint = tmp_path / mode
    mountpoint.mkdir()
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    daemon = subprocess.Popen([sys.executable, __file__, str(mountpoint), mode], env=env)
    try:
        wait_until(lambda: is_mounted(mountpoint) or daemon.poll() is not None, what=mode)
        assert daemon.poll() is None, f"{mode} did not mount"
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


STAT = "%n %i %f %h %u %g %t:%T %s %b %B %o %X %x %Y %y %Z %z"  # every field stat shows


def _shown(mountpoint: Path) -> dict[str, str]:
    """What the tools see of both directories, each as one text."""

    def out(*args: str | Path) -> str:
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout

    plus, named = mountpoint / "plus", mountpoint / "named"
    return {
        "ls -lain": out("ls", "-lain", "--full-time", plus),
        "find": out("find", plus, named, "-printf", r"%i %y %P\n"),
        "stat": out("bash", "-c", f'cd "$1" && stat -c "{STAT}" *', "-", plus),
        "ls -f": out("ls", "-f", named),
    }


def test_a_listing_in_bulk_shows_what_one_by_one_shows(tmp_path: Path) -> None:
    with _mounted(tmp_path, "single") as single:
        one_by_one = _shown(single)
    with _mounted(tmp_path, "bulk") as bulk:
        in_bulk = _shown(bulk)
        names = os.listdir(bulk / "plus")
        long_name = os.stat(bulk / "plus" / _name(5).decode())
        before_1970 = os.stat(bulk / "plus" / _name(9).decode())
        device = os.stat(bulk / "plus" / _name(13).decode())
    for what, text in one_by_one.items():
        assert in_bulk[what] == text, what
    assert sorted(names) == sorted(_name(i).decode() for i in range(ENTRIES))
    assert long_name.st_ino == FIRST + 5 and long_name.st_size == 5 * 4099
    assert before_1970.st_mtime_ns == -1_500_000_000_123_456_789
    assert before_1970.st_ctime_ns == -1_500_000_000_123_456_789 + 3_000_000_001
    assert stat.S_ISCHR(device.st_mode) and device.st_rdev == os.makedev(4, 13)
    assert (device.st_uid, device.st_gid, device.st_blksize) == (1003, 2001, 8192)
    assert in_bulk["find"].count(" d ") == 2 + len(range(0, ENTRIES, 7))  # plus/, named/ too
    assert f"{FIRST + 3} f {_name(3).decode()}\n" in in_bulk["find"]  # named/'s, by d_ino


@pytest.mark.parametrize(
    ("names", "inodes", "fields", "start", "stop", "error"),
    [
        ([b"a", b"b"], [1], None, 0, 2, "2 names but 1 inodes"),
        ([b"a"], [1], [0] * 10, 0, 1, "1 names but 10 fields"),
        ([b"a"], [1], None, 0, 2, "entries 0 to 2 of 1"),
        ([b"a"], [1], None, 1, 0, "entries 1 to 0 of 1"),
        ([b"a"], [1], None, -1, 1, "entries -1 to 1 of 1"),
        ([b"a", "b"], [1, 2], None, 0, 2, "name 1 is not bytes"),
        ([b"a", b""], [1, 2], None, 0, 2, "name 1 is 0 bytes long"),
        ([b"x" * 256], [1], None, 0, 1, "name 0 is 256 bytes long"),
        ([b"a\0b"], [1], None, 0, 1, "NUL"),
        ([b"../etc"], [1], None, 0, 1, '"/"'),
    ],
)
def test_hostile_arguments_raise_before_anything_is_written(
    names: list[bytes], inodes: list[int], fields: list[int] | None, start: int, stop: int,
    error: str,
) -> None:  # fmt: skip
    token = pyfuse3.ReaddirToken()  # no request, no buffer: nothing may be written to it
    packed = None if fields is None else array("q", fields)
    with pytest.raises((ValueError, TypeError), match=error):
        pyfuse3.readdir_reply_many(
            token, names, array("q", inodes), packed, pyfuse3.EntryAttributes(), 0, start, stop
        )


def test_fields_must_be_int64s() -> None:
    with pytest.raises(TypeError, match="int64s"):
        pyfuse3.readdir_reply_many(
            pyfuse3.ReaddirToken(), [b"a"], array("i", [1]), None, pyfuse3.EntryAttributes(),
            0, 0, 1,
        )  # fmt: skip


def test_the_patch_is_detected() -> None:
    assert fusefeatures.REPLY_MANY


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])


@pytest.mark.parametrize(
    "attrs",
    [
        [Attr(False, 0, 0), Attr(False, 511, -1), Attr(False, 513, 10**18, True)],  # digests
        [Attr(True, 0, 5), Attr(True, 4096, 6)],  # directories
        [Attr(False, 1, 2), Attr(True, 3, 4), Attr(False, 5, 6, True, 0o20644, 7, 8, 1, 99)],
    ],
    ids=["files", "directories", "mixed"],
)
def test_packed_rows_are_what_stat_shows(attrs: list[Attr]) -> None:
    """`Attributes.rows` (the fields a listing goes with in bulk) against `_stat` of each."""
    options = MountOptions("root", "mnt", uid=1234, gid=5678, file_mode=0o640)
    attributes = Attributes(
        SimpleNamespace(started_ns=0),  # type: ignore[arg-type]
        options,
        InodeTable(),
        None,  # type: ignore[arg-type]
    )
    rows = attributes.rows(attrs)
    expected = [
        getattr(attributes._stat(attr), field)
        for attr in attrs
        for field in fusefeatures.PACKED_FIELDS
    ]
    assert rows.tolist() == expected


def test_packed_columns_are_what_stat_shows() -> None:
    """`attributes.packed` (an image's entries, a column at a time) against `_stat` of each
    as a fixed file: a file, a directory, a symlink, a device node, sizes about a block."""
    attrs = [
        Attr(False, 511, -1, True, stat.S_IFREG | 0o4755, 0, 0, 1),
        Attr(False, 513, 10**18, True, stat.S_IFREG | 0o600, 7, 8, 3),
        Attr(True, 0, 5, True, stat.S_IFDIR | 0o1777, 9, 10, 4),
        Attr(False, 6, 6, True, stat.S_IFLNK | 0o777, 0, 0, 1),
        Attr(False, 0, 7, True, stat.S_IFCHR | 0o620, 0, 5, 1, os.makedev(4, 64)),
    ]
    attributes = Attributes(
        SimpleNamespace(started_ns=0),  # type: ignore[arg-type]
        MountOptions("root", "mnt", uid=1234, gid=5678),
        InodeTable(),
        None,  # type: ignore[arg-type]
    )
    columns = AttrColumns(
        *([getattr(attr, name) for attr in attrs] for name in AttrColumns._fields)
    )
    expected = [
        getattr(attributes._stat(attr), field)
        for attr in attrs
        for field in fusefeatures.PACKED_FIELDS
    ]
    assert packed(columns).tolist() == expected


class Clashing(tuple[str, int], Node):
    """A node whose hash is its second field: two of them can derive one inode number."""

    __slots__ = ()

    def __hash__(self) -> int:
        return self[1]


def test_inode_all_numbers_as_inode_does_one_by_one() -> None:
    """A listing's new nodes are numbered at once (`inode_all`), as `inode` of each in turn
    numbers them: derived numbers, a hard link's two names one number, and a node whose
    derived number is taken (by one known, or one before it in the same run) the next of
    the counter. Both tables then map the same nodes and numbers both ways."""
    runs = [
        [Clashing(("a", 1)), Clashing(("b", 2)), Clashing(("a", 1))],  # all new, a hard link
        [Clashing(("b", 2)), Clashing(("c", 3)), Clashing(("d", 4))],  # one known
        [Clashing(("e", 5)), Clashing(("f", 5))],  # two new with one derived number
        [Clashing(("g", 3)), Clashing(("h", 6))],  # one whose number a known node has
    ]
    bulk, one_by_one = InodeTable(), InodeTable()
    for nodes in runs:
        numbers = bulk.inode_all(list(nodes))
        assert numbers.tolist() == [one_by_one.inode(node) for node in nodes]
    assert bulk._inodes == one_by_one._inodes and bulk._nodes == one_by_one._nodes
    assert len({bulk.inode(node) for nodes in runs for node in nodes}) == 8
