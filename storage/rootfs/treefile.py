"""A merged tree kept beside its layers' indexes (`<key>.tree`; docs/rootfs.md, "The cache
directory"): a fresh mount's first listing of an image gets its tree from it instead of
merging again (the bench's 15,000 members: 16-20 ms of CPU against 30-37 for the merge).

The file refers into the layers' member tables (a position per inode), so it
is only good with those very tables: its key is the layer digests', and its meta line
keeps a fingerprint of each table (`fingerprint`: the kinds, paths and link names, all
the merge reads); a table that differs (indexed again by another version) makes the file
stale. One zstd frame with its checksum: a format line, a JSON meta line, then
little-endian u32 arrays (per inode: its member's position in the layers' tables one after
the other, from 1, 0 for `DEFAULT_DIR`, and its entry count; per entry: the child inode) and
the names, each followed by a NUL.

Nothing read back is trusted (`decode` raises `StaleTree`): every position must be in
its table, every inode reached, each directory listed once and below a lower-numbered
one (no cycle), every name a single plain component (no `/`, NUL, `.`, `..` or `.wh.`,
at most 255 bytes) in strictly increasing order within its directory. What is derived
(layers, first entries, name offsets, parents, link counts) is computed here, not read.
"""

from __future__ import annotations

import hashlib
import io
import json
from array import array
from collections import Counter
from collections.abc import Sequence
from itertools import accumulate, chain, compress, repeat
from operator import add, gt, itemgetter, lt, sub
from typing import BinaryIO, NamedTuple

import zstandard

from ..digests import Digest
from . import indexfile
from .indexfile import KINDS, le_array, le_bytes, picker
from .members import Kind, Member, Table
from .merge import DEFAULT_DIR, NAME_MAX, NO_LAYER, WHITEOUT, MergedTree

VERSION = 2  # bump whenever the file or `MergedTree`'s arrays change
FORMAT_LINE = f"regfs-merged-tree {VERSION}\n".encode()
_LEVEL = 3
_MAX_META = 1 << 20  # a count and a fingerprint per layer
_CODES = {kind: code for code, kind in enumerate(KINDS)}
_KIND, _PATH, _LINK = itemgetter(1), itemgetter(0), itemgetter(8)
_IS_DIR = bytes(code == _CODES[Kind.DIR] for code in range(256))  # a kind's code → 1 or 0
# Names no entry may have, each after the NUL before it: scanned for only if a name starts
# with a dot (`_names`), which none of the bench image's 15,002 does.
_DOTTED = (b"\0.\0", b"\0..\0", b"\0" + WHITEOUT.encode())


class StaleTree(Exception):
    """A tree file that cannot be used (damaged, or made from other tables): removed."""


def key(layers: Sequence[Digest]) -> str:
    """The file's name (64 hex digits, as a layer's entry): the image's layers, in order."""
    text = "\n".join(["regfs-merged-tree", *map(str, layers)])
    return hashlib.sha256(text.encode()).hexdigest()


class Fingerprint:
    """What the merge reads of a table (kinds, paths, link names), hashed as the index file
    holds them (the kinds' bytes, `indexfile.names`), a block at a time: a stored table's
    is taken from the file's bytes as they are read (`members.Table`), which cost 0.5 ms
    of the bench's 15,000 members where rebuilding them from the members cost 2.5."""

    def __init__(self) -> None:
        self._columns = [hashlib.sha256() for _ in range(3)]
        self.codes = bytearray()  # the kinds, as `Table.codes`

    def update(self, kinds: bytes | memoryview, paths: bytes, links: bytes) -> None:
        for column, data in zip(self._columns, (kinds, paths, links), strict=True):
            column.update(data)
        self.codes += kinds

    def hexdigest(self) -> str:
        whole = hashlib.sha256(b"".join(column.digest() for column in self._columns))
        return whole.hexdigest()[:32]


