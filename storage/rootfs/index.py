"""A layer's index: its member table and the seek points that make reads of its files lazy.

One streaming pass over the blob (`build`) decompresses it (gzip, zstd or none, told by its
magic bytes; the media type is only a hint), parses the tar headers on the decompressed
stream (`tarscan`) and keeps what random reads need: indexed_gzip's seek points
(`gzipseek`), the zstd frame table (`zstdframes`, big frames re-framed into a local copy),
or nothing for a plain tar. While the blob is read whole in order its digest is checked.
A gzip layer's pass runs in a child process instead (`fastgzip`: one decompression, not
two), and in this process only for the gzip forms the child declines.

The pass runs in a worker thread and reads through the trio loop (`BlobFile`), one pass at
a time (`Indexer`): a build is memory-heavy and competes for the GIL, and doing two at
once would make neither faster on two cores. `Progress` is what the view shows of it.
"""

from __future__ import annotations

import enum
import functools
import gc
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, BinaryIO

import trio

from ..api import BlobReader, local_fileno, read_in_order
from ..digests import Digest
from . import estargz, fastgzip, gzipseek, tarscan, zstdframes
from .blobfile import WINDOW, BlobFile
from .errors import BadLayer, LayerTooLarge
from .estargz import Chunk
from .members import Member
from .tarscan import Limits
from .zstdframes import Frame

if TYPE_CHECKING:
    from .cache import Held, IndexCache

log = logging.getLogger(__name__)

_PLAIN_CHUNK = 1 << 20
PROGRESS_LOG_EVERY = 10.0  # seconds between log lines of a long pass


class Format(enum.Enum):
    TAR = "tar"
    GZIP = "gzip"
    ZSTD = "zstd"
    ESTARGZ = "estargz"  # from the layer's own TOC, no pass (`estargz`)


@dataclass(frozen=True, eq=False)
class LayerIndex:
    """What one pass learned about a layer: enough to list it and to read any file in it.

    `size` is the length of the uncompressed tar (0 for ESTARGZ: not known without a pass);
    `seek_points` the length of indexed_gzip's exported seek points (GZIP), which are in the
    cache's `<hex>.gzi` and never in memory here (~35 MB per GB of tar); `frames` the zstd
    frame table (ZSTD), whose `in_copy` frames are in the cache's re-framed copy; `copy`
    holds the `.gzi` or the copy open while this index lives (an eviction cannot take it
    away); `chunks`
    an eStargz layer's chunks of each file, by the FILE member's `offset`, which is only
    that key for ESTARGZ.
    """

    digest: Digest
    format: Format
    blob_size: int
    size: int
    members: list[Member]
    seek_points: int = 0
    frames: list[Frame] = field(default_factory=list)
    chunks: dict[int, list[Chunk]] = field(default_factory=dict)
    copy: Held | None = field(default=None, repr=False)
    points_sha256: str = ""  # of the `.gzi` (GZIP): a load checks the file against it

    @property
    def reframed(self) -> bool:
        return any(frame.in_copy for frame in self.frames)


@dataclass(frozen=True)
class LayerRef:
    """A layer as the index needs it: its digest, size, media type (a hint), an opener, and
    the manifest's `containerd.io/snapshot/stargz/toc.digest` annotation when it has one."""

    digest: Digest
    size: int
    media_type: str
    open: Callable[[], Awaitable[BlobReader]]
    toc_digest: str = ""


@dataclass
class Progress:
    """How far a layer's pass is: blob bytes read in order out of `total` (read by the view,
    written by the pass's thread; a torn read of two ints is harmless)."""

    layer: Digest
    total: int
    done: int = 0
    started: float | None = None  # monotonic; None while waiting for another build
    logged: float = 0.0  # when the pass last logged how far it is

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - (self.logged or self.started or now) >= PROGRESS_LOG_EVERY:
            self.logged = now
            log.info("%s", self.describe())

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        if self.started is None:
            return 0.0
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def describe(self) -> str:
        if self.started is None:
            return f"{self.layer}: waiting for another layer's index"
        percent = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.layer}: indexing, {percent:.0f}% ({self.done / 1e6:.1f} of"
            f" {self.total / 1e6:.1f} MB, {self.rate / 1e6:.1f} MB/s)"
        )


def detect(head: bytes, media_type: str, layer: Digest) -> Format:
    """The compression, by magic bytes; a media type that says otherwise is only logged."""
    if head.startswith(gzipseek.MAGIC):
        found = Format.GZIP
    elif zstdframes.is_zstd(head[:4]):
        found = Format.ZSTD
    else:
        found = Format.TAR
    said = Format.GZIP if "gzip" in media_type else Format.ZSTD if "zstd" in media_type else None
    if said is not None and said is not found:
        log.warning("layer %s: media type %s but %s data", layer, media_type, found.value)
    return found


