"""An upload's append pipeline: its disk and hash workers, its checkpoints, and what a failed
append leaves.

Each append is `pwrite`n on a disk worker thread and hashed on a hash worker thread
(single-thread executors, so each in order; `pwrite` and ctypes release the GIL), and the
caller goes on once both have it, at most MAX_INFLIGHT appends ahead, so its next write
overlaps them (as a page cache would). A checkpoint runs beside the appends: the state is
marshalled on the hash worker, the data synced on a sync thread once the appends below it
are written, and the state saved by the first append after both (only once the appends
below it were checked): a state never vouches for unsynced data (docs/concurrency.md).

A failed append (ENOSPC, EIO) is found by a later call: every append and checkpoint after
it is dropped, and AppendFailed tells the upload where it began, to cut its data and hash
back there before it raises the error. Apart from the upload protocol (storage/uploads.py),
which owns the data, the running hash and when to checkpoint, because this is the part that
runs on threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass

import trio

from .digests import BytesLike, Sha256State
from .drivers import FileWriter
from .hashstates import HashStates

MAX_INFLIGHT = 16  # appends the workers may lag behind (16 MiB of 1 MiB FUSE writes)


class AppendFailed(Exception):
    """The append at `offset` failed with `error`, and what followed it was dropped: the
    upload cuts its data and its running hash back to offset, then raises `error`."""

    def __init__(self, offset: int, error: Exception) -> None:
        super().__init__(offset, error)
        self.offset = offset
        self.error = error


@dataclass
class _Append:
    """An append handed to the workers: written on the disk worker, hashed on the hash one."""

    start: int
    end: int
    written: Future[None]
    hashed: Future[None]

    def done(self) -> bool:
        return self.written.done() and self.hashed.done()

    def wait(self) -> None:
        """Block (in a thread) until both workers are done with it; raises nothing."""
        wait_all((self.written, self.hashed))

    def check(self) -> None:
        self.written.result()
        self.hashed.result()


@dataclass
class _Checkpoint:
    """A hash state at `offset`, to be saved once the data below it is on disk."""

    offset: int
    state: Future[bytes]  # marshalled on the hash worker, after the appends before it
    synced: Future[None]  # the data's sync on the sync thread, after those appends' writes

    def done(self) -> bool:
        return self.state.done() and self.synced.done()


class AppendPipeline:
    """The appends of one upload in flight; the checkpoints it saves go to `states`."""

    def __init__(self, states: HashStates) -> None:
        self._states = states
        # Appends handed to the workers, oldest first (one thread each, so each in order;
        # ctypes and os.pwrite let go of the GIL).
        self._appends: deque[_Append] = deque()
        self._disk: ThreadPoolExecutor | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._syncer: ThreadPoolExecutor | None = None
        self._checkpoint: _Checkpoint | None = None

    @property
    def end(self) -> int | None:
        """Where the last append in flight ends (None when there is none)."""
        return self._appends[-1].end if self._appends else None

    async def append(
        self, writer: FileWriter, offset: int, data: BytesLike, hashed: Sha256State
    ) -> None:
        """Hand data at offset to the workers: the writer writes it, `hashed` hashes it."""
        await self._reap(everything=False)
        if self._disk is None or self._hasher is None:
            self._disk = ThreadPoolExecutor(1, thread_name_prefix="regfs-write")
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="regfs-sha256")
        if not isinstance(data, bytes):  # used after we return: a caller may reuse a buffer
            data = bytes(data)
        written = self._disk.submit(writer.write_at_blocking, offset, data)
        done = self._hasher.submit(hashed.update, data)
        self._appends.append(_Append(offset, offset + len(data), written, done))

    async def advance_checkpoint(self, writer: FileWriter, hashed: Sha256State, every: int) -> None:
        """Right after an append: save a checkpoint whose sync is done (once the appends it
        covers are known to be written); begin the next one when `every` bytes are hashed
        past the last saved state."""
        checkpoint = self._checkpoint
        if checkpoint is not None and checkpoint.done():
            unchecked = self._appends and self._appends[0].start < checkpoint.offset
            if not unchecked:
                await self._save_checkpoint()
        end = self._appends[-1].end if self._appends else hashed.size
        if self._checkpoint is None and end - self._states.saved_at >= every:
            assert self._hasher is not None  # an append was just handed to it
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(1, thread_name_prefix="regfs-sync")
            self._checkpoint = _Checkpoint(
                end,
                self._hasher.submit(hashed.marshal),
                self._syncer.submit(
                    _sync_after, [a.written for a in self._appends], writer.sync_blocking
                ),
            )

    async def settle(self) -> None:
        """Wait until the workers are done with every append, and the checkpoint in
        progress is saved; AppendFailed after a failed append."""
        await self._reap(everything=True)
        if self._checkpoint is not None:
            await trio.to_thread.run_sync(wait_all, (self._checkpoint.synced,))
            await self._save_checkpoint()

    def stop(self) -> None:
        """Let the worker threads go (new appends start new ones)."""
        for pool in (self._disk, self._hasher, self._syncer):
            if pool is not None:
                pool.shutdown(wait=False)
        self._disk = self._hasher = self._syncer = None

    async def _reap(self, everything: bool) -> None:
        """Take finished appends off the queue: all of them, waiting, if everything, else
        those done (waiting for the oldest when MAX_INFLIGHT are out); AppendFailed when one
        failed."""
        if everything and self._appends:
            await trio.to_thread.run_sync(self._appends[-1].wait)  # each worker is in order
        elif len(self._appends) >= MAX_INFLIGHT:
            await trio.to_thread.run_sync(self._appends[0].wait)
        while self._appends and self._appends[0].done():
            append = self._appends[0]
            try:
                append.check()
            except Exception as exc:
                await self._drop_after_failure()
                raise AppendFailed(append.start, exc) from exc
            self._appends.popleft()

    async def _drop_after_failure(self) -> None:
        """After a failed append, what follows it was not written where it was hashed:
        let the workers finish, then forget every append and the checkpoint in flight."""
        await trio.to_thread.run_sync(self._appends[-1].wait)
        self._appends.clear()
        if self._checkpoint is not None:
            await trio.to_thread.run_sync(wait_all, (self._checkpoint.synced,))
            self._checkpoint = None

    async def _save_checkpoint(self) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        assert checkpoint is not None
        checkpoint.synced.result()  # a failed sync fails the write that finds it
        await self._states.save(checkpoint.offset, checkpoint.state.result())


def _sync_after(writes: list[Future[None]], sync: Callable[[], None]) -> None:
    """Sync once these writes are done; a failed one fails the sync (and its checkpoint)."""
    for write in writes:
        write.result()
    sync()