def fingerprint(members: Sequence[Member]) -> str:
    """A table's `Fingerprint`: a tree made from another table of the same layer must not be
    used with this one."""
    if isinstance(members, Table):
        return members.fingerprint
    found = Fingerprint()
    paths, links = (indexfile.names(list(map(f, members))) for f in (_PATH, _LINK))
    found.update(_codes(members), paths, links)
    return found.hexdigest()


def _codes(members: Sequence[Member]) -> bytes:
    """The members' kinds as bytes (`indexfile.KINDS`), as a stored table keeps them."""
    if isinstance(members, Table):
        return members.codes
    return bytes(map(_CODES.__getitem__, map(_KIND, members)))


def encode(tree: MergedTree, tables: Sequence[Sequence[Member]], file: BinaryIO) -> None:
    """Write `tree`, merged from `tables`, as the module's docstring says."""
    members, layer, count, child, names = tree.parts()
    offsets = list(accumulate(map(len, tables), initial=1))  # 0: DEFAULT_DIR
    where = [{id(m): offsets[n] + at for at, m in enumerate(t)} for n, t in enumerate(tables)]
    position = array("I", bytes(4 * len(members)))
    for ino, (number, member) in enumerate(zip(layer, members, strict=True)):
        if number != NO_LAYER:
            position[ino] = where[number][id(member)]
    meta = {
        "inodes": len(members),
        "entries": len(child),
        "names": len(names),
        "tables": [[len(t), fingerprint(t)] for t in tables],
    }
    compressor = zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True)
    with compressor.stream_writer(file, closefd=False) as out:
        out.write(FORMAT_LINE)
        out.write(json.dumps(meta, separators=(",", ":")).encode() + b"\n")
        for values in (position, count, child):
            out.write(le_bytes(values))
        out.write(names)


def decode(file: BinaryIO, tables: Sequence[Sequence[Member]], max_nodes: int) -> MergedTree:
    """The tree a file holds, checked against `tables` (those it was made from); StaleTree
    for anything out of place. Checked and derived a column at a time, in C loops: a
    Python step per inode cost as much as the merge it saves."""
    reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(file))
    if reader.readline(len(FORMAT_LINE)) != FORMAT_LINE:
        raise StaleTree("another format or version")
    meta = json.loads(reader.readline(_MAX_META))
    if not isinstance(meta, dict) or meta.get("tables") != [
        [len(t), fingerprint(t)] for t in tables
    ]:
        raise StaleTree("made from other member tables")
    inodes, entries, size = (meta.get(k) for k in ("inodes", "entries", "names"))
    for value in (inodes, entries, size):
        if type(value) is not int or value < 0:
            raise StaleTree(f"a count {value!r:.40}")
    assert isinstance(inodes, int) and isinstance(entries, int) and isinstance(size, int)
    # Entries: every inode's name and a hard link's each (members and implicit directories
    # are each bounded by max_nodes).
    if not 1 <= inodes <= max_nodes or entries > 2 * max_nodes or size > entries * (NAME_MAX + 1):
        raise StaleTree("counts out of bounds")
    position, count, child = (_array(reader, n) for n in (inodes, inodes, entries))
    names = _read(reader, size)
    if reader.read(1):
        raise StaleTree("more after its names")
    flat = [DEFAULT_DIR, *chain.from_iterable(tables)]
    layer_of = [NO_LAYER]
    for number, table in enumerate(tables):
        layer_of += repeat(number, len(table))
    pick = picker(position)
    try:
        members = pick(flat)
    except IndexError:
        raise StaleTree("a member past its tables") from None
    layer = array("i", pick(layer_of))
    codes = bytes(pick(b"".join([_CODES[Kind.DIR].to_bytes(), *map(_codes, tables)])))
    return _assemble(members, codes, layer, count, child, names)


