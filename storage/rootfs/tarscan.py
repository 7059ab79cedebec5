"""A layer's member table from its decompressed stream, in one forward pass with tarfile.

tarfile parses every header form (ustar, GNU long names, PAX names, xattrs, numbers) and
is run in its seekable mode over `ChunkStream`, a forward-only view of the decompressed
chunks: it seeks over member data (which the decompressor produces anyway and the stream
drops) and never reads it. Everything a hostile tar could make unbounded is bounded: one
header's size (tarfile reads a PAX or GNU long-name header whole), the number of members,
the bytes of names, and what follows the end of the archive.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import io
import logging
import os
import re
import struct
import tarfile
import urllib.parse
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..digests import Digest
from .errors import BadLayer, CorruptLayer, LayerTooLarge, NotATar
from .members import Kind, Member, make_member, normalise

log = logging.getLogger(__name__)

_KINDS = {
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.LNKTYPE: Kind.HARDLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}
_BLOCK = tarfile.BLOCKSIZE
_MIN_CHUNK = 64 << 10
_ID_LIMIT = 1 << 32  # uid, gid and device numbers are 32-bit in the kernel
_NS_LIMIT = 1 << 63  # mtime_ns must fit a signed 64-bit timespec
_PLAIN_NAME = re.compile(r"[^/]+(?:/[^/]+)*")  # no empty component, no leading or final /
# a ustar header: name, mode, uid, gid, size, mtime, checksum, type, linkname, magic and
# version, uname, gname, devmajor, devminor, prefix
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


@dataclass(frozen=True)
class Limits:
    """What one layer's table may hold; beyond it the layer is LayerTooLarge."""

    members: int = 1_000_000
    names: int = 256 << 20  # bytes of paths, link targets and xattrs, all members together
    header: int = 1 << 20  # one PAX or GNU long-name header
    trailer: int = 16 << 20  # decompressed bytes after the end of the archive
    # Decompressed bytes per byte of blob, past the first `expanded_free`: a zstd layer of
    # RLE blocks holds 8 GiB of zeros in 256 KiB, and a pass of it held every other layer's
    # index back (one pass at a time). gzip cannot pass ~1,032; a tar of a GiB of zeros
    # compressed by zstd -19 is ~30,000 to one, hence the free GiB.
    expansion: int = 1000
    expanded_free: int = 1 << 30


class PieceFile(io.RawIOBase):
    """A read-only file made of pieces (a blob's windows, a stream's chunks): `_piece` gives
    the piece that holds a position; this class copies from pieces into `read` buffers."""

    def __init__(self) -> None:
        super().__init__()
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def _piece(self, position: int) -> tuple[bytes, int] | None:
        """The piece holding `position` and where it starts; None at the end."""
        raise NotImplementedError

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            found = self._piece(self._position)
            if found is None:
                break
            data, start = found
            piece = data[self._position - start : self._position - start + len(view) - done]
            view[done : done + len(piece)] = piece
            done += len(piece)
            self._position += len(piece)
        return done


class ChunkStream(PieceFile):
    """Decompressed chunks as a file that only moves forward (see the module docstring).

    Seeking back is allowed into the current and the previous chunk: tarfile reads the last
    byte of each member to see that it is there, and the end check rereads the final block.
    """

    def __init__(self, chunks: Iterator[bytes], layer: Digest, max_read: int) -> None:
        super().__init__()
        self._chunks = chunks
        self._layer = layer
        self._max_read = max_read
        self._previous = b""
        self._chunk = b""
        self._start = 0  # stream offset of self._chunk
        self._ended = False

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._position
        elif whence != os.SEEK_SET:
            raise io.UnsupportedOperation("a decompressed stream has no known end")
        if offset < self._start - len(self._previous):
            raise io.UnsupportedOperation(f"cannot seek back to {offset}")
        self._position = offset
        return offset

    def _advance(self) -> bool:
        """Move to the next chunk; False at the end of the stream. Small chunks (a zstd
        block can be a few bytes) are joined, so that the current and the previous chunk
        always hold the last header, which the end check reads again."""
        if self._ended:
            return False
        pieces: list[bytes] = []
        size = 0
        for chunk in self._chunks:
            pieces.append(chunk)
            size += len(chunk)
            if size >= _MIN_CHUNK:
                break
        if not size:
            self._ended = True
            return False
        self._start += len(self._chunk)
        self._previous, self._chunk = self._chunk, b"".join(pieces)
        return True

    def read(self, size: int | None = -1) -> bytes:
        # Checked before io allocates the buffer: a header may claim any size.
        if size is None or size < 0 or size > self._max_read:
            raise LayerTooLarge(self._layer, f"a tar header of {size} bytes")
        at = self._position - self._start
        if at >= 0 and at + size <= len(self._chunk):  # the usual case: a header in one chunk
            self._position += size
            return self._chunk[at : at + size]
        return super().read(size) or b""

    def _piece(self, position: int) -> tuple[bytes, int] | None:
        while True:
            if position < self._start:
                return self._previous, self._start - len(self._previous)
            if position < self._start + len(self._chunk):
                return self._chunk, self._start
            if not self._advance():
                return None

    def drain(self, limit: int) -> int:
        """Read to the end of the stream, at most `limit` bytes past the current position;
        returns the stream's length."""
        end = self._position + limit
        while self._start + len(self._chunk) <= end and self._advance():
            pass
        if self._start + len(self._chunk) > end:
            raise LayerTooLarge(self._layer, f"more than {limit} bytes after the tar archive")
        return self._start + len(self._chunk)


