"""Reads of files inside indexed layers: only the blob bytes a read needs.

A plain tar's file is a range of the blob. A gzip layer's is decompressed by indexed_gzip
from the seek point before it (in a worker thread, through `BlobFile`, ~0.4 MB of blob at
1 MiB spacing). A zstd layer's is decompressed from the frames that hold it (from the blob,
or from the cache's re-framed copy), the last few kept, since a sequential `cat` reads one
frame in many FUSE requests; an eStargz layer's from its chunks' gzip members, the same
way, each checked against its digest. The open state of the most recently used layers is
kept in an LRU; `aclose()` closes it all (and must be awaited before exit: see docs/rootfs.md on
native decompressors left open at interpreter exit). A gzip layer's seek points (~35 MB per
GB of tar in indexed_gzip) are loaded from the cache at its first read and dropped once it
has not been read for `idle` seconds, until its next read.
"""

from __future__ import annotations

import functools
import logging
import os
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio
import zstandard

from ..api import BlobReader
from ..digests import Digest
from .blobfile import BlobFile
from .cache import IndexCache
from .errors import CorruptLayer
from .estargz import Chunk, chunk_bytes
from .gzipseek import GzipReader, trim
from .index import Format, LayerIndex, LayerRef
from .members import Kind, Member
from .zstdframes import Frame, decompress, frames_at

_INLINE_FRAME = 1 << 20  # a larger frame is decompressed in a worker thread
_KEPT = 4  # decompressed zstd frames or eStargz chunks kept per open layer
_MAX_CHUNK_MEMBER = 64 << 20  # compressed bytes read for one eStargz chunk
_GZIP_WINDOW = 64 << 10  # BlobFile windows for random gzip reads: a read needs few bytes
_GZIP_WINDOWS = 16
IDLE = 30.0  # seconds without a read before a gzip layer's seek points leave memory

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Open:
    """One layer's open state; `lock` serialises its decompressor, which is not reentrant."""

    index: LayerIndex
    reader: BlobReader
    lock: trio.Lock = field(default_factory=trio.Lock)
    gzip: GzipReader | None = None
    used: float = 0.0  # trio time of its last gzip read
    kept: OrderedDict[tuple[int, int], bytes] = field(default_factory=OrderedDict)
    closed: bool = False

    @property
    def weight(self) -> int:
        """Memory held now: seek points while indexed_gzip has them (from a layer's first
        read until it is idle), decompressed frames or chunks kept."""
        return (self.gzip.held if self.gzip is not None else 0) + sum(map(len, self.kept.values()))

    @property
    def reading(self) -> int:
        """Memory held once a read has brought a gzip layer's seek points back."""
        if self.index.format is not Format.GZIP:
            return self.weight
        return max(self.weight, self.index.seek_points + sum(map(len, self.kept.values())))

    async def aclose(self) -> None:
        async with self.lock:
            self.closed = True
            if self.gzip is not None:
                self.gzip.close()
                self.gzip = None
            await self.reader.aclose()