def _assemble(
    members: list[Member],
    codes: bytes,
    layer: array[int],
    count: array[int],
    child: array[int],
    names: bytes,
) -> MergedTree:
    """Check the shape (the module's docstring) and derive what the file leaves out;
    `codes` are the inodes' kinds (`indexfile.KINDS`), `is_dir` a byte each (1 or 0)."""
    inodes, entries = len(members), len(child)
    if _CODES[Kind.HARDLINK] in codes:
        raise StaleTree("a hard link member as an inode")
    is_dir = codes.translate(_IS_DIR)
    if not is_dir[0]:
        raise StaleTree("a root that is no directory")
    if sum(count) != entries or sum(compress(count, is_dir)) != entries:  # counts are >= 0
        raise StaleTree("entries that do not add up, or below a non-directory")
    numbers = range(1, inodes + 1)
    owners = list(chain.from_iterable(map(repeat, compress(numbers, count), filter(None, count))))
    parent, nlink, above = _breadth_first(child, owners, is_dir) or _any_order(
        child, owners, is_dir
    )
    subdirs = Counter(above)
    for ino in compress(numbers, is_dir):  # 2 + subdirectories (most inodes are files)
        nlink[ino - 1] = 2 + subdirs[ino]
    parts, lengths = _names(names, entries)
    first = array("I", accumulate(count, initial=0))
    first.pop()
    in_order = list(map(lt, parts, parts[1:]))  # each name against the next, then
    for start in compress(first, count):  # the first name of each directory forgiven
        if start:
            in_order[start - 1] = True
    if not all(in_order):
        raise StaleTree("names out of order in a directory")
    ends = array("Q", accumulate(map(add, lengths, repeat(1))))
    try:
        names.decode("utf-8")  # strict: neither a lone surrogate nor an undecodable byte
    except UnicodeDecodeError:
        utf8 = False
    else:
        utf8 = True
    return MergedTree(members, layer, nlink, parent, first, count, names, ends, child, utf8)


class _Links(NamedTuple):
    """What follows from the entries: each inode's parent and link count (a directory's
    is set after), and the parent of each directory but the root."""

    parent: array[int]
    nlink: array[int]
    above: list[int]


def _breadth_first(child: array[int], owners: list[int], is_dir: Sequence[int]) -> _Links | None:
    """`_any_order`'s parents and link counts, for a file numbered as the merge numbers
    (each inode's first name the next number, breadth first) with at most `_FEW_LINKS`
    further names (hard links); None for any other, which `_any_order` then checks. The
    first names are found as runs equal to a counting array (compared in C), not an entry
    at a time: ~1 ms of the bench's 15,002 entries, where `_any_order` took 5.6."""
    inodes, entries = len(is_dir), len(child)
    further = entries - (inodes - 1)
    if not 0 <= further <= _FEW_LINKS:
        return None
    counting = _counting(inodes + 1)
    at = met = 0  # where in `child`; inodes met (the next first name is met + 2)
    links: list[int] = []  # where the further names are
    while True:
        at, met = _run(child, counting, inodes, at, met)
        if at == entries:
            break
        ino = child[at]  # a further name: of a non-directory met before
        if not 2 <= ino < met + 2 or is_dir[ino - 1] or len(links) == further:
            return None
        links.append(at)
        at += 1
    # Every inode met: at most `further` further names, and no run past the last inode.
    # Each inode's (its first name's) directory, from inode 2: the runs between the
    # further names, each copied once (a `del` of each moved all after it: with links
    # near the front of millions of entries, ~2 ms a link).
    starts = [0, *(at + 1 for at in links)]
    runs = zip(starts, [*links, None], strict=True)
    kept = list(chain.from_iterable(owners[a:b] for a, b in runs))
    if not all(map(gt, counting[2 : inodes + 1], kept)):  # a directory below a later one: a cycle
        return None
    nlink = array("I", [1]) * inodes
    for at in links:
        nlink[child[at] - 1] += 1
    return _Links(array("I", [MergedTree.ROOT, *kept]), nlink, list(compress(kept, is_dir[1:])))