@dataclass(frozen=True)
class TarTable:
    members: list[Member]
    size: int  # length of the decompressed stream


class _TarInfo(tarfile.TarInfo):
    """tarfile's TarInfo with a quicker `frombuf` for the usual header: `frombuf` was more
    than half of the scan's time (~25 µs a header: a call per field, two checksums with
    struct), and the scan is the child's longest step after the decompression. The quick
    path parses a header only when it is plainly valid (its unsigned checksum adds up, every
    number plain octal, not a GNU sparse header) and does what tarfile's does with the
    fields; anything else goes to tarfile's own, so a header it parses differently or
    refuses is tarfile's business (tests compare both on mutated headers)."""

    __slots__ = ()

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _TarInfo:
        try:
            name, *octal, kind, linkname, _, uname, gname, major, minor, prefix = _USTAR.unpack(buf)
            # tarfile's value of each plain octal field (`nti`); a base-256 one (its first
            # byte 0x80 or 0xff) or any other form raises ValueError, and tarfile parses it
            mode, uid, gid, size, mtime, checksum, devmajor, devminor = [
                int(field.partition(b"\0")[0] or b"0", 8) for field in (*octal, major, minor)
            ]
        except (ValueError, struct.error):
            return super().frombuf(buf, encoding, errors)
        if kind == tarfile.GNUTYPE_SPARSE or checksum != 256 + _unsigned_sum(buf):
            return super().frombuf(buf, encoding, errors)
        info = cls()
        # tarfile's `nts` for each name: up to the first NUL, decoded
        info.name = name.partition(b"\0")[0].decode(encoding, errors)
        info.mode, info.uid, info.gid, info.size, info.mtime = mode, uid, gid, size, mtime
        info.devmajor, info.devminor = devmajor, devminor
        info.chksum = checksum
        info.type = kind
        info.linkname = linkname.partition(b"\0")[0].decode(encoding, errors)
        info.uname = uname.partition(b"\0")[0].decode(encoding, errors)
        info.gname = gname.partition(b"\0")[0].decode(encoding, errors)
        prefix = prefix.partition(b"\0")[0].decode(encoding, errors)
        if info.type == tarfile.AREGTYPE and info.name.endswith("/"):
            info.type = tarfile.DIRTYPE
        if info.isdir():
            info.name = info.name.rstrip("/")
        if prefix and info.type not in tarfile.GNU_TYPES:
            info.name = prefix + "/" + info.name
        return info

    def _apply_pax_info(self, pax_headers: Mapping[str, str], encoding: str, errors: str) -> None:
        """A PAX record with an empty value deletes its keyword (POSIX): the header's own
        field holds (its name, link name, ids, size, mtime) and an xattr is not set, as
        `umoci unpack` has it. tarfile would set the field empty (a member named "", the
        image's root) or 0."""
        kept = {keyword: value for keyword, value in pax_headers.items() if value}
        super()._apply_pax_info(kept, encoding, errors)  # type: ignore[misc]  # not in typeshed


def _unsigned_sum(header: bytes | bytearray) -> int:
    """The sum of a header's bytes but its checksum field's (tarfile's unsigned checksum,
    less the field's 8 spaces), in C: adler32 started at 0 keeps the sum of a piece's bytes
    modulo 65521 in its low half, exact for pieces of at most 256 bytes (~0.3 µs against
    `sum`'s 2 µs over the 512). `header` is 512 bytes."""
    return (
        (zlib.adler32(header[:148], 0) & 0xFFFF)
        + (zlib.adler32(header[156:404], 0) & 0xFFFF)
        + (zlib.adler32(header[404:], 0) & 0xFFFF)
    )


class _Tar(tarfile.TarFile):
    members: list[tarfile.TarInfo]  # what tarfile keeps of each entry (typeshed leaves it out)
    tarinfo = _TarInfo


def scan(chunks: Iterator[bytes], layer: Digest, limits: Limits) -> TarTable:
    """The member table of the tar that `chunks` make up; BadLayer (a subclass) otherwise."""
    stream = ChunkStream(chunks, layer, limits.header)
    try:
        tar = _Tar.open(fileobj=stream, mode="r:")
    except tarfile.ReadError as exc:
        raise NotATar(layer, f"not a tar archive ({exc})") from None
    with tar:
        members = _members(tar, layer, limits)
    _check_end(stream, tar.offset, layer)
    return TarTable(members, stream.drain(limits.trailer))


