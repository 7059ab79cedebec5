"""Loading a kept layer index and merged tree fast without trusting them more: the name
columns split at once (`indexfile.names`), the paths' plainness checked in one scan, the
tables' fingerprints taken from the file's bytes, and the breadth-first numbering of a
tree file checked by runs (`treefile._breadth_first`), each against the slower way it
replaces, on ordinary and hostile input."""

from __future__ import annotations

import gc
import io
import json
import random
from array import array

import pytest
import zstandard

from storage.digests import digest_bytes
from storage.rootfs import cache as cachemod
from storage.rootfs import indexfile, treefile
from storage.rootfs.cache import IndexCache
from storage.rootfs.index import Format, LayerIndex
from storage.rootfs.members import Kind, Member, Table
from storage.rootfs.merge import MAX_NODES, MergedTree, merge
from storage.rootfs.tarscan import normal_name

pytestmark = pytest.mark.storage

ODD_NAMES = ["a\0b", "\x01", "x\x01\x02y", "\0", "é/\udcff", "", "..a", "a./b"]


def _member(path: str, kind: Kind = Kind.FILE, linkname: str = "") -> Member:
    return Member(path, kind, 0o644, 0, 0, 0, linkname=linkname)


def _stored(cache: IndexCache, members: list[Member]) -> list[Member]:
    digest = digest_bytes(repr(members).encode())
    cache.store(LayerIndex(digest, Format.TAR, 10, 10, members))
    loaded = cache.load(digest)
    assert loaded is not None
    return loaded.members


@pytest.fixture
def cache(tmp_path):
    index_cache = IndexCache(tmp_path / "index")
    yield index_cache
    index_cache.close()


def test_names_that_hold_a_nul_or_the_escape_read_back_as_written(cache):
    """Names are split at their NULs: one that holds a NUL (a PAX path may) is escaped."""
    members = [_member(name) for name in ODD_NAMES]
    members += [_member("l", Kind.SYMLINK, linkname=name) for name in ODD_NAMES]
    loaded = _stored(cache, members)
    assert [(m.path, m.linkname) for m in loaded] == [
        (normal_name(m.path), m.linkname) for m in members
    ]
    column = indexfile.names(["a", "b\0", "c\x01"])
    assert column == b"a\0b\x01\x02\0c\x01\x01\0" and indexfile.names(["a", ""]) == b"a\0\0"


@pytest.mark.parametrize(
    ("column", "count"),
    [
        (b"a\0b\0", 3),  # fewer names than members
        (b"a\0b\0c\0", 2),  # more
        (b"a\0b", 2),  # the last one not ended
        (b"a\x01z\0b\0", 2),  # an escape no writer writes
        (b"a\x01\0b\0", 2),  # an escape cut off by the name's end
    ],
)
def test_a_column_of_names_that_does_not_fit_is_not_trusted(column, count):
    block = cachemod._Block(memoryview(indexfile.SIZE.pack(len(column)) + column))
    with pytest.raises(cachemod.CorruptIndex):
        block.names(count)
    short = cachemod._Block(memoryview(indexfile.SIZE.pack(len(column) + 1) + column))
    with pytest.raises(cachemod.CorruptIndex):
        short.names(count)


def test_paths_checked_in_one_scan_are_what_each_checked_alone_gives():
    """`_normal_paths` returns exactly what `normal_name` gives each path, whatever the
    paths hold (empty ones, NULs, the escape, dots, slashes, bytes that were not UTF-8),
    and the list itself when all are plain."""
    rng = random.Random(22)
    parts = ["a", "bc", ".", "..", "/", "", "\0", "\x01", "\udcff", "é", ".wh.", "x.y", "a."]
    plain = ["etc/passwd", "usr/lib/x.so", "a\0b", "é/\udcff", "x\x01y", "a.b/c..d"]
    for _ in range(3000):
        paths = [
            "".join(rng.choices(parts, k=rng.randint(0, 6))) if rng.random() < 0.3
            else rng.choice(plain)
            for _ in range(rng.randint(1, 6))
        ]  # fmt: skip
        checked = cachemod._normal_paths(paths, indexfile.names(paths))
        assert checked == [normal_name(p) for p in paths], paths
    usual = plain[:-1]  # "c..d": two dots together send them to `normal_name`, unchanged
    assert cachemod._normal_paths(usual, indexfile.names(usual)) is usual
    first = ["", *usual]  # the image root first: no scan of each path either
    assert cachemod._normal_paths(first, indexfile.names(first)) is first


