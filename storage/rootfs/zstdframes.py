"""zstd layers: the frame table that makes random reads cheap, and the re-framing of big frames.

A zstd frame can only be decompressed from its start, so the index keeps where each frame
begins (compressed and uncompressed). The pass walks the frame format itself, block by
block (RFC 8878: a 3-byte header per block, at most 128 KiB each), and feeds each block
to a decompressor: the frame boundaries come out exact, and no block can make more than
128 KiB of output at once, so a zstd bomb cannot grow memory. Most zstd layers are one
frame (the zstd CLI, containerd and buildkit write one): a frame whose output passes
`REFRAME_ABOVE` is re-compressed, as it is decompressed, into `FRAME_SIZE` frames in a local
copy (docs/rootfs.md: 1 MiB frames cost ~1 ms and ~224 KB per random read instead of 260-520 ms),
and its table entries point into that copy.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from ..digests import Digest
from .blobfile import BlobFile
from .errors import CorruptLayer

MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE = 0x184D2A50  # skippable frames: this magic with any low nibble, then a u32 size
_MAX_BLOCK = 128 << 10
REFRAME_ABOVE = 4 << 20  # a frame with more output than this is re-framed into the copy
FRAME_SIZE = 1 << 20  # the uncompressed size of the copy's frames
LEVEL = 3


@dataclass(frozen=True, slots=True)
class Frame:
    """Uncompressed bytes [uoffset, uoffset + usize) are the zstd frame at compressed bytes
    [coffset, coffset + csize) of the blob, or of the layer's local copy when `in_copy`."""

    uoffset: int
    usize: int
    coffset: int
    csize: int
    in_copy: bool


def is_zstd(head: bytes) -> bool:
    """Whether a blob's first 4 bytes begin a zstd frame or a skippable frame."""
    return head == MAGIC or (len(head) == 4 and int.from_bytes(head, "little") & ~0xF == _SKIPPABLE)


def frames_at(frames: list[Frame], offset: int, size: int) -> list[Frame]:
    """The frames that hold uncompressed bytes [offset, offset + size)."""
    first = bisect.bisect_right(frames, offset, key=lambda f: f.uoffset) - 1
    end = offset + size
    found = []
    for frame in frames[max(first, 0) :]:
        if frame.uoffset >= end:
            break
        found.append(frame)
    return found


def decompress(frame: Frame, data: bytes) -> bytes:
    """One frame's bytes; ZstdError when they are not that frame."""
    out = zstandard.ZstdDecompressor().decompress(data, max_output_size=frame.usize)
    if len(out) != frame.usize:
        raise zstandard.ZstdError(f"frame at {frame.coffset}: {len(out)} bytes, not {frame.usize}")
    return out


class _Copy:
    """The local copy being written: big frames re-compressed in FRAME_SIZE pieces."""

    def __init__(self, file: BinaryIO, frames: list[Frame]) -> None:
        self._file = file
        self._frames = frames
        self._compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
        self._coffset = 0
        self._uoffset = 0
        self._pending = bytearray()

    def begin(self, uoffset: int) -> None:
        self._uoffset = uoffset

    def write(self, data: bytes) -> None:
        self._pending += data
        while len(self._pending) >= FRAME_SIZE:
            self._emit(bytes(self._pending[:FRAME_SIZE]))
            del self._pending[:FRAME_SIZE]

    def end(self) -> None:
        if self._pending:
            self._emit(bytes(self._pending))
            self._pending.clear()

    def _emit(self, piece: bytes) -> None:
        compressed = self._compressor.compress(piece)
        self._file.write(compressed)
        self._frames.append(
            Frame(self._uoffset, len(piece), self._coffset, len(compressed), in_copy=True)
        )
        self._uoffset += len(piece)
        self._coffset += len(compressed)


class ZstdPass:
    """The decompressed stream of a zstd blob (`chunks()`), recording `frames` on the way.

    `copy` is where re-framed frames go; `copied` says whether any did (else the caller
    drops the empty copy).
    """

    def __init__(self, blob: BlobFile, layer: Digest, copy: BinaryIO) -> None:
        self.frames: list[Frame] = []
        self.copied = False
        self._blob = blob
        self._layer = layer
        self._copy = _Copy(copy, self.frames)
        self._decompressor = zstandard.ZstdDecompressor()
        self._reframed = False

    def _read(self, size: int) -> bytes:
        data = self._blob.read(size) or b""
        if len(data) != size:
            raise CorruptLayer(self._layer, f"zstd data cut short at offset {self._blob.tell()}")
        return data

    def chunks(self) -> Iterator[bytes]:
        uoffset = 0
        while self._blob.tell() < self._blob.size:
            start = self._blob.tell()
            magic = self._read(4)
            if int.from_bytes(magic, "little") & ~0xF == _SKIPPABLE:
                skip = int.from_bytes(self._read(4), "little")
                while skip:  # read, not seeked over: the digest is checked on the way
                    skip -= len(self._read(min(skip, 1 << 20)))
                continue
            if magic != MAGIC:
                raise CorruptLayer(self._layer, f"no zstd frame at offset {start}")
            usize = 0
            for chunk in self._frame(magic, start, uoffset):
                yield chunk
                usize += len(chunk)
            if not self._reframed:
                self.frames.append(Frame(uoffset, usize, start, self._blob.tell() - start, False))
            uoffset += usize

    def _frame(self, magic: bytes, start: int, uoffset: int) -> Iterator[bytes]:
        """One frame's output in pieces of at most a block; a big frame goes to the copy
        too (and then sets `_reframed`: its table entries are the copy's)."""
        self._reframed = False
        decompressor = self._decompressor.decompressobj()
        descriptor = self._read(1)
        flags = descriptor[0]
        single_segment = (flags >> 5) & 1
        header = (0 if single_segment else 1) + (0, 1, 2, 4)[flags & 3]
        header += (single_segment, 2, 4, 8)[flags >> 6]
        feed = magic + descriptor + self._read(header)
        pending: list[bytes] | None = []  # the frame's output until it is known to be big
        size = 0
        last = False
        try:
            while True:
                out = decompressor.decompress(feed)
                if out:
                    size += len(out)
                    if pending is None:
                        self._copy.write(out)
                    elif size > REFRAME_ABOVE:
                        self._copy.begin(uoffset)
                        for piece in (*pending, out):
                            self._copy.write(piece)
                        pending, self.copied = None, True
                    else:
                        pending.append(out)
                    yield out
                if last:
                    break
                block = self._read(3)
                value = int.from_bytes(block, "little")
                last, kind, length = bool(value & 1), (value >> 1) & 3, value >> 3
                if kind == 3 or length > _MAX_BLOCK:
                    raise CorruptLayer(self._layer, f"bad zstd block in the frame at {start}")
                feed = block + self._read(1 if kind == 1 else length)
                if last and flags & 4:
                    feed += self._read(4)  # the content checksum, checked by the decompressor
        except zstandard.ZstdError as exc:
            raise CorruptLayer(self._layer, f"zstd frame at {start}: {exc}") from None
        if not decompressor.eof:
            raise CorruptLayer(self._layer, f"zstd frame at {start} does not end")
        if pending is None:
            self._copy.end()
            self._reframed = True