class LayerFiles:
    """File reads from indexed layers, with an LRU of open layers (`max_open`, `max_bytes`)."""

    def __init__(
        self, cache: IndexCache, max_open: int = 8, max_bytes: int = 256 << 20, idle: float = IDLE
    ) -> None:
        self.cache = cache
        self.max_open = max_open
        self.max_bytes = max_bytes
        self.idle = idle
        self._open: OrderedDict[Digest, _Open] = OrderedDict()
        self._releasing: trio.CancelScope | None = None
        self._preparing: dict[trio.CancelScope, trio.Event] = {}  # opens ahead, and their end
        self._opening: dict[Digest, trio.Event] = {}  # layers being opened

    async def read(
        self, layer: LayerRef, index: LayerIndex, member: Member, offset: int, size: int
    ) -> bytes:
        """Up to `size` bytes of the file `member` at `offset`; fewer only at its end."""
        if member.kind is not Kind.FILE:
            raise ValueError(f"{member.path!r} is not a regular file")
        size = max(0, min(size, member.size - offset))
        if size == 0:
            return b""
        start = member.offset + offset
        while True:
            opened = await self._get(layer, index)
            async with opened.lock:  # also keeps an eviction from closing it under this read
                if opened.closed:  # evicted while this read waited: open it again
                    continue
                if index.format is Format.TAR:
                    data = bytes(await opened.reader.read_at(start, size))
                elif index.format is Format.GZIP:
                    gzip = await self._gzip(opened, layer)
                    opened.used = trio.current_time()
                    if (span := gzip.span(start, size)) is not None:
                        # Fetched here, so that the worker's read needs no hop back to
                        # the loop for it (docs/performance.md, "stop 27, i").
                        await gzip.blob.prefetch_here(*span)
                    data = await trio.to_thread.run_sync(gzip.pread, start, size)
                    opened.used = trio.current_time()
                    if self._releasing is None:
                        self._releasing = trio.CancelScope()
                        trio.lowlevel.spawn_system_task(self._release_idle, self._releasing)
                elif index.format is Format.ESTARGZ:
                    data = await self._estargz(opened, layer, member, offset, size)
                else:
                    data = await self._zstd(opened, layer, start, size)
                break
        if len(data) != size:
            raise CorruptLayer(
                layer.digest, f"{len(data)} bytes of {member.path!r}, {size} expected"
            )
        return data

    @property
    def held(self) -> int:
        """Bytes the open layers hold in memory (what `max_bytes` bounds)."""
        return sum(o.weight for o in self._open.values())

    def prepare(self, layers: Sequence[tuple[LayerRef, LayerIndex]]) -> None:
        """Open these layers (an image's, once indexed) in the background, so that the first
        read of each finds it open: opening one may cost the source a round trip (over HTTP
        a HEAD of the blob, for its size), which then runs while the view merges the image,
        not in that read's way. The last `max_open` only (the bound would close the others
        at once); a failure is left for the read, which opens the layer again."""
        scope, done = trio.CancelScope(), trio.Event()
        self._preparing[scope] = done
        trio.lowlevel.spawn_system_task(self._prepare, layers[-self.max_open :], scope, done)

    async def _prepare(
        self,
        layers: Sequence[tuple[LayerRef, LayerIndex]],
        scope: trio.CancelScope,
        done: trio.Event,
    ) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for layer, index in layers:
                        nursery.start_soon(self._prepare_one, layer, index)
        finally:
            del self._preparing[scope]
            done.set()

    async def _prepare_one(self, layer: LayerRef, index: LayerIndex) -> None:
        if layer.digest in self._open:
            return
        try:
            await self._get(layer, index, reading=False)
        except Exception as exc:  # a system task must not raise: the read will meet it
            log.debug("layer %s not opened ahead of its reads: %s", layer.digest, exc)

    async def aclose(self) -> None:
        for scope, done in list(self._preparing.items()):
            scope.cancel()
            await done.wait()
        if self._releasing is not None:
            self._releasing.cancel()
        while self._open:
            await self._open.popitem()[1].aclose()

    async def _get(self, layer: LayerRef, index: LayerIndex, reading: bool = True) -> _Open:
        while (opening := self._opening.get(layer.digest)) is not None:
            await opening.wait()  # one open of a layer at a time: its outcome may serve
        opened = self._open.get(layer.digest)
        if opened is not None and opened.index is index:
            self._open.move_to_end(layer.digest)
        else:
            opened = await self._opened(layer, index)
        await self._bound(opened, opened.reading if reading else opened.weight)
        return opened

    async def _opened(self, layer: LayerRef, index: LayerIndex) -> _Open:
        """The layer opened (one open at a time per layer: a read that comes while an open
        ahead waits for the source takes that one, not a second round trip)."""
        opening = self._opening[layer.digest] = trio.Event()
        try:
            reader = await layer.open()
        finally:
            del self._opening[layer.digest]
            opening.set()
        stale = self._open.pop(layer.digest, None)  # the layer re-indexed since it was opened
        opened = self._open[layer.digest] = _Open(index, reader)
        if stale is not None:
            await _shielded(stale.aclose)
        return opened

    async def _bound(self, opened: _Open, weight: int) -> None:
        """Close the least recently used other layer while more than `max_open` are open,
        and the least recently used other one holding memory while they hold more than
        `max_bytes` with `opened` holding `weight` (a read brings a gzip layer's released
        points back: `_Open.reading`; a layer whose points were released holds none)."""
        while True:
            others = [(d, o) for d, o in self._open.items() if o is not opened]
            if len(self._open) <= self.max_open:
                if self.held - opened.weight + weight <= self.max_bytes:
                    return
                others = [(d, o) for d, o in others if o.weight]
            if not others:
                return
            digest, victim = others[0]
            del self._open[digest]
            await _shielded(victim.aclose)

    async def _gzip(self, opened: _Open, layer: LayerRef) -> GzipReader:
        if opened.gzip is None:
            blob = BlobFile(
                opened.reader,
                layer.digest,
                layer.size,
                trio.lowlevel.current_trio_token(),
                window=_GZIP_WINDOW,
                windows=_GZIP_WINDOWS,
                verify=False,
            )
            held = opened.index.copy
            if held is None:  # an index not from the cache or a pass: nothing to read
                raise CorruptLayer(layer.digest, "its gzip seek points are not held")
            # A descriptor of its own (its own offset) on the file the index holds.
            points = os.open(f"/proc/self/fd/{held.fd}", os.O_RDONLY | os.O_CLOEXEC)
            opened.gzip = GzipReader(blob, layer.digest, points)
        return opened.gzip

    async def _release_idle(self, scope: trio.CancelScope) -> None:
        """Drop the seek points of the gzip layers not read for `idle` seconds; a system
        task, running while any are held, so that an idle daemon holds none."""
        with scope:
            while held := [o for o in self._open.values() if o.gzip is not None and o.gzip.held]:
                wake = min(o.used for o in held) + self.idle
                await trio.sleep(max(wake - trio.current_time(), min(self.idle, 1.0)))
                released = False
                for o in held:
                    if o.used + self.idle <= trio.current_time():
                        released |= await _release(o)
                if released:
                    await trio.to_thread.run_sync(trim)
        self._releasing = None

    async def _zstd(self, opened: _Open, layer: LayerRef, start: int, size: int) -> bytes:
        pieces = []
        for frame in frames_at(opened.index.frames, start, size):
            make = functools.partial(self._frame, opened, layer, frame)
            data = await _kept(opened, (frame.uoffset, 0), make)
            pieces.append(_part(data, frame.uoffset, start, size))
        return b"".join(pieces)

    async def _estargz(
        self, opened: _Open, layer: LayerRef, member: Member, offset: int, size: int
    ) -> bytes:
        pieces = []
        for chunk in opened.index.chunks.get(member.offset, []):
            if chunk.start < offset + size and offset < chunk.start + chunk.size:
                make = functools.partial(self._chunk, opened, layer, chunk)
                data = await _kept(opened, (chunk.coffset, chunk.inner), make)
                pieces.append(_part(data, chunk.start, offset, size))
        return b"".join(pieces)

    async def _chunk(self, opened: _Open, layer: LayerRef, chunk: Chunk) -> bytes:
        if chunk.cend - chunk.coffset > _MAX_CHUNK_MEMBER:
            why = f"an eStargz chunk of {chunk.cend - chunk.coffset} compressed bytes"
            raise CorruptLayer(layer.digest, why)
        compressed = bytes(await opened.reader.read_at(chunk.coffset, chunk.cend - chunk.coffset))
        try:
            if chunk.size <= _INLINE_FRAME:
                return chunk_bytes(chunk, compressed)
            return await trio.to_thread.run_sync(chunk_bytes, chunk, compressed)
        except (ValueError, zlib.error) as exc:
            raise CorruptLayer(layer.digest, f"eStargz chunk at {chunk.coffset}: {exc}") from None

    async def _frame(self, opened: _Open, layer: LayerRef, frame: Frame) -> bytes:
        if frame.in_copy:
            copy = opened.index.copy
            if copy is None:  # an index not from the cache or a pass: nothing to read
                raise CorruptLayer(layer.digest, "its re-framed zstd copy is not held")
            compressed = os.pread(copy.fd, frame.csize, frame.coffset)
        else:
            compressed = bytes(await opened.reader.read_at(frame.coffset, frame.csize))
        try:
            if frame.usize <= _INLINE_FRAME:
                data = decompress(frame, compressed)
            else:
                data = await trio.to_thread.run_sync(decompress, frame, compressed)
        except zstandard.ZstdError as exc:
            where = "its local copy" if frame.in_copy else "the blob"
            why = f"zstd frame at {frame.coffset} of {where}: {exc}"
            raise CorruptLayer(layer.digest, why) from None
        return data