def build(
    blob: BlobFile, layer: LayerRef, fmt: Format, out: BinaryIO | None, limits: Limits
) -> LayerIndex:
    """The pass itself, in a worker thread (blocking); BadLayer for what is not a layer.

    `out` receives the re-framed zstd frames (ZSTD) or the seek points (GZIP)."""
    digest = layer.digest
    gzip_pass: gzipseek.GzipPass | None = None
    zstd_pass: zstdframes.ZstdPass | None = None
    if fmt is Format.GZIP:
        gzip_pass = gzipseek.GzipPass(blob, digest)
        chunks = gzip_pass.chunks()
    elif fmt is Format.ZSTD:
        assert out is not None
        zstd_pass = zstdframes.ZstdPass(blob, digest, out)
        chunks = zstd_pass.chunks()
    else:
        chunks = iter(functools.partial(blob.read, _PLAIN_CHUNK), b"")
    try:
        bound = max(limits.expanded_free, limits.expansion * layer.size)
        table = tarscan.scan(_bounded(chunks, blob, bound, digest), digest, limits)
        if gzip_pass is not None:
            assert out is not None
            seek_points, points_sha256 = gzip_pass.export(out)
    finally:
        if gzip_pass is not None:
            gzip_pass.close()
    if not blob.verify():
        log.debug("layer %s: read out of order, digest not checked", digest)
    frames = zstd_pass.frames if zstd_pass is not None else []
    if gzip_pass is None:
        return LayerIndex(digest, fmt, layer.size, table.size, table.members, 0, frames)
    return LayerIndex(
        digest,
        fmt,
        layer.size,
        table.size,
        table.members,
        seek_points,
        points_sha256=points_sha256,
    )


def _bounded(
    chunks: Iterator[bytes], blob: BlobFile, bound: int, digest: Digest
) -> Iterator[bytes]:
    """chunks, up to `bound` bytes in all (LayerTooLarge past it: a decompression bomb), and
    each after a look at the pass's stop: one read of a blob can inflate for minutes."""
    total = 0
    for chunk in chunks:
        blob.check_stop()
        total += len(chunk)
        if total > bound:
            raise LayerTooLarge(digest, f"decompresses past {bound} bytes")
        yield chunk


def _freeze() -> None:
    """Move every object alive now (the new member table among them) out of the cyclic
    GC's reach: a full collection walks each tracked object, and a million `Member`s made
    one take 0.4-0.9 s on a quiet machine (3.9 s under load), holding the GIL and so the
    trio loop. The tables hold no cycles, and frozen objects are still freed by their
    reference counts; what it costs is that cyclic garbage alive at this moment is never
    collected (gc.freeze is O(1): it moves the generations' lists)."""
    gc.freeze()


@dataclass
class _Build:
    """A build in flight: whoever asks for the same layer meanwhile waits for its outcome."""

    done: trio.Event = field(default_factory=trio.Event)
    index: LayerIndex | None = None
    error: BaseException | None = None


