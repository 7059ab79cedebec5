"""A layer blob as a blocking file object, for the libraries that decompress in a worker thread.

indexed_gzip (and tarfile over it) want `read`/`seek` on a file; a source gives an async
`BlobReader`. `BlobFile` bridges them: it runs in a worker thread and fetches aligned windows
through the trio loop (`trio.from_thread.run` with the loop's token), so the loop is only
ever busy for one `read_at`. A few recent windows are kept: indexed_gzip reads the stream
twice over a short distance (it extends its index, then decompresses from the seek point
behind), and those re-reads then cost nothing. While the blob is read in order from its
start, each new window is hashed, so a pass that reads it whole also checks its digest,
and is fetched with `api.read_in_order`: over HTTP the pass is one GET, not a range GET
per window.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from ..api import BlobReader, read_in_order
from ..digests import Digest
from .errors import CorruptLayer, LayerDigestMismatch
from .tarscan import PieceFile

WINDOW = 1 << 20  # bytes per `read_at` by default


class Stopped(Exception):
    """The pass was abandoned (its caller was cancelled): the worker thread ends here."""


class BlobFile(PieceFile):
    """Reads of one blob of known size, from a worker thread; see the module docstring.

    An error of the source (its exception) is kept in `error`, because a C library that
    calls `read` turns it into its own error: the caller re-raises it from there.
    """

    def __init__(
        self,
        reader: BlobReader,
        layer: Digest,
        size: int,
        token: trio.lowlevel.TrioToken,
        *,
        window: int = WINDOW,
        windows: int = 8,
        on_read: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
        verify: bool = True,
        head: bytes = b"",
    ) -> None:
        """`head`: the blob's first window, already read (in order) by the caller."""
        super().__init__()
        self.layer = layer
        self.size = size
        self.bytes_read = 0  # fetched from the source, re-reads included
        self.error: BaseException | None = None
        self._reader = reader
        self._token = token
        self._window = window
        self._windows = windows
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._on_read = on_read
        self._stop = stop
        # None once a window was read out of order (or for random reads: nothing to check)
        self._hash: Any = hashlib.sha256() if verify else None
        self._hashed = 0
        if head:
            self._keep(0, self._whole(head, 0, min(window, size)))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def _piece(self, position: int) -> tuple[bytes, int] | None:
        if position >= self.size:
            return None
        start = position - position % self._window
        return self._fetch(start), start

    def window_at(self, offset: int) -> bytes:
        """The bytes from `offset` to the end of their window (b"" at the end of the blob),
        leaving the position alone: a second reader in the same thread, a little ahead."""
        found = self._piece(offset)
        if found is None:
            return b""
        data, start = found
        return data[offset - start :]

    def prefetch(self, start: int, end: int) -> None:
        """Fetch the windows over [start, end) that are not cached in ONE `read_at`, so
        that the reads which follow find them: a remote source then makes one exact GET
        instead of a small one and others widened after it. Bounded: the windows fetched
        never exceed what the cache holds less one (more would evict their own start);
        past that, reads fetch as they go. Cached windows at either end are not fetched
        again, and are made the most recent, so that the new ones do not evict them.
        Errors are those of `_fetch` (kept in `error`, raised); a failed or cancelled
        prefetch caches nothing."""
        if (missing := self._missing(start, end)) is not None:
            first, last = missing
            self._store(first, self._read(first, last - first))

    async def prefetch_here(self, start: int, end: int) -> None:
        """`prefetch` from the trio loop (not from the worker thread): the windows' one
        `read_at` is awaited here, so the worker's read that follows finds them cached
        and needs no hop back to the loop. Over HTTP a gzip read then crosses threads
        four times, not six (docs/performance.md, "stop 27, i"). The source's error is
        raised as itself; a failed or cancelled one caches nothing. Not for a blob read
        in order to be hashed (a pass): that goes on in the worker as it reads."""
        if self._hash is not None:
            return
        if (missing := self._missing(start, end)) is not None:
            first, last = missing
            got = await self._reader.read_at(first, last - first)
            self._store(first, self._whole(bytes(got), first, last - first))

    def _missing(self, start: int, end: int) -> tuple[int, int] | None:
        """The windows [first, last) of `prefetch(start, end)` that are not cached (None:
        all are), bounded as `prefetch` says; the cached ones are made the most recent."""
        if end <= start:
            return None
        first = max(start, 0) - max(start, 0) % self._window
        end = min(end, self.size, first + self._window * (self._windows - 1))
        last = min(end + (-end) % self._window, self.size)
        for at in range(first, last, self._window):  # kept: the new windows evict others
            if at in self._cache:
                self._cache.move_to_end(at)
        while first < last and first in self._cache:
            first += self._window
        while first < last and last - (last - 1) % self._window - 1 in self._cache:
            last -= (last - 1) % self._window + 1
        return (first, last) if first < last else None

    def _store(self, first: int, data: bytes) -> None:
        for at in range(first, first + len(data), self._window):
            self._keep(at, data[at - first : at - first + self._window])

    def _fetch(self, start: int) -> bytes:
        data = self._cache.get(start)
        if data is not None:
            self._cache.move_to_end(start)
            return data
        data = self._read(start, min(self._window, self.size - start))
        self._keep(start, data)
        return data

    def check_stop(self) -> None:
        """Stopped if the pass was given up (an unmount, a cancel): checked at each read, and
        by a decompressor between the chunks it makes of one read."""
        if self._stop is not None and self._stop.is_set():
            raise Stopped

    def _read(self, start: int, want: int) -> bytes:
        """`want` bytes at `start` from the source, in one `read_at` through the loop."""
        self.check_stop()
        # The next window of the in-order hash: read as part of one stream to the end.
        read = read_in_order if start == self._hashed and self._hash is not None else None
        try:
            if read is not None:
                got = trio.from_thread.run(read, self._reader, start, want, trio_token=self._token)
            else:
                got = trio.from_thread.run(
                    self._reader.read_at, start, want, trio_token=self._token
                )
        except BaseException as exc:
            self.error = exc
            raise
        return self._whole(bytes(got), start, want)

    def _whole(self, data: bytes, start: int, want: int) -> bytes:
        """`data`, read at `start`, if it is the `want` bytes asked for (CorruptLayer)."""
        if len(data) != want:
            why = f"{len(data)} bytes at offset {start}, {want} expected: shorter than its size"
            self.error = CorruptLayer(self.layer, why)
            raise self.error
        self.bytes_read += len(data)
        return data

    def _keep(self, start: int, data: bytes) -> None:
        """Cache the window at `start` (the least recently used leaves), hashing it when
        it is the next in order."""
        if self._hash is not None:
            if start == self._hashed:
                self._hash.update(data)
                self._hashed += len(data)
                if self._on_read is not None:
                    self._on_read(self._hashed)
            elif start > self._hashed:
                self._hash = None  # a gap: this pass cannot vouch for the digest
        self._cache[start] = data
        self._cache.move_to_end(start)
        if len(self._cache) > self._windows:
            self._cache.popitem(last=False)

    def verify(self) -> bool:
        """Read what the pass left unread (a tail after the data), then compare the digest.

        False when the pass skipped around, so that no digest could be computed."""
        if self._hash is None:
            return False
        while self._hashed < self.size and self._hash is not None:
            self._cache.pop(self._hashed, None)  # never cached unhashed; made sure of here
            self._fetch(self._hashed)
        if self._hash is None:
            return False
        actual = self._hash.hexdigest()
        if actual != self.layer.hex:
            raise LayerDigestMismatch(self.layer, f"its bytes hash to sha256:{actual}")
        return True