async def _shielded(close: Callable[[], Awaitable[None]]) -> None:
    """Close what is no longer in `_open` even if the task is cancelled meanwhile (an open
    ahead at unmount): nothing else would close it."""
    with trio.CancelScope(shield=True):
        await close()


async def _release(opened: _Open) -> bool:
    """Release an idle layer's seek points, unless a read has it (then it is not idle);
    whether it did. In a worker thread: points a reader made must be written out first."""
    try:
        opened.lock.acquire_nowait()
    except trio.WouldBlock:
        return False
    try:
        if opened.closed or opened.gzip is None:
            return False
        await trio.to_thread.run_sync(opened.gzip.release)
        return True
    finally:
        opened.lock.release()


async def _kept(opened: _Open, key: tuple[int, int], make: Callable[[], Awaitable[bytes]]) -> bytes:
    """A decompressed frame or chunk, from the few kept per layer or made now."""
    data = opened.kept.get(key)
    if data is not None:
        opened.kept.move_to_end(key)
        return data
    data = opened.kept[key] = await make()
    while len(opened.kept) > _KEPT:
        opened.kept.popitem(last=False)
    return data


def _part(data: bytes, data_start: int, start: int, size: int) -> bytes:
    """Of `data` (which begins at `data_start`), what lies in [start, start + size)."""
    low = max(start, data_start) - data_start
    return data[low : start + size - data_start]
