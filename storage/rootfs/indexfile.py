"""The layer index file (`<hex>.idx`; docs/rootfs.md, "The cache directory"): how it is
written; `cache.decode` reads it back, trusting nothing. A module of its own, light on
imports, because the gzip index subprocess (`gzipchild`) writes it too, and the daemon keeps
what the child wrote as it is.

One zstd frame with its checksum: a format line, a JSON meta line, the members in blocks
of `_BATCH` (`block`), the zstd frames in one JSON line, the eStargz chunks in one JSON line.

A block is its length in decimal and a newline, then, little-endian: the member count
(u32), each member's kind (a byte: its place in `KINDS`), the widths of eight columns of
numbers (mode, uid, gid, mtime_ns, size, offset, devmajor, devminor; a byte each), the
columns (`numbers`: one i64 for all, u32 or i64 each), the paths and the link names (each:
its byte length as a u64, then `names`), and the xattrs as JSON (`[[member, [[name, base64],
...]], ...]`, the members that have any). Read column by column into arrays and strings in
C loops: JSON rows cost a Python step per field, and decoding them was most of a stored
index's load; the names as one split of their text, not a slice each by their lengths.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import BinaryIO, TypeVar

import zstandard

from .members import Kind, Member

VERSION = 9  # bump whenever the file or `Member` changes: older files are then rebuilt
FORMAT_LINE = f"regfs-layer-index {VERSION}\n".encode()
_LEVEL = 3
_BATCH = 4096  # members per block: few calls per column, and no block of the whole table
KINDS = tuple(Kind)  # a member's kind is stored as its place here
INTS = ("mode", "uid", "gid", "mtime_ns", "size", "offset", "devmajor", "devminor")
COUNT = struct.Struct("<I")
SIZE = struct.Struct("<Q")  # a column of names' bytes
ONE_FOR_ALL = 0  # the width of a column of numbers stored once (`numbers`)
ESCAPE = "\x01"  # in `names`: ESCAPE ESCAPE for itself, ESCAPE ONE for a NUL
ONE = "\x02"
_ENCODING, _ERRORS = "utf-8", "surrogateescape"
_CODES = {kind: code for code, kind in enumerate(KINDS)}
_BIG_ENDIAN = sys.byteorder == "big"
T = TypeVar("T")


@dataclass(frozen=True)
class Meta:
    """The meta line's values that are not counts of what follows."""

    digest: str
    format: str  # `index.Format`'s value
    blob_size: int
    size: int
    seek_points: int
    points_sha256: str = ""  # of the `.gzi` file (gzip layers)


@dataclass(frozen=True)
class Table:
    """A member table as the file's blocks: rendered ahead of the file by the gzip child,
    while its decoder still writes the seek points that the meta line counts."""

    count: int
    lines: list[bytes]


def table(members: Sequence[Member]) -> Table:
    rows = range(0, len(members), _BATCH)
    return Table(len(members), [block(members[i : i + _BATCH]) for i in rows])


def block(members: Sequence[Member]) -> bytes:
    """One block of members, with its length line (the module's docstring)."""
    columns = dict(zip(Member._fields, zip(*members, strict=True), strict=True))
    parts = [COUNT.pack(len(members)), bytes(map(_CODES.__getitem__, columns["kind"]))]
    widths, numbers_ = zip(*(numbers(columns[name]) for name in INTS), strict=True)
    parts += [bytes(widths), *numbers_]
    for name in ("path", "linkname"):
        encoded = names(columns[name])
        parts += [SIZE.pack(len(encoded)), encoded]
    xattrs = [[i, _pairs(pairs)] for i, pairs in enumerate(columns["xattrs"]) if pairs]
    parts.append(json.dumps(xattrs, separators=(",", ":")).encode())
    payload = b"".join(parts)
    return b"%d\n" % len(payload) + payload


def numbers(values: Sequence[int]) -> tuple[int, bytes]:
    """A column of numbers as its width and its bytes: `ONE_FOR_ALL` (one i64, the value of
    every member: a layer's owner or mtime, no device), 4 (u32 each: most modes, sizes and
    offsets) or 8 (i64 each). Half the bytes to decompress of 8 bytes each, and no sign to
    check in a u32."""
    wide = array("q", values)
    data = le_bytes(wide)
    if data == data[:8] * len(values):
        return ONE_FOR_ALL, data[:8]
    try:
        return 4, le_bytes(array("I", wide))
    except OverflowError:  # negative, or 4 GiB and more
        return 8, data


def names(texts: Sequence[str]) -> bytes:
    """Names as a column of the file: each followed by a NUL, in UTF-8 (surrogates escaped),
    so that a reader splits them all at once. A name may hold a NUL (a PAX path): then it
    is escaped (`ESCAPE`), as the escape itself is; the text of the usual table has neither.
    """
    text = "\0".join([*texts, ""])
    if ESCAPE in text or text.count("\0") != len(texts):
        escaped = (t.replace(ESCAPE, ESCAPE * 2).replace("\0", ESCAPE + ONE) for t in texts)
        text = "\0".join([*escaped, ""])
    return text.encode(_ENCODING, _ERRORS)


def picked(items: Sequence[T], at: Sequence[int]) -> list[T]:
    """`[items[i] for i in at]` in one C call (`itemgetter`), a third of a `map`'s time:
    IndexError if one is out of range."""
    return picker(at)(items)


def picker(at: Sequence[int]) -> Callable[[Sequence[T]], list[T]]:
    """`picked` from `at`, made once for several lists."""
    if len(at) == 1:
        (only,) = at
        return lambda items: [items[only]]
    if not at:
        return lambda items: []
    getter = itemgetter(*at)
    return lambda items: list(getter(items))


def le_bytes(values: array[int]) -> bytes:
    """An array's bytes, little-endian whatever the machine's order (the index and tree
    files' numbers)."""
    if _BIG_ENDIAN:
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def le_array(typecode: str, data: bytes | memoryview) -> array[int]:
    """The numbers `le_bytes` wrote (a length not a multiple of the item size: ValueError)."""
    values = array(typecode)
    values.frombytes(data)
    if _BIG_ENDIAN:
        values.byteswap()
    return values


def _pairs(xattrs: tuple[tuple[str, bytes], ...]) -> list[list[str]]:
    return [[name, base64.b64encode(value).decode()] for name, value in xattrs]


def write(
    file: BinaryIO,
    meta: Meta,
    members: Table,
    frames: Sequence[Sequence[object]] = (),
    chunks: Sequence[Sequence[object]] = (),
) -> None:
    """The file into `file`; `frames` and `chunks` as rows of their fields."""
    compressor = zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True)
    with compressor.stream_writer(file, closefd=False) as out:
        values = {
            "digest": meta.digest,
            "format": meta.format,
            "blob_size": meta.blob_size,
            "size": meta.size,
            "members": members.count,
            "frames": len(frames),
            "seek_points": meta.seek_points,
            "points_sha256": meta.points_sha256,
        }
        out.write(FORMAT_LINE)
        out.write(_line(values))
        for line in members.lines:
            out.write(line)
        out.write(_line(list(frames)))
        out.write(_line(list(chunks)))


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
