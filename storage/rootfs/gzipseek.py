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
most (ROOTFS.md: `build_full_index` in one call held it for 2.9 s). zlib releases it.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from typing import Any

import indexed_gzip

from ..digests import Digest
from .blobfile import BlobFile
from .errors import CorruptLayer

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


def _failure(blob: BlobFile, layer: Digest, exc: Exception) -> BaseException:
    """What a failed indexed_gzip call means: the source's own error, or corrupt data."""
    if blob.error is not None:
        return blob.error
    return CorruptLayer(layer, f"gzip: {exc}")


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

    def export(self) -> bytes:
        out = io.BytesIO()
        self._file.export_index(fileobj=out)
        return out.getvalue()

    def close(self) -> None:
        self._file.close()


class GzipReader:
    """Random reads of a gzip blob from its exported seek points (in a worker thread)."""

    def __init__(self, blob: BlobFile, layer: Digest, index: bytes) -> None:
        self._blob = blob
        self._layer = layer
        self._file = _open(blob, RANDOM_READBUF, RANDOM_READBUF)
        try:
            self._file.import_index(fileobj=io.BytesIO(index))
        except (OSError, ValueError) as exc:
            self._file.close()
            raise CorruptLayer(layer, f"its gzip seek points do not load: {exc}") from None

    def pread(self, offset: int, size: int) -> bytes:
        try:
            self._file.seek(offset)
            data: bytes = self._file.read(size)
        except (OSError, ValueError) as exc:
            raise _failure(self._blob, self._layer, exc) from None
        return data

    def close(self) -> None:
        self._file.close()
