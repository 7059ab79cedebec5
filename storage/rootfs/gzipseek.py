"""gzip layers: seek points from indexed_gzip, made during the pass and used for random reads.

indexed_gzip (zran) keeps a seek point (the 32 KiB window and the bit offset) every
`SPACING` uncompressed bytes. Read in order, it extends its index ahead of each read and
then decompresses from the point behind, so it asks for the compressed bytes twice over a
short distance: `BlobFile`'s recent windows answer the second time (one read of the blob
in all). Its C code holds the GIL, but only between two calls of the file object's `read`
(every `READBUF` compressed bytes), so the trio loop waits a few milliseconds at most
(ROOTFS.md: `build_full_index` alone held it for 2.9 s).

indexed_gzip checks each member's CRC and size, but stops quietly where the compressed
data is cut short: the tar checks (a member's data past the end) and the digest catch that.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import indexed_gzip

from ..digests import Digest
from .blobfile import BlobFile
from .errors import CorruptLayer

MAGIC = b"\x1f\x8b"
SPACING = 1 << 20  # uncompressed bytes between seek points: ~0.4 MB of blob per random read
WINDOW = 32 << 10
READBUF = 256 << 10  # compressed bytes per call of BlobFile.read during the pass
RANDOM_READBUF = 64 << 10  # ... and for a random read, which wants few bytes
CHUNK = 1 << 20


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
    """The decompressed stream of a gzip blob (`chunks()`), then its seek points (`export()`)."""

    def __init__(self, blob: BlobFile, layer: Digest) -> None:
        self._blob = blob
        self._layer = layer
        self._file = _open(blob, READBUF, CHUNK)

    def chunks(self) -> Iterator[bytes]:
        while True:
            try:
                data = self._file.read(CHUNK)
            except OSError as exc:
                raise _failure(self._blob, self._layer, exc) from None
            if not data:
                return
            yield data

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