class Indexer:
    """Layer indexes on demand: from the cache, else one pass (one at a time), then cached.

    An index still in use (by any image's build) is handed out again, not loaded again:
    images that share a layer share its member table, and `LayerFiles` sees one index of
    the layer, so reads that alternate between the images keep it open (with two, each
    switch closed the layer and opened it again: a HEAD over HTTP, the seek points imported
    again). `progress` holds the layers waiting for or in their pass; `passes` counts
    passes made (a cached index costs none).
    """

    def __init__(
        self, cache: IndexCache, limits: Limits | None = None, *, subprocess: bool = True
    ) -> None:
        self.cache = cache
        self.limits = limits or Limits()
        self.subprocess = subprocess  # gzip layers by `fastgzip`; False for the old pass only
        self.children = fastgzip.Children()  # `keep_spare` at mount, `close` at unmount
        self.progress: dict[Digest, Progress] = {}
        self.passes = 0
        self._limiter = trio.CapacityLimiter(1)
        self._builds: dict[Digest, _Build] = {}
        self._alive: weakref.WeakValueDictionary[Digest, LayerIndex] = weakref.WeakValueDictionary()

    async def index(self, layer: LayerRef) -> LayerIndex:
        """The layer's index; BadLayer (logged here) when the layer is not a valid one."""
        while (pending := self._builds.get(layer.digest)) is not None:
            await pending.done.wait()
            if pending.index is not None:
                return pending.index
            if isinstance(pending.error, Exception):
                raise pending.error
            # the builder was cancelled (its Cancelled is not ours to raise): build it here
        if (alive := self._alive.get(layer.digest)) is not None:
            return alive
        pending = self._builds[layer.digest] = _Build()
        try:
            index = await trio.to_thread.run_sync(self.cache.load, layer.digest)
            if index is not None and index.format is Format.ESTARGZ:
                index = None  # kept by an older regfs: trusted no more (`_from_toc`)
            if index is None and layer.toc_digest:
                index = await self._from_toc(layer)
            if index is None:
                index = await self._build(layer)
            pending.index = self._alive[layer.digest] = index
            _freeze()
            return index
        except BadLayer as exc:
            log.error("%s", exc)
            pending.error = exc
            raise
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            del self._builds[layer.digest]
            pending.done.set()

    async def _from_toc(self, layer: LayerRef) -> LayerIndex | None:
        """An eStargz layer's index from its TOC (no pass); None (and a log line) when the
        TOC is not there or not what the manifest vouches for. Not kept in the cache, which
        every mount of the user shares by layer digest: the TOC is checked against the
        manifest's annotation only, never the blob against its digest, so a source whose
        owner put other bytes under a layer's digest would have its members shown in every
        other source's image of that layer. Reading it again costs one range read."""
        reader = await layer.open()
        try:
            toc = await estargz.read_toc(reader, layer.size, layer.toc_digest, self.limits.members)
        except estargz.Unusable as exc:
            log.info("layer %s: eStargz TOC not used (%s); indexing it", layer.digest, exc)
            return None
        finally:
            await reader.aclose()
        index = LayerIndex(
            layer.digest, Format.ESTARGZ, layer.size, 0, toc.members, chunks=toc.chunks
        )
        log.info("layer %s: %d members from its eStargz TOC", layer.digest, len(toc.members))
        return index

    async def _build(self, layer: LayerRef) -> LayerIndex:
        progress = self.progress[layer.digest] = Progress(layer.digest, layer.size)
        try:
            async with self._limiter:
                progress.started = time.monotonic()
                reader = await layer.open()
                try:
                    index, encoded = await self._pass(layer, reader, progress)
                finally:
                    await reader.aclose()
                await trio.to_thread.run_sync(self.cache.store, index, encoded)
        finally:
            del self.progress[layer.digest]
        took = time.monotonic() - progress.started
        log.info(
            "indexed layer %s (%s, %d members) in %.1f s, %.1f MB/s",
            layer.digest,
            index.format.value,
            len(index.members),
            took,
            layer.size / 1e6 / max(took, 1e-6),
        )
        return index

    async def _pass(
        self, layer: LayerRef, reader: BlobReader, progress: Progress
    ) -> tuple[LayerIndex, bytes | None]:
        """The pass, and the index's file when the pass wrote it already (the gzip child).

        The blob's first window tells the format and is the first of the pass's reads: the
        whole pass reads the blob in order once (`read_in_order`: over HTTP one GET). From
        a local file only the magic bytes: the gzip child reads the blob itself."""
        local = local_fileno(reader) is not None
        head = bytes(await read_in_order(reader, 0, min(4 if local else WINDOW, layer.size)))
        fmt = detect(head, layer.media_type, layer.digest)
        head = b"" if local else head  # not a window
        log.info("indexing layer %s (%s, %d bytes)", layer.digest, fmt.value, layer.size)
        self.passes += 1
        if fmt is Format.GZIP and self.subprocess:
            built = await fastgzip.index_gzip(
                reader, layer, self.cache, self.limits, progress, head, self.children
            )
            if built is not None:
                return built
        stop = threading.Event()
        blob = BlobFile(
            reader,
            layer.digest,
            layer.size,
            trio.lowlevel.current_trio_token(),
            windows=gzipseek.PASS_WINDOWS if fmt is Format.GZIP else 8,
            on_read=progress.update,
            stop=stop,
            head=head,
        )
        try:
            run = functools.partial(self._run, blob, layer, fmt)
            # Abandoned on cancel (an unmount): the thread then stops at its next read.
            return await trio.to_thread.run_sync(run, abandon_on_cancel=True), None
        except BaseException:
            stop.set()
            raise

    def _run(self, blob: BlobFile, layer: LayerRef, fmt: Format) -> LayerIndex:
        """The pass in its worker thread, which owns the file being written beside the index
        (a zstd copy, or gzip seek points)."""
        suffix = {Format.ZSTD: ".zst", Format.GZIP: ".gzi"}.get(fmt)
        pending = self.cache.pending(layer.digest, suffix) if suffix else None
        try:
            index = build(blob, layer, fmt, pending.file if pending else None, self.limits)
        except BaseException:
            if pending is not None:
                pending.discard()
            raise
        if pending is not None:
            if index.reframed or index.seek_points:
                index = replace(index, copy=pending.commit(hold=True))
            else:
                pending.discard()
        return index