def test_a_stored_tables_fingerprint_is_the_one_its_members_give(cache):
    """Taken from the file's bytes as they are read, it equals the one computed from the
    members (a fresh pass's table, whose tree is stored before any load), and it changes
    with what the merge reads of a table."""
    members = [
        _member("", Kind.DIR),
        _member("d", Kind.DIR),
        _member("d/a\0b"),
        _member("d/\udcff", Kind.SYMLINK, linkname="x\x01"),
        _member("h", Kind.HARDLINK, linkname="d/\udcff"),
    ] + [_member(f"d/{n}") for n in range(5000)]  # more than one block
    loaded = _stored(cache, members)
    assert isinstance(loaded, Table) and loaded == members
    assert treefile.fingerprint(loaded) == treefile.fingerprint(members)
    for other in (
        [*members[:2], members[2]._replace(path="d/a\0c"), *members[3:]],
        [*members[:3], members[3]._replace(linkname="x"), *members[4:]],
        [*members[:4], members[4]._replace(kind=Kind.SYMLINK), *members[5:]],
        members[:-1],
    ):
        assert treefile.fingerprint(other) != treefile.fingerprint(members)


def _random_table(rng: random.Random, size: int) -> list[Member]:
    """Directories, files and hard links (some to files named later) in random order."""
    dirs = [""]
    files: list[str] = []
    table = []
    for n in range(size):
        where = rng.choice(dirs)
        path = f"{where}/{n}" if where else str(n)
        roll = rng.random()
        if roll < 0.25:
            dirs.append(path)
            table.append(_member(path, Kind.DIR))
        elif roll < 0.4 and files:
            table.append(_member(path, Kind.HARDLINK, linkname=rng.choice(files)))
        else:
            files.append(path)
            table.append(_member(path))
    return table


def _owners(count: array) -> list[int]:
    return [ino for ino, n in enumerate(count, 1) for _ in range(n)]


def _parts(tree: MergedTree) -> tuple[array, list[int], list[bool]]:
    members, _, count, child, _ = tree.parts()
    return child, _owners(count), [m.kind is Kind.DIR for m in members]


def _moved(tree: MergedTree, rng: random.Random) -> list[int]:
    """The tree's entries' directories with one entry moved to another directory (the
    entries in their order): a directory below itself or a later one, often."""
    members, _, count, _, _ = tree.parts()
    dirs = [ino for ino, m in enumerate(members, 1) if m.kind is Kind.DIR]
    changed = array("I", count)
    changed[rng.choice([d for d in dirs if changed[d - 1]]) - 1] -= 1
    changed[rng.choice(dirs) - 1] += 1
    return _owners(changed)


def _same_links(child: array, owners: list[int], is_dir: list[bool]) -> None:
    """`_breadth_first` gives what `_any_order` gives, or None where that one raises."""
    try:
        expected = treefile._any_order(child, owners, is_dir)
    except treefile.StaleTree:
        assert treefile._breadth_first(child, owners, is_dir) is None
        return
    found = treefile._breadth_first(child, owners, is_dir)
    assert found is None or found == expected


