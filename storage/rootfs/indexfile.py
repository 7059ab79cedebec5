"""The layer index file (`<hex>.idx`; docs/rootfs.md, "The cache directory"): how it is
written; `cache.decode` reads it back, trusting nothing. A module of its own, light on
imports, because the gzip index subprocess (`gzipchild`) writes it too, and the daemon keeps
what the child wrote as it is.

One zstd frame with its checksum: a format line, a JSON meta line, the members in JSON
lines of `_BATCH`, the zstd frames in one line, the eStargz chunks in one line.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from .members import Member

VERSION = 5  # bump whenever the file or `Member` changes: older files are then rebuilt
FORMAT_LINE = f"regfs-layer-index {VERSION}\n".encode()
_LEVEL = 3
_BATCH = 4096  # members per line: few JSON calls, and no line of the whole table


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
    """A member table as the file's lines: rendered ahead of the file by the gzip child,
    while its decoder still writes the seek points that the meta line counts."""

    count: int
    lines: list[bytes]


def table(members: Sequence[Member]) -> Table:
    rows = range(0, len(members), _BATCH)
    return Table(len(members), [_line([_row(m) for m in members[i : i + _BATCH]]) for i in rows])


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


def _row(m: Member) -> list[object]:
    xattrs = [[name, base64.b64encode(value).decode()] for name, value in m.xattrs]
    return [
        m.path,
        m.kind.value,
        m.mode,
        m.uid,
        m.gid,
        m.mtime_ns,
        m.size,
        m.offset,
        m.linkname,
        m.devmajor,
        m.devminor,
        xattrs,
    ]


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
