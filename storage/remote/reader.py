"""Reading a remote layer: the range windows, their read-ahead, and the digest check.

Apart from registry.py because this is the read path of a remote mount, with its own rules
(docs/concurrency.md, "Remote mounts"): sequential windows take turns on one open response,
read-ahead runs in system tasks under a mount-wide budget, and a blob read whole in order is
hashed as it arrives, so a registry that sends other bytes than the digest says is not
believed (docs/security.md).
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import ClassVar

import trio

from ..api import BlobInfo, Buffer
from ..errors import CorruptEntry
from .client import RemoteClient
from .ranges import OpenBody
from .untrusted import shown

log = logging.getLogger(__name__)

READ_AHEAD_MIN = 128 << 10  # a sequential run's first window; each next one is twice as large
READ_AHEAD_MAX = 8 << 20
STREAM_AFTER = 4 << 20  # a sequential run this long is read from one open-ended GET
READ_AHEAD_TOTAL = 256 << 20  # for all open files of a mount together
HASH_ON_THREAD = 64 << 10  # smaller reads are hashed on the loop: a thread costs more
RUNS_KEPT = 8  # recent runs whose lengths widen a jump's window
WIDEN_MAX = 1 << 20  # the most a jump's window is widened by
RESUMES = 3  # times in a row a dropped GET of a blob read in order is opened again


class ReadAheadBudget:
    """The bytes that every remote reader of a mount may hold in read-ahead together.

    Each open file keeps at most KEEP windows; this caps them all: a window larger than its
    read is taken from the budget, and a read that finds it spent fetches only what it asks.
    """

    def __init__(self, total: int = READ_AHEAD_TOTAL) -> None:
        self.total = total
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.total:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


@dataclass
class InOrderDigest:
    """The sha256 of what a reader fetched of a blob, in offset order, so that once it has
    fetched the whole blob its bytes are checked against the digest: a registry that sends
    other bytes for `layers/sha256:...` is not believed.

    Windows are fetched several at once (read-ahead) and finish in any order: one that lands
    ahead of what is claimed waits here (up to AHEAD_MAX bytes, and starting at most
    AHEAD_MAX ahead: no reader in order leaves such a gap, and a random one, as rootfs/
    reads a layer, held its windows here up to the bound: 15-19 MB more daemon RSS after
    40 files); a reader that skips about leaves the blob unchecked, as a partial read must.
    `claim` and `hash` are apart so that the hashing can run on a thread, in the order of
    the claims."""

    AHEAD_MAX: ClassVar[int] = 32 << 20  # a few read-ahead windows
    AHEAD_PIECES: ClassVar[int] = 64

    length: int
    claimed: int = 0  # bytes handed out to be hashed, in order
    done: bool = False  # checked, or given up
    _sha: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)
    _ahead: dict[int, bytes] = field(default_factory=dict, repr=False)
    _ahead_size: int = 0

    def claim(self, offset: int, data: Buffer) -> tuple[list[Buffer], bool]:
        """The pieces that bytes fetched at `offset` make hashable now, in order (for
        `hash`), and whether they complete the blob."""
        if self.done or offset + len(data) <= self.claimed:
            return [], False
        if offset > self.claimed:
            parked = self._ahead.get(offset, b"")
            if len(data) > len(parked):  # a shorter window at the same start adds nothing
                self._ahead_size += len(data) - len(parked)
                self._ahead[offset] = bytes(data)  # no copy of a window's bytes
            if (
                offset - self.claimed > self.AHEAD_MAX
                or self._ahead_size > self.AHEAD_MAX
                or len(self._ahead) > self.AHEAD_PIECES
            ):
                self.done, self._ahead = True, {}  # not read in order: not checked
            return [], False
        pieces = [self._next(offset, data)]
        while self._ahead and (first := min(self._ahead)) <= self.claimed:
            parked = self._ahead.pop(first)
            self._ahead_size -= len(parked)
            pieces.append(self._next(first, parked))
        if self.claimed < self.length:
            return pieces, False
        self.done, self._ahead = True, {}
        return pieces, True

    def _next(self, offset: int, data: Buffer) -> Buffer:
        piece = data[max(self.claimed - offset, 0) :]
        self.claimed = max(self.claimed, offset + len(data))
        return piece

    def hash(self, pieces: list[Buffer]) -> None:
        """Hash claimed pieces, in the order claimed (hashlib lets other threads run)."""
        for piece in pieces:
            self._sha.update(piece)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _Window:
    """One Range GET of a reader: bytes [start, end), once `done` is set (unless it failed).
    `charged` is what it holds of the read-ahead budget."""

    def __init__(self, start: int, end: int, charged: int = 0) -> None:
        self.start = start
        self.end = end
        self.charged = charged
        self.data = b""
        self.failed = False
        self.done = trio.Event()
        self.streamed = False  # read from the reader's open response, in turn
        self.after: trio.Event | None = None  # the turn before: the previous streamed window


class RemoteLayerReader:
    """Range GETs; a read that follows the previous one doubles the read-ahead (to 8 MiB),
    so a sequential read streams in large requests and a random read costs one.

    As the kernel's read-ahead does, a sequential run earns it as it goes: its first windows
    are bounded range GETs (128 KiB, then twice as large each, one window ahead), and only a
    run of STREAM_AFTER opens the GET to the blob's end and fetches DEPTH windows ahead. A
    reader that takes two adjacent 64 KiB reads and jumps (a gzip seek point, then another
    file) so costs a few hundred KiB, not an open stream that the registry fills its socket
    buffers with before it is closed (12-13 MB per 100 KB file, measured by bench.rootfs).

    The kernel sends a file's reads several at a time, and they run concurrently: a read
    counts as sequential when it starts where the previous one *asked* to end (not where a
    finished one ended), and a read inside a window still in flight waits for that window
    instead of sending its own request. Otherwise every read of a `cat` would look random
    and cost one small request. A sequential read also starts fetching the window after
    its own (system tasks: the reader has no nursery), so the next requests are under way
    while this window is read. At most KEEP windows are kept: 4 x 8 MiB per open file.

    A jump (a read that does not follow the previous one) starts a run. Its window is widened
    by what the reader's recent runs read past their first read (the upper quartile of the
    last RUNS_KEPT, at most WIDEN_MAX): the rootfs reader decompresses 64 KiB at a time from
    a gzip seek point to the end of a file, 200-450 KiB of blob, and each range GET costs a
    round trip and, from docker-registry 2.8, a 4 MiB read of the blob file whatever its
    size (its blob reader's buffer), so one GET per file instead of three or four saves
    most of a small file's time. A caller that reads exactly what it needs in one read per
    jump (zstd frames, eStargz chunks, small tar members) never runs on: its jumps stay
    exact. Reads inside that first window fetch nothing ahead (it usually holds the whole
    run; measured as bench.rootfs does: fewer bytes and no slower files than with read-ahead
    from its middle or last quarter); a run that outgrows it goes on as any sequential run,
    from the read that misses (docs/performance.md).
    """

    DEPTH = 2  # windows fetched ahead of a sequential reader, once it streams
    KEEP = DEPTH + 2  # windows kept: behind (late reads), current, ahead

    def __init__(
        self, client: RemoteClient, url: str, info: BlobInfo, budget: ReadAheadBudget
    ) -> None:
        self.client = client
        self.url = url
        self.budget = budget
        self.digest = info.digest
        self.length = info.size
        self.created_ns = info.mtime_ns
        self._windows: list[_Window] = []
        self._ahead = READ_AHEAD_MIN  # the size of the sequential run's next window
        self._next = -1
        self._run = 0  # where the current sequential run started
        self._run_first = 0  # the size of its first read
        self._runs: deque[int] = deque(maxlen=RUNS_KEPT)  # how far recent runs read on
        self._opening: _Window | None = None  # the window the current run's jump fetched
        self._stream: OpenBody | None = None
        self._in_order: OpenBody | None = None  # the GET of `read_in_order`
        self._no_stream = False  # one could not be had: read_in_order is read_at
        self._last_turn: trio.Event | None = None
        self._check = InOrderDigest(info.size)
        self._hashing = trio.Lock()
        self._corrupt: CorruptEntry | None = None

    async def read_at(self, offset: int, size: int) -> Buffer:
        """A view into the window that holds the bytes (immutable, kept alive by the view):
        FUSE replies from it without a copy (the copy was a ninth of the daemon's CPU in perf).
        CorruptEntry once the reader has fetched the whole blob in order and its bytes do
        not match the digest: on the read whose bytes completed it, and every read after."""
        if self._corrupt is not None:
            raise self._corrupt
        end = min(offset + size, self.length)
        if end <= offset:
            return b""
        sequential = offset == self._next
        if not sequential:
            self._jump(offset, size)
        self._next = offset + size
        window = self._covering(offset, end)
        fetch = window is None
        if window is None:
            want = self._grow(size) if sequential else self._widened(size)
            charged = want if want > size and self.budget.take(want) else 0
            if not charged:
                want = size
            window = self._add(offset, min(offset + want, self.length), charged)
            if sequential and self._streams():
                self._stream_in_turn(window)
        if not sequential:
            self._opening = window if fetch else None
        elif window is not self._opening:
            self._read_ahead(window.end)
        if fetch:
            await self._fetch(window)
        else:
            await window.done.wait()
            if window.failed:  # whoever fetched it got the error; try again, alone
                window = _Window(offset, end)
                await self._fetch(window)
        if self._corrupt is not None:
            raise self._corrupt
        return memoryview(window.data)[offset - window.start : end - window.start]

    async def read_in_order(self, offset: int, size: int) -> Buffer:
        """`read_at` for a caller that reads the blob from `offset` to its end in order and
        checks its digest itself (the rootfs index pass): one GET to the end (a plain GET
        from the start), `size` bytes at a time, so no range GET per window; not hashed
        here. A connection that breaks is opened again where it stopped (`Range: bytes=N-`),
        up to RESUMES times in a row. Where no open response can be had (the registry
        refuses it, or wants a login the client has not made yet), `read_at` serves, with
        the client's retries and errors, this read and the ones after."""
        end = min(offset + size, self.length)
        if end <= offset:
            return b""
        for attempt in range(RESUMES + 1):
            stream = self._in_order
            if stream is None or stream.position != offset:
                if stream is not None:
                    stream.close()
                self._in_order = stream = None
                if not self._no_stream:
                    # Abandoned on cancel: an unmount during a pass must not wait for it.
                    stream = await self.client.open_range(
                        self.url, offset, self.length, abandon=True
                    )
                if stream is None:
                    self._no_stream = True
                    break
                self._in_order = stream
            try:
                return await self.client.read_open(stream, end - offset)
            except (OSError, HTTPException) as exc:
                log.warning(
                    "GET of layer %s broke at byte %d (%s), try %d of %d",
                    self.digest,
                    stream.position,
                    shown(exc),
                    attempt + 1,
                    RESUMES + 1,
                )
                stream.close()
                self._in_order = None
        return await self.read_at(offset, size)

    async def _verify(self, offset: int, data: bytes) -> None:
        """Hash a window's bytes once they are next in order, on a thread (sha256 on the
        event loop took a fifth of a cold read's throughput); on a mismatch once the blob
        is complete, log it and fail the reads from then on. Shielded: bytes claimed and
        left unhashed would make the digest wrong."""
        pieces, complete = self._check.claim(offset, data)
        if not pieces:
            return
        with trio.CancelScope(shield=True):
            async with self._hashing:  # FIFO: hashed in the order claimed
                if sum(len(p) for p in pieces) < HASH_ON_THREAD:
                    self._check.hash(pieces)
                else:
                    await trio.to_thread.run_sync(self._check.hash, pieces)
        if not complete or (actual := self._check.hexdigest()) == self.digest.hex:
            return
        log.error(
            "layer %s: the registry sent %d bytes whose digest is sha256:%s: refused (EIO)",
            self.digest,
            self.length,
            actual,
        )
        self._corrupt = CorruptEntry(
            f"layer {self.digest}", f"the registry sent bytes whose digest is sha256:{actual}"
        )

    def _jump(self, offset: int, size: int) -> None:
        """A read elsewhere ends the run: keep how far it read past its first read."""
        if self._next >= 0:
            self._runs.append(max(self._next - self._run - self._run_first, 0))
        self._run, self._run_first, self._ahead = offset, size, READ_AHEAD_MIN

    def _widened(self, size: int) -> int:
        """A jump's window: `size`, plus what the recent runs' upper quartile read on."""
        if len(self._runs) < 2:
            return size
        return size + min(sorted(self._runs)[len(self._runs) * 3 // 4], WIDEN_MAX)

    def _streams(self) -> bool:
        """Whether the sequential run is long enough to be read from an open-ended GET."""
        return self._next - self._run >= STREAM_AFTER

    def _grow(self, size: int) -> int:
        """The size of the run's next window (at least `size`); the one after is twice it."""
        want = max(self._ahead, size)
        self._ahead = min(want * 2, READ_AHEAD_MAX)
        return want

    def _read_ahead(self, start: int) -> None:
        """Have the windows after `start` fetched or on their way (one, or DEPTH once the
        run streams), each one as large as the read-ahead has grown."""
        streams = self._streams()
        for _ in range(self.DEPTH if streams else 1):
            if start >= self.length:
                return
            window = self._covering(start, start + 1)
            if window is None:
                want = self._grow(0)
                if not self.budget.take(want):
                    return  # the mount's read-ahead is spent: reads fetch what they ask
                window = self._add(start, min(start + want, self.length), want)
                if streams:
                    self._stream_in_turn(window)
                trio.lowlevel.spawn_system_task(self._prefetch, window)
            start = window.end

    def _covering(self, start: int, end: int) -> _Window | None:
        for window in reversed(self._windows):
            if window.start <= start and end <= window.end and not window.failed:
                return window
        return None

    def _add(self, start: int, end: int, charged: int) -> _Window:
        window = _Window(start, end, charged)
        kept = self._windows[-(self.KEEP - 1) :]
        for dropped in self._windows[: len(self._windows) - len(kept)]:
            self.budget.give(dropped.charged)
        self._windows = [*kept, window]
        return window

    def _stream_in_turn(self, window: _Window) -> None:
        window.streamed, window.after = True, self._last_turn
        self._last_turn = window.done

    async def _fetch(self, window: _Window) -> None:
        try:
            body = None
            if window.streamed:
                if window.after is not None:
                    await window.after.wait()
                body = await self._from_stream(window)
            if body is None:
                body = await self.client.get_range(self.url, window.start, window.end)
            window.data = body
            window.end = window.start + len(body)
            await self._verify(window.start, body)
        except BaseException:
            window.failed = True
            raise
        finally:
            window.done.set()

    async def _from_stream(self, window: _Window) -> bytes | None:
        """The window's bytes from the reader's open response, opened (again) where the
        window starts if need be; None if that fails (the caller asks by range instead).
        Streamed windows take turns, so one read at a time uses the response."""
        stream = self._stream
        if stream is not None and stream.position != window.start:
            stream.close()
            stream = self._stream = None
        if stream is None:
            stream = self._stream = await self.client.open_range(
                self.url, window.start, self.length
            )
            if stream is None:
                return None
        try:
            return await self.client.read_open(stream, window.end - window.start)
        except (OSError, HTTPException) as exc:
            log.debug("open GET of %s failed at %d: %r", self.digest, stream.position, exc)
            stream.close()
            self._stream = None
            return None

    async def _prefetch(self, window: _Window) -> None:
        """_fetch, for a system task: an error is left to the reads that wait (they try
        again and report it), never raised (it would end the daemon's trio run)."""
        try:
            await self._fetch(window)
        except Exception as exc:
            log.debug("read-ahead of %s at %d failed: %s", self.digest, window.start, shown(exc))

    async def aclose(self) -> None:
        for window in self._windows:
            self.budget.give(window.charged)
        self._windows = []
        for stream in (self._stream, self._in_order):
            if stream is not None:
                stream.close()
        self._stream = self._in_order = None