def test_breadth_first_runs_give_what_every_entry_checked_gives():
    """Trees the merge made (found by runs unless they have many hard links), then the same
    with their entries changed at random (an entry twice, one missing, a directory as a
    further name, numbers out of order): never accepted where the check of
    every entry refuses, and the same parents and link counts where both accept. Or an
    entry moved to another directory: numbered as the merge numbers, but below itself or
    a later directory (a cycle)."""
    rng = random.Random(16)
    found = 0
    for size in [0, 1, 2, 5, 30, 300, 2000]:
        for _ in range(8):
            tree = merge([_random_table(rng, size)])
            child, owners, is_dir = _parts(tree)
            links = treefile._breadth_first(child, owners, is_dir)
            if len(child) - (len(tree) - 1) <= treefile._FEW_LINKS:
                assert links == treefile._any_order(child, owners, is_dir)
                found += 1
            for _ in range(20 if child else 0):
                changed = array("I", child)
                at = rng.randrange(len(changed))
                change = rng.random()
                if change < 0.2:
                    _same_links(changed, _moved(tree, rng), is_dir)
                    continue
                if change < 0.4:
                    other = rng.randrange(len(changed))
                    changed[at], changed[other] = changed[other], changed[at]
                elif change < 0.8:
                    changed[at] = rng.randrange(0, len(tree) + 3)
                else:
                    changed.insert(at, rng.randrange(2, len(tree) + 1))
                    owners_ = [*owners[:at], owners[at], *owners[at:]]
                    _same_links(changed, owners_, is_dir)
                    continue
                _same_links(changed, owners, is_dir)
    assert found >= 40


def test_a_tree_with_many_hard_links_loads_by_every_entry():
    """Past `_FEW_LINKS` further names the file is checked an entry at a time, and loads
    as merged."""
    table = [_member("", Kind.DIR), _member("f")]
    table += [_member(f"h{n}", Kind.HARDLINK, linkname="f") for n in range(300)]
    tree = merge([table])
    out = io.BytesIO()
    treefile.encode(tree, [table], out)
    child, owners, is_dir = _parts(tree)
    assert treefile._breadth_first(child, owners, is_dir) is None
    back = treefile.decode(io.BytesIO(out.getvalue()), [table], MAX_NODES)
    assert back.node(2) == tree.node(2) and back.node(2).nlink == 301
    assert list(back.entries(1)) == list(tree.entries(1))


def test_a_loaded_table_is_frozen_before_the_gc_comes_back(cache):
    """No collection walks a loaded table's members: they are out of the cyclic GC's
    reach (gc.freeze) before it is on again, and it is on again."""
    members = [_member(f"f{n}") for n in range(3000)]
    digest = digest_bytes(b"frozen")
    cache.store(LayerIndex(digest, Format.TAR, 10, 10, members))
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.unfreeze()
    gc.collect()
    gc.callbacks.append(count)
    try:
        loaded = cache.load(digest)
        walked = {id(o) for o in gc.get_objects()}
    finally:
        gc.callbacks.remove(count)
    assert loaded is not None and gc.isenabled() and not collections
    assert gc.get_freeze_count() >= 3000
    assert not any(id(m) in walked for m in loaded.members)


def _with_positions(data: bytes, changes: dict[int, int]) -> bytes:
    """A tree file with some inodes' positions in the tables changed (a valid zstd frame
    again)."""
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    head, meta, rest = raw.split(b"\n", 2)
    position = array("I", rest[: 4 * json.loads(meta)["inodes"]])
    for ino, value in changes.items():
        position[ino - 1] = value
    changed = b"\n".join([head, meta, position.tobytes() + rest[len(position) * 4 :]])
    return zstandard.ZstdCompressor(write_checksum=True).compress(changed)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({3: 4}, "a hard link member as an inode"),  # the file inode: the link's member
        ({1: 3}, "a root that is no directory"),  # the root: the file's member
    ],
)
def test_a_tree_whose_inodes_are_members_of_the_wrong_kind_is_stale(cache, changes, reason):
    """The inodes' kinds come from the stored tables' kind bytes (`Table.codes`), or from
    the members of a table not loaded from a file: both refuse the same."""
    members = [
        _member("", Kind.DIR),
        _member("d", Kind.DIR),
        _member("d/a"),
        _member("h", Kind.HARDLINK, linkname="d/a"),
    ]
    loaded = _stored(cache, members)
    tree = merge([members])
    assert [(n, i) for n, i, _, _ in tree.entries(1)] == [("d", 2), ("h", 3)]
    out = io.BytesIO()
    treefile.encode(tree, [members], out)
    for tables in ([members], [loaded]):
        assert len(treefile.decode(io.BytesIO(out.getvalue()), tables, MAX_NODES)) == 3
        with pytest.raises(treefile.StaleTree, match=reason):
            treefile.decode(io.BytesIO(_with_positions(out.getvalue(), changes)), tables, 10)