_FEW_LINKS = 256  # further names `_breadth_first` looks for (a few steps each)
_COUNTING = array("I")  # 0, 1, 2, ...: `_counting`
_MAX_COUNTING = 1 << 20  # kept for images up to this many inodes (4 MB)


def _counting(length: int) -> array[int]:
    """0, 1, 2, ... to at least `length`: kept from one load to the next (building it took
    0.6 ms of the bench's 15,000), up to `_MAX_COUNTING`."""
    global _COUNTING
    if len(_COUNTING) >= length:
        return _COUNTING
    counting = array("I", range(max(length, min(2 * len(_COUNTING), _MAX_COUNTING))))
    if length <= _MAX_COUNTING:
        _COUNTING = counting
    return counting


def _run(
    child: array[int], counting: array[int], inodes: int, at: int, met: int
) -> tuple[int, int]:
    """`at` and `met` past the first names from `at` on: the longest run of `child` from
    `at` equal to `counting` from `met + 2` (up to the last inode), found by doubling then
    halving its length, comparing only what is not compared yet."""
    limit = min(len(child) - at, inodes - 1 - met)
    start = met + 2 - at  # child[at + i] == counting[start + at + i] along the run

    def same(lo: int, hi: int) -> bool:
        return child[at + lo : at + hi] == counting[start + at + lo : start + at + hi]

    good, step = 0, 1
    while good < limit and same(good, min(good + step, limit)):
        good, step = min(good + step, limit), 2 * step
    bad = min(good + step, limit + 1)  # a length known not to match, or past the limit
    while bad - good > 1:
        mid = (good + bad) // 2
        if same(good, mid):
            good = mid
        else:
            bad = mid
    return at + good, met + good


def _any_order(child: array[int], owners: list[int], is_dir: Sequence[int]) -> _Links:
    """Parents and link counts of any numbering, every entry checked: it names an inode,
    every inode but the root is named, each directory once and below a lower number (no
    cycle, every one reached from the root)."""
    inodes = len(is_dir)
    if child and (min(child) < 2 or max(child) > inodes):
        raise StaleTree("an entry naming no inode")
    first_owner = dict(zip(reversed(child), reversed(owners), strict=True))
    if len(first_owner) != inodes - 1:
        raise StaleTree("an inode no directory lists")
    lists_dir = list(map(is_dir.__getitem__, map(sub, child, repeat(1))))
    dirs, above = list(compress(child, lists_dir)), list(compress(owners, lists_dir))
    if len(set(dirs)) != len(dirs) or not all(map(gt, dirs, above)):
        raise StaleTree("a directory listed twice or above its parent")
    parent = array("I", [MergedTree.ROOT])
    parent.extend(map(first_owner.__getitem__, range(2, inodes + 1)))
    numbers = range(1, inodes + 1)
    nlink = array("I", map(Counter(child).get, numbers, repeat(1)))  # the root: no entry
    return _Links(parent, nlink, above)


def _names(names: bytes, entries: int) -> tuple[list[bytes], list[int]]:
    """The names and their lengths, once each of `entries` is a single plain component
    followed by a NUL."""
    parts = names.split(b"\0")
    if len(parts) != entries + 1 or parts.pop():  # nothing after the last NUL
        raise StaleTree("names that do not fit the entries")
    framed = b"\0" + names
    for bad in (b"/", b"\0\0", *(_DOTTED if b"\0." in framed else ())):
        if bad in framed:
            raise StaleTree(f"a name that is empty, {bad!r} or holds it")
    lengths = list(map(len, parts))
    if parts and max(lengths) > NAME_MAX:
        raise StaleTree(f"a name longer than {NAME_MAX} bytes")
    return parts, lengths


def _read(reader: BinaryIO, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise StaleTree("ends early")
    return data


def _array(reader: BinaryIO, count: int) -> array[int]:
    return le_array("I", _read(reader, count * 4))
