"""gzip layers: seek points from indexed_gzip, made during the pass and used for random reads.

indexed_gzip (zran) keeps a seek point (the 32 KiB window and the bit offset) every
`SPACING` uncompressed bytes. Asked for data while it builds its index, it decompresses
everything twice (it extends the index ahead of each read, then decompresses again from
the point behind): 20 s instead of ~8 s for a 266 MB layer. So the pass decompresses with
zlib for the tar parse, and every `STEP` bytes it moves indexed_gzip up to the same place
with a seek, which extends the index and decompresses only from the last point. Both read
the same `BlobFile` windows, indexed_gzip a step behind, so the blob is read once.

indexed_gzip's C code holds the GIL, but only between two calls of the file object's
`read` (every `READBUF` compressed bytes), so the trio loop waits a few milliseconds at
most (docs/rootfs.md: `build_full_index` in one call held it for 2.9 s). zlib releases it.

The exported points (~35 MB per GB of tar: a 32 KiB window per point) are kept on disk
only, zstd-compressed (`write_points`, the cache's `<hex>.gzi`), never in the `LayerIndex`:
an open indexed_gzip object holds its own copy of them, and a `GzipReader` imports them
from the file at its first read and drops them again on `release()`, so an idle daemon
holds none.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import hashlib
import io
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

import indexed_gzip
import zstandard

from ..digests import Digest
from .blobfile import BlobFile
from .errors import CorruptLayer
from .gzipchild import POINTS_LEVEL

log = logging.getLogger(__name__)
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; musl has none
MAGIC = b"\x1f\x8b"
SPACING = 1 << 20  # uncompressed bytes between seek points: ~0.3 MB of blob per random read
WINDOW = 32 << 10
READBUF = 256 << 10  # compressed bytes per call of BlobFile.read during the pass
RANDOM_READBUF = 64 << 10  # ... and for a random read, which wants few bytes
CHUNK = 1 << 20
STEP = 8 << 20  # indexed_gzip is moved up every STEP uncompressed bytes
# BlobFile windows the pass keeps: indexed_gzip reads up to STEP (plus a point's distance
# and a READBUF) behind zlib, and deflate never makes data much bigger.
PASS_WINDOWS = (STEP + SPACING + READBUF) // (1 << 20) + 4


def _open(blob: BlobFile, readbuf: int, buffer: int) -> Any:
    """indexed_gzip over a BlobFile. auto_build stays on for random reads too: exported
    points do not say the index is complete, and past the last point zran would refuse to
    read (it decompresses on from that point instead)."""
    return indexed_gzip.IndexedGzipFile(
        fileobj=blob,
        spacing=SPACING,
        window_size=WINDOW,
        readbuf_size=readbuf,
        buffer_size=buffer,
    )


def trim() -> None:
    """Give the memory freed by `GzipReader.release` back to the system (glibc's
    `malloc_trim`): the windows are 32 KiB blocks spread over the heap among longer-lived
    objects, which a `free` alone leaves resident (measured: no RSS returned with 10 layers
    released; with one big layer the heap's top shrank)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _failure(blob: BlobFile, layer: Digest, exc: Exception) -> BaseException:
    """What a failed indexed_gzip call means: the source's own error, or corrupt data."""
    if blob.error is not None:
        return blob.error
    return CorruptLayer(layer, f"gzip: {exc}")


class _Stream(io.RawIOBase):
    """A zstd stream as a file without a descriptor: indexed_gzip reads or writes through a
    file's descriptor when it has one, which would go around the (de)compression."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.written = 0

    def readable(self) -> bool:
        return hasattr(self._inner, "read")

    def writable(self) -> bool:
        return hasattr(self._inner, "write")

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        self._inner.write(data)
        self.written += len(data)
        return len(data)


class _Digesting:
    """A file that hashes what is written into it (a `.gzi`'s sha256, which its `.idx`
    keeps: a load then checks the file by hashing it, not by decompressing it)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def write_points(index: Any, file: BinaryIO) -> tuple[int, str]:
    """Export indexed_gzip object `index`'s seek points into `file` as one zstd frame;
    their length (uncompressed) and the sha256 of what was written."""
    compressor = zstandard.ZstdCompressor(level=POINTS_LEVEL, write_checksum=True)
    written = _Digesting(file)
    # zstandard wants a file; it only ever calls write and flush
    with compressor.stream_writer(cast(IO[bytes], written), closefd=False) as out:
        stream = _Stream(out)
        index.export_index(fileobj=stream)
    return stream.written, written.sha256.hexdigest()


@contextlib.contextmanager
def _points(fd: int) -> Iterator[BinaryIO]:
    """The seek points in the file `fd` (from its start), decompressed as they are read."""
    with open(fd, "rb", closefd=False) as file:
        file.seek(0)
        with zstandard.ZstdDecompressor().stream_reader(file) as stream:
            yield io.BufferedReader(_Stream(stream), 1 << 20)


class GzipPass:
    """The decompressed stream of a gzip blob (`chunks()`), then its seek points (`export()`).

    Each gzip member's CRC and length are checked (by zlib); members may follow one another;
    what follows the last one, if it is not a gzip member, is left alone (the digest covers
    it), as gzip(1) and indexed_gzip do.
    """

    def __init__(self, blob: BlobFile, layer: Digest) -> None:
        self._blob = blob
        self._layer = layer
        self._file = _open(blob, READBUF, CHUNK)

    def chunks(self) -> Iterator[bytes]:
        decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
        offset = 0  # blob bytes given to zlib
        produced = stepped = 0
        pending = b""
        fed = False  # whether the current member has begun
        while True:
            if not pending:
                pending = self._blob.window_at(offset)
                offset += len(pending)
                if not pending:
                    break
            fed = True
            try:
                out = decompressor.decompress(pending, CHUNK)
            except zlib.error as exc:
                raise CorruptLayer(self._layer, f"gzip at offset {offset}: {exc}") from None
            pending = decompressor.unconsumed_tail
            if out:
                produced += len(out)
                yield out
                if produced - stepped >= STEP:
                    self._seek(produced)
                    stepped = produced
            if decompressor.eof:
                pending = decompressor.unused_data
                if not pending.startswith(MAGIC[: len(pending)]):
                    break  # not another member: trailing bytes
                decompressor, fed = zlib.decompressobj(zlib.MAX_WBITS | 16), False
        if fed and not decompressor.eof:
            raise CorruptLayer(self._layer, f"gzip data cut short at offset {offset}")
        self._seek(produced)

    def _seek(self, offset: int) -> None:
        try:
            self._file.seek(offset)
        except OSError as exc:
            raise _failure(self._blob, self._layer, exc) from None

    def export(self, file: BinaryIO) -> tuple[int, str]:
        """The seek points into `file` (`write_points`); their length and file's sha256."""
        return write_points(self._file, file)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class SeekPoints:
    """Where the seek points are (uncompressed and compressed offsets, ascending), to tell
    which blob bytes a random read will make indexed_gzip read."""

    uncompressed: list[int]
    compressed: list[int]

    @classmethod
    def of(cls, file: Any) -> SeekPoints:
        points = list(file.seek_points())
        return cls([u for u, _ in points], [c for _, c in points])

    def span(self, offset: int, size: int, blob_size: int) -> tuple[int, int]:
        """The blob bytes [start, end) that `pread(offset, size)` reads: zran starts at
        the last point at or before `offset` (the byte before its compressed offset holds
        its first bits; the first point starts at the header), decompresses `size` bytes
        and at most a buffer (`RANDOM_READBUF`, what its reader reads ahead) past them,
        which the input before the next point holds; input comes in `RANDOM_READBUF`
        reads. Past the last point (or with none) the read may go on to the blob's end.
        Not bounded here: `BlobFile.prefetch` bounds what it fetches."""
        before = bisect.bisect_right(self.uncompressed, offset) - 1
        start = self.compressed[before] - 1 if before > 0 else 0
        after = bisect.bisect_left(self.uncompressed, offset + size + RANDOM_READBUF)
        if after >= len(self.compressed):
            return max(start, 0), blob_size
        return max(start, 0), min(self.compressed[after] + RANDOM_READBUF, blob_size)


class GzipReader:
    """Random reads of a gzip blob (in a worker thread) from its seek points in the file
    `points` (`write_points`; the reader owns the descriptor, reads it from its start, and
    its index holds the file: `LayerIndex.copy`). They are imported at the first read after
    the reader is made or `release`d.

    Before each read the blob bytes it needs (`SeekPoints.span`) are fetched in one
    `BlobFile.prefetch`: over HTTP one range GET per read, not a small one and more after
    it as zran reads on (docs/performance.md). Not for a read that starts where the last
    one ended (a file read on, FUSE request after request): zran goes on from where it
    stopped, not from the point before, and its window-by-window reads stay one sequential
    run for the source (an HTTP reader streams those)."""

    def __init__(self, blob: BlobFile, layer: Digest, points: int) -> None:
        self._blob = blob
        self._layer = layer
        self._points = points
        self._file: Any = None
        self._where: SeekPoints | None = None
        self._next = -1  # where the last read ended: a read from there continues zran's
        self.held = 0  # bytes of seek points in memory now (a window each), as of the last read

    @property
    def blob(self) -> BlobFile:
        return self._blob

    def span(self, offset: int, size: int) -> tuple[int, int] | None:
        """The blob bytes `pread(offset, size)` will prefetch, for a caller that fetches
        them first on the loop (`BlobFile.prefetch_here`); None when it is not known
        without the worker (the points are not loaded yet: the first read, or the first
        after `release`) or the read fetches none first (it goes on from the last one)."""
        if self._where is None or not self._where.compressed or offset == self._next:
            return None
        return self._where.span(offset, size, self._blob.size)

    def pread(self, offset: int, size: int) -> bytes:
        try:
            return self._pread(offset, size)
        finally:
            self.held = self._file.raw.npoints * WINDOW if self._file is not None else 0

    def _pread(self, offset: int, size: int) -> bytes:
        if self._file is None or self._where is None:
            self._file = self._open()
            self._where = SeekPoints.of(self._file)
        self._blob.error = None  # an earlier read's, which this one's failure is not
        goes_on, self._next = offset == self._next, -1
        try:
            if self._where.compressed and not goes_on:
                self._blob.prefetch(*self._where.span(offset, size, self._blob.size))
            self._file.seek(offset)
            data: bytes = self._file.read(size)
        except (OSError, ValueError) as exc:
            raise _failure(self._blob, self._layer, exc) from None
        self._next = offset + len(data)
        return data

    def _open(self) -> Any:
        file = _open(self._blob, RANDOM_READBUF, RANDOM_READBUF)
        try:
            with _points(self._points) as points:
                file.import_index(fileobj=points)
        except (OSError, ValueError, zstandard.ZstdError) as exc:
            file.close()
            raise CorruptLayer(self._layer, f"its gzip seek points do not load: {exc}") from None
        return file

    def release(self) -> None:
        """Drop the points from memory until the next read (never during one)."""
        self._drop()

    def _drop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._where = None
            self._next = -1
            self.held = 0

    def close(self) -> None:
        self._drop()
        if self._points >= 0:
            os.close(self._points)
            self._points = -1
