"""The stat worker: a child process that runs a listing's bulk stat (`bulkstat.linked_stats`),
the tags' read-ahead's reads of their links (`bulkstat.contents`) and the check of which
children of a namespace are repositories or empty (`bulkstat.present`, `bulkstat.empty`)
on the other core,
beside the daemon's loop, which replies meanwhile.

In a thread, those ~60,000 syscalls of `ls -l` of 10,000 layers held the GIL for most of
their ~120 ms and slowed the loop as much as they spared it; a process holds no GIL of the
daemon's. It runs the driver's own code (bulkstat.py as a script, the standard library
only: it starts in ~30 ms), on directory descriptors the driver opened and passes with each
request (SCM_RIGHTS), so it resolves every name as the driver would, beneath them with no
symlink followed. It is started off the trio thread by a thread that then waits for it: the
kernel kills it when that thread ends (PR_SET_PDEATHSIG), which is when the daemon ends,
also by kill -9; and it exits when its socket closes. Until it is ready, or after it
failed, its calls answer None and the driver reads in a thread as before; a failure
while requests wait is CorruptEntry (EIO) for them, logged once, and the next call starts a
new worker; one that could not start is tried again only RETRY_START later.
"""

from __future__ import annotations

import logging
import marshal
import os
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import trio

from ..errors import CorruptEntry
from . import bulkstat

log = logging.getLogger(__name__)

# After a worker that could not start (no `python`, no process left, an exit before it was
# ready), listings are stated in process this long before another is tried: each big listing
# would otherwise spawn one again, and log again.
RETRY_START = 60.0
# A request not answered this long after it was asked gives the worker up (killed, logged):
# one of 512 entries takes ~4 ms warm (a cold disk's seeks: seconds); a worker stopped
# (SIGSTOP), starved or stuck in the kernel held every READDIR of the listings waiting for
# it, and the tags' read-ahead, for ever. Those callers then state in a thread, as when no
# worker is ready: a worker that was only slow costs no listing, only its speed for a while.
ANSWER_DEADLINE = 10.0


