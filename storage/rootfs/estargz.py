"""eStargz layers: the member table from the layer's own table of contents, with no pass.

An eStargz blob is an ordinary tar.gz whose regular files start new gzip members (one per
chunk), followed by a gzip member holding the tar entry `stargz.index.json` (the TOC: every
entry's metadata and the blob offset of each chunk) and a 51-byte footer, an empty gzip
member whose extra field says where the TOC begins (`%016xSTARGZ`). Reading the footer and
the TOC costs two range reads; a file's bytes are then its chunks' gzip members.

The TOC is used only when the manifest vouches for it: the layer's annotation
`containerd.io/snapshot/stargz/toc.digest` (`LayerRef.toc_digest`) must be the TOC's
sha256. Without it, or when anything does not fit, the layer gets an ordinary pass: a TOC
that nobody vouches for could describe other files than the tar holds. Each chunk read
is checked against its `chunkDigest`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import io
import re
import tarfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import jsontext
from ..api import BlobReader
from .members import Kind, Member, normalise

FOOTER_SIZE = 51
TOC_NAME = "stargz.index.json"
MAX_TOC = 64 << 20  # compressed bytes of the TOC member (and 4x that decompressed)
_KINDS = {
    "dir": Kind.DIR,
    "reg": Kind.FILE,
    "symlink": Kind.SYMLINK,
    "hardlink": Kind.HARDLINK,
    "char": Kind.CHAR,
    "block": Kind.BLOCK,
    "fifo": Kind.FIFO,
}


class Unusable(Exception):
    """Why a layer's TOC is not used (the layer then gets an ordinary pass)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """File bytes [start, start + size) are `size` bytes at `inner` of the gzip member that
    begins at blob offset `coffset` (and ends by `cend`); their sha256 is `digest`."""

    start: int
    size: int
    coffset: int
    cend: int
    inner: int
    digest: str


@dataclass(frozen=True)
class Toc:
    members: list[Member]
    chunks: dict[int, list[Chunk]]  # by the FILE member's `offset` (its key: see below)


def toc_offset(footer: bytes) -> int:
    """Where the TOC's gzip member begins, from the blob's last FOOTER_SIZE bytes."""
    if (
        len(footer) != FOOTER_SIZE
        or footer[:4] != b"\x1f\x8b\x08\x04"
        or footer[10:16] != b"\x1a\x00SG\x16\x00"
        or footer[32:38] != b"STARGZ"
    ):
        raise Unusable("no eStargz footer")
    try:
        return int(footer[16:32], 16)
    except ValueError:
        raise Unusable("a footer whose TOC offset is not hex") from None


async def read_toc(reader: BlobReader, size: int, toc_digest: str, max_members: int) -> Toc:
    """The layer's members and chunks from its TOC; Unusable when it cannot be trusted or
    holds more than `max_members` entries (the ordinary pass then says why, with its own
    bounds)."""
    if size < FOOTER_SIZE:
        raise Unusable("shorter than a footer")
    start = toc_offset(bytes(await reader.read_at(size - FOOTER_SIZE, FOOTER_SIZE)))
    end = size - FOOTER_SIZE
    if not 0 <= start < end or end - start > MAX_TOC:
        raise Unusable(f"a TOC at {start} of {end - start} bytes")
    compressed = bytes(await reader.read_at(start, end - start))
    raw = _toc_json(compressed)
    actual = "sha256:" + hashlib.sha256(raw.data).hexdigest()
    if actual != toc_digest:
        raise Unusable(f"its TOC is {actual}, the manifest says {toc_digest}")
    try:
        entries = jsontext.loads(raw.data)["entries"]
        if len(entries) > max_members:
            raise Unusable(f"more than {max_members} TOC entries")
        return _table(entries, raw.info, start, end)
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise Unusable(f"a TOC that does not read: {exc!r:.200}") from None


@dataclass(frozen=True)
class _Json:
    info: tarfile.TarInfo
    data: bytes


def _toc_json(compressed: bytes) -> _Json:
    """The TOC member is a gzip member holding a tar with the one entry TOC_NAME."""
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        tar_bytes = decompressor.decompress(compressed, 4 * MAX_TOC)
    except zlib.error as exc:
        raise Unusable(f"a TOC that does not decompress: {exc}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != TOC_NAME or not info.isreg():
                raise Unusable(f"no {TOC_NAME} where the footer points")
            extracted = tar.extractfile(info)
            assert extracted is not None
            return _Json(info, extracted.read())
    except tarfile.TarError as exc:
        raise Unusable(f"a TOC that is not a tar: {exc}") from None


def _table(
    entries: list[dict[str, Any]], toc: tarfile.TarInfo, toc_start: int, toc_end: int
) -> Toc:
    """Members in TOC order, then the TOC's own tar entry (a file that `umoci unpack` and
    the ordinary pass show). A FILE member's `offset` is the key of its chunks here: an
    eStargz file is not read at an offset of the uncompressed tar."""
    offsets = sorted({int(e["offset"]) for e in entries if e.get("offset")})
    offsets.append(toc_start)
    members: list[Member] = []
    chunks: dict[int, list[Chunk]] = {}
    for entry in entries:
        kind_name = entry["type"]
        if kind_name == "chunk":
            if not members or members[-1].kind is not Kind.FILE:
                raise ValueError(f"a chunk of {entry['name']!r} after no file")
            chunks[members[-1].offset].append(_chunk(entry, offsets))
            continue
        kind = _KINDS[kind_name]
        key = len(members)
        size = int(entry.get("size", 0)) if kind is Kind.FILE else 0
        linkname = str(entry.get("linkName", ""))
        xattrs = {
            str(k): base64.b64decode(v, validate=True) for k, v in entry.get("xattrs", {}).items()
        }
        members.append(
            Member(
                path=normalise(str(entry["name"])),
                kind=kind,
                mode=int(entry.get("mode", 0)) & 0o7777,
                uid=_id(entry.get("uid", 0)),
                gid=_id(entry.get("gid", 0)),
                mtime_ns=_mtime_ns(entry.get("modtime")),
                size=size,
                offset=key if kind is Kind.FILE else 0,
                linkname=normalise(linkname) if kind is Kind.HARDLINK else linkname,
                devmajor=_id(entry.get("devMajor", 0)),
                devminor=_id(entry.get("devMinor", 0)),
                xattrs=tuple(sorted(xattrs.items())),
            )
        )
        if kind is Kind.FILE:
            chunks[key] = [_chunk(entry, offsets)] if size else []
    for key, file_chunks in chunks.items():
        check_chunks(members[key], file_chunks)
    key = len(members)
    members.append(_toc_member(toc, key))
    chunks[key] = [Chunk(0, toc.size, toc_start, toc_end, toc.offset_data, "")] if toc.size else []
    return Toc(members, chunks)


def _chunk(entry: dict[str, Any], offsets: list[int]) -> Chunk:
    coffset = int(entry["offset"])
    following = bisect.bisect_right(offsets, coffset)
    if following >= len(offsets):
        raise ValueError(f"a chunk of {entry['name']!r} at {coffset}, past the TOC")
    size = int(entry.get("chunkSize") or entry.get("size", 0))
    return Chunk(
        start=int(entry.get("chunkOffset", 0)),
        size=size,
        coffset=coffset,
        cend=offsets[following],
        inner=int(entry.get("innerOffset", 0)),
        digest=str(entry.get("chunkDigest", "")),
    )


def check_chunks(member: Member, chunks: list[Chunk]) -> None:
    """The chunks must tile the file: in order, no gap, no overlap, to its size."""
    end = 0
    for chunk in chunks:
        if chunk.start != end or chunk.size <= 0 or min(chunk.coffset, chunk.inner) < 0:
            raise ValueError(f"chunks of {member.path!r} that do not tile it")
        end += chunk.size
    if end != member.size:
        raise ValueError(f"chunks of {member.path!r} that make {end} of {member.size} bytes")


def _toc_member(info: tarfile.TarInfo, key: int) -> Member:
    return Member(
        path=normalise(info.name),
        kind=Kind.FILE,
        mode=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        mtime_ns=int(info.mtime) * 10**9,
        size=info.size,
        offset=key,
    )


def _id(value: Any) -> int:
    number = int(value)
    if not 0 <= number < 1 << 32:
        raise ValueError(f"an id or device number {number} out of range")
    return number


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def _mtime_ns(value: Any) -> int:
    """Go's RFC 3339 time (`2021-05-12T10:00:00.123456789Z`) in nanoseconds, exactly."""
    if not value:
        return 0
    match = _RFC3339.fullmatch(str(value))
    if match is None:
        raise ValueError(f"a modtime {value!r:.40}")
    stamp = datetime.fromisoformat(match[1] + ("+00:00" if match[3] == "Z" else match[3]))
    return int(stamp.timestamp()) * 10**9 + int((match[2] or "0").ljust(9, "0"))


def chunk_bytes(chunk: Chunk, compressed: bytes) -> bytes:
    """A chunk's bytes from its gzip member (what follows in the member is left alone)."""
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    data = decompressor.decompress(compressed, chunk.inner + chunk.size)
    data = data[chunk.inner :]
    if len(data) != chunk.size:
        raise ValueError(f"{len(data)} bytes where the TOC says {chunk.size}")
    if chunk.digest and "sha256:" + hashlib.sha256(data).hexdigest() != chunk.digest:
        raise ValueError(f"bytes that are not {chunk.digest}")
    return data