def _members(tar: _Tar, layer: Digest, limits: Limits) -> list[Member]:
    members: list[Member] = []
    names = 0
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError as exc:
            raise CorruptLayer(layer, f"tar after {len(members)} members: {exc}") from None
        if info is None:
            return members
        tar.members.clear()  # tarfile keeps every TarInfo; the table is ours
        member = _member(info, layer)
        if member is None:
            continue
        members.append(member)
        names += len(member.path) + len(member.linkname)
        if member.xattrs:
            names += sum(len(name) + len(value) for name, value in member.xattrs)
        if len(members) > limits.members:
            raise LayerTooLarge(layer, f"more than {limits.members} tar members")
        if names > limits.names:
            raise LayerTooLarge(layer, f"more than {limits.names} bytes of member names")


def _check_end(stream: ChunkStream, offset: int, layer: Digest) -> None:
    """tarfile ends quietly at a bad header after the first: only zeros or nothing may
    follow the last member, or the tar was damaged (or cut inside a header)."""
    stream.seek(offset)
    block = stream.read(_BLOCK)
    if block.count(0) != len(block):
        why = "cut short inside a header" if len(block) < _BLOCK else "an invalid header"
        raise CorruptLayer(layer, f"tar at offset {offset}: {why}")


def _member(info: tarfile.TarInfo, layer: Digest) -> Member | None:
    """One tar entry as the index keeps it; None for entry types an image has no use for."""
    if info.sparse is not None:
        raise BadLayer(layer, f"sparse tar member {info.name!r} is not supported")
    kind = Kind.FILE if info.isreg() else _KINDS.get(info.type)
    if kind is None:
        log.warning("layer %s: tar member %r of type %r skipped", layer, info.name, info.type)
        return None
    for what, value in (("uid", info.uid), ("gid", info.gid)):
        if not 0 <= value < _ID_LIMIT:
            raise CorruptLayer(layer, f"tar member {info.name!r}: {what} {value} out of range")
    if not (0 <= info.devmajor < _ID_LIMIT and 0 <= info.devminor < _ID_LIMIT):
        raise CorruptLayer(layer, f"tar member {info.name!r}: device number out of range")
    if info.size < 0:
        raise CorruptLayer(layer, f"tar member {info.name!r}: negative size")
    is_file = kind is Kind.FILE
    linkname = info.linkname
    if kind is Kind.HARDLINK:
        linkname = normal_name(linkname)
    elif kind is not Kind.SYMLINK:
        linkname = ""
    device = kind in (Kind.CHAR, Kind.BLOCK)
    return make_member(
        normal_name(info.name),
        kind,
        info.mode & 0o7777,
        info.uid,
        info.gid,
        _mtime_ns(info),
        info.size if is_file else 0,
        info.offset_data if is_file else 0,
        linkname,
        info.devmajor if device else 0,
        info.devminor if device else 0,
        _xattrs(info, layer),
    )


def normal_name(name: str) -> str:
    """`normalise`, skipped for the usual name that has nothing to normalise (it was a third
    of the per-member cost of a pass, and of loading a stored index)."""
    if _PLAIN_NAME.fullmatch(name) and not name.startswith(".") and "/." not in name:
        return name
    return normalise(name)


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """Exact nanoseconds: a PAX mtime is a decimal string that a float would round."""
    if type(info.mtime) is int and "mtime" not in info.pax_headers:
        return max(-_NS_LIMIT, min(info.mtime * 10**9, _NS_LIMIT - 1))  # ustar: whole seconds
    try:
        exact = decimal.Decimal(info.pax_headers.get("mtime", info.mtime))
    except (decimal.InvalidOperation, ValueError):
        return 0
    if not exact.is_finite():
        return 0
    if exact.adjusted() > 12:  # beyond what 64 bits of nanoseconds hold (and huge to compute)
        return _NS_LIMIT - 1 if exact > 0 else -_NS_LIMIT
    ns = int(exact.scaleb(9).to_integral_value(decimal.ROUND_FLOOR))
    return max(-_NS_LIMIT, min(ns, _NS_LIMIT - 1))


def _xattrs(info: tarfile.TarInfo, layer: Digest) -> tuple[tuple[str, bytes], ...]:
    """SCHILY.xattr.* (GNU tar, Go's archive/tar) and LIBARCHIVE.xattr.* (bsdtar) records
    (none with an empty value: `_TarInfo._apply_pax_info`)."""
    found: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                found[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except (binascii.Error, ValueError):
                raise CorruptLayer(layer, f"tar member {info.name!r}: bad xattr {name!r}") from None
    return tuple(sorted(found.items()))