class _Channel:
    """One worker's socket and the requests waiting for it. Requests go out as they come,
    replies come back in that order (one loop in the worker), and each caller reads its own
    in turn: the oldest caller still waiting reads first, passing over the replies of
    callers cancelled meanwhile."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0  # requests sent, numbered from 0
        self.received = 0  # replies read
        self.waiting: set[int] = set()  # numbers of the requests whose caller waits
        self.moved = trio.Event()
        self.broken = ""  # why it cannot answer any more
        self.exited = False  # set by the worker's thread once it was reaped
        self.given_up = False  # a request passed ANSWER_DEADLINE: its callers use threads
        self.worker: subprocess.Popen[bytes] | None = None  # set once it is ready

    async def call(self, directories: Sequence[int], request: bytes) -> bytes:
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", directories))]
        while True:
            self._check()
            try:
                self.sock.sendmsg([request], fds)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
        number, self.sent = self.sent, self.sent + 1
        self.waiting.add(number)
        try:
            while min(self.waiting) != number:
                await self.moved.wait()
                self._check()
            while self.received < number:  # a reply its cancelled caller left
                await self._receive()
            return await self._receive()
        finally:
            self.waiting.discard(number)
            self.moved.set()
            self.moved = trio.Event()

    def _check(self) -> None:
        if self.broken:
            raise OSError(self.broken)

    async def _receive(self) -> bytes:
        while True:
            self._check()
            try:
                reply, _, flags, _ = self.sock.recvmsg(bulkstat.REPLY_LIMIT)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
        if not reply:
            raise OSError("it exited")
        if flags & socket.MSG_TRUNC:
            raise OSError("a reply longer than REPLY_LIMIT")
        self.received += 1
        return reply

    def close(self, why: str) -> None:
        """No request is answered any more: those waiting fail with why."""
        if not self.broken:
            self.broken = why
            with suppress(OSError):
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.moved.set()


class StatWorker:
    """The worker process of one driver, started by `start` (the daemon's, at mount) or by
    the first bulk call that finds none ready."""

    def __init__(self) -> None:
        self._channel: _Channel | None = None  # set by the starting thread once ready
        self._starting = False  # until _channel is set, or the start failed
        self._retry_at = 0.0  # time.monotonic() before which no start is tried
        self._failure_logged = False  # since a worker last started

    @property
    def ready(self) -> bool:
        return self._channel is not None

    def start(self) -> None:
        """Starts the worker on a thread of its own, unless it runs, is starting, or could
        not start less than RETRY_START ago."""
        if self._channel is None and not self._starting and time.monotonic() >= self._retry_at:
            self._starting = True
            threading.Thread(target=self._run, name="regfs-stat-worker", daemon=True).start()

    def close(self) -> None:
        """The worker's socket closed: it exits (it is not waited for)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.broken = "closed"
            channel.sock.close()

    def _run(self) -> None:
        """Spawns the worker, then waits for it (its PR_SET_PDEATHSIG names this thread)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with theirs:
                worker = subprocess.Popen(
                    [sys.executable, "-I", "-S", bulkstat.__file__, str(theirs.fileno()),
                     str(os.getpid())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            if ours.recv(len(bulkstat.READY)) != bulkstat.READY:
                worker.wait()
                raise OSError(f"exited with status {worker.returncode} before it was ready")
        except (OSError, subprocess.SubprocessError) as exc:
            ours.close()
            self._retry_at = time.monotonic() + RETRY_START
            self._starting = False
            if not self._failure_logged:
                self._failure_logged = True
                log.error(
                    "the stat worker did not start (%s): listings are stated in process,"
                    " another tried every %.0f s", exc, RETRY_START,
                )  # fmt: skip
            return
        ours.setblocking(False)
        channel = _Channel(ours)
        channel.worker = worker
        self._channel = channel
        self._starting = False  # only now: a start() meanwhile would spawn a second one
        self._failure_logged = False
        log.info("the stat worker (pid %d) is ready", worker.pid)
        status = worker.wait()
        channel.exited = True  # the next request drops it unsent, and starts a new one
        if not channel.broken:
            log.error("the stat worker (pid %d) exited with status %d", worker.pid, status)

    async def linked_stats(
        self, links: int, files: int, use_openat2: bool, link_names: Sequence[str],
        targets: Sequence[bytes], file_names: Sequence[str],
    ) -> list[bulkstat.Stat] | None:  # fmt: skip
        """`bulkstat.linked_stats` of the names beneath the descriptors links and files, in
        the worker (`_ask`)."""
        return await self._ask(
            (links, files), use_openat2, len(link_names),
            lambda at, to: (list(link_names[at:to]), list(targets[at:to]), list(file_names[at:to])),
        )  # fmt: skip

    async def contents(
        self, directory: int, use_openat2: bool, names: Sequence[str]
    ) -> list[bulkstat.Content] | None:
        """`bulkstat.contents` of the names beneath the descriptor directory, in the worker
        (`_ask`): files of at most WORKER_CONTENT bytes, any other None."""
        return await self._ask(
            (directory,), use_openat2, len(names),
            lambda at, to: (list(names[at:to]), bulkstat.WORKER_CONTENT),
        )  # fmt: skip

    async def check(
        self, which: str, directory: int, use_openat2: bool, names: Sequence[str]
    ) -> list[bool] | None:
        """`bulkstat.CHECKS[which]` (`present`, `empty`) of the names beneath the descriptor
        directory, in the worker (`_ask`)."""
        return await self._ask(
            (directory,), use_openat2, len(names), lambda at, to: (list(names[at:to]), which)
        )

    def _give_up(self, channel: _Channel) -> None:
        """A request of channel passed ANSWER_DEADLINE: its worker is killed (a stopped one
        too) and its callers state in a thread, as do bulk calls for RETRY_START."""
        if not channel.given_up:
            channel.given_up = True
            pid = channel.worker.pid if channel.worker is not None else 0
            log.error(
                "the stat worker (pid %d) did not answer within %.0f s: killed, the listings"
                " waiting for it stated in threads, another tried in %.0f s",
                pid, ANSWER_DEADLINE, RETRY_START,
            )  # fmt: skip
            if channel.worker is not None:
                with suppress(OSError):
                    channel.worker.kill()  # Popen: not once its exit is known (no pid reused)
        if self._channel is channel:
            self._channel = None
            # Storage this slow is as slow in a thread: no new worker for a while, not a
            # worker spawned and killed per listing.
            self._retry_at = time.monotonic() + RETRY_START
        channel.close(f"no answer within {ANSWER_DEADLINE:.0f} s")

    async def _ask(
        self, directories: tuple[int, ...], use_openat2: bool, count: int,
        parts: Callable[[int, int], tuple[Any, ...]],
    ) -> list[Any] | None:  # fmt: skip
        """What the worker answers for count names, one entry a name, in requests of
        REQUEST_ENTRIES at most (parts(at, to): what serve takes after use_openat2, for the
        names from at to to); None when no worker is ready (one is started, also for one
        known dead before this call: no failure of any listing), or when one of its requests
        is not answered within ANSWER_DEADLINE (`_give_up`). CorruptEntry (EIO) when the
        worker fails meanwhile, or answers not one entry a name."""
        channel = self._channel
        if channel is not None and channel.exited:
            channel.close("it exited")
            channel = self._channel = None
        if channel is None:
            self.start()
            return None
        found: list[Any] = []
        step = bulkstat.REQUEST_ENTRIES
        try:
            for at in range(0, count, step):
                to = min(at + step, count)
                request = marshal.dumps((use_openat2, *parts(at, to)))
                with trio.move_on_after(ANSWER_DEADLINE) as waited:
                    answer = await channel.call(directories, request)
                if waited.cancelled_caught:
                    self._give_up(channel)
                    return None
                reply = marshal.loads(answer)
                if not isinstance(reply, list) or len(reply) != to - at:
                    raise ValueError(f"a reply not of one entry for each of {to - at} names")
                found.extend(reply)
        except (OSError, trio.ClosedResourceError, ValueError, EOFError) as exc:
            if channel.given_up:  # by another caller, at its deadline
                return None
            if self._channel is channel:
                log.error("the stat worker failed (%s): a new one starts for the next listing", exc)
                self._channel = None
            channel.close(str(exc))
            raise CorruptEntry(
                "(a listing's bulk stat)", f"the stat worker failed: {exc}"
            ) from None
        return found
