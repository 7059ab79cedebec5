"""The daemon: mount, serve until unmounted or signalled, unmount cleanly.

SIGINT and SIGTERM unmount; SIGHUP drops every cached tag and listing; SIGUSR1 dumps the
stacks of all threads to the log (faulthandler).
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

import pyfuse3
import trio

from .operations import Operations
from .options import MountOptions
from .readahead import set_read_ahead
from .rootfs import SECTION, RootfsView
from .sources import open_registry, read_ahead, start_workers
from .tree import Tree

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Allocations between two young collections (CPython's default: 700). A request's objects are
# freed by reference counting; a listing of 10,000 entries makes ~20,000 at once and set off a
# full collection of the daemon's every object inside the cold `ls -l` (46-50 ms of ~300 ms of
# daemon CPU, gc.callbacks); at 20,000 none is full and the young ones cost 18-32 ms.
GC_YOUNG = 20_000


def _collect_less() -> None:
    """What the daemon made to start (modules, the tree, the mount) lives as long as it does:
    frozen, no collection walks it again; young collections come ~30x less often."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


async def _watch_signals(
    ops: Operations, rootfs: RootfsView, task_status: trio.TaskStatus[None]
) -> None:
    with trio.open_signal_receiver(*SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # held since serve(): take them
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                # Logged once done: the kernel's copies of kept listings expire 0.1 s later.
                await ops.directories.forget_moving()
                log.info("SIGHUP: dropped cached tags and listings")
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            rootfs.stop()  # pyfuse3.main() returns once the requests waiting for a build end
            pyfuse3.terminate()
            return


async def _ready_when_served(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Report ready once a request of our own has been served. That proves the mount works,
    and the kernel has taken the INIT reply by then, which resets the read-ahead we set."""
    root = await trio.to_thread.run_sync(os.stat, options.mountpoint, abandon_on_cancel=True)
    set_read_ahead(root.st_dev, options.read_ahead_kb)
    on_ready()


async def _serve(ops: Operations, rootfs: RootfsView, on_ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, ops, rootfs)
        nursery.start_soon(_ready_when_served, ops.options, on_ready)
        nursery.start_soon(read_ahead, ops.options, ops.tree.registry)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    await rootfs.aclose()  # before the registry: its open layers read through it
    await ops.tree.registry.aclose()


@contextmanager
def _stderr_to(fd: int) -> Iterator[None]:
    """Send fd 2 (ours and our children's) to fd for a while, then put it back."""
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _mount(ops: Operations, options: MountOptions) -> None:
    """pyfuse3.init, with the reason a mount failed in the error.

    libfuse and the fusermount3 it runs say why a mount failed (`option allow_other only
    allowed if 'user_allow_other' is set`, `mount failed: Operation not permitted`) on
    stderr only, and pyfuse3 raises a bare "fuse_session_mount failed": a background
    daemon's stderr is its log, so the user would never see the words."""
    with tempfile.TemporaryFile() as said:
        try:
            with _stderr_to(said.fileno()):
                pyfuse3.init(ops, options.mountpoint, options.fuse_options())
        except RuntimeError as exc:
            words = _words(said)
            raise RuntimeError(f"{exc}: {words}" if words else str(exc)) from None
        words = _words(said)
    if words:
        log.warning("mount: libfuse said: %s", words)


def _words(said: IO[bytes]) -> str:
    """What was written to said (the first 4 KiB), on one line."""
    said.seek(0)
    return " ".join(said.read(4096).decode(errors="replace").split())


def serve(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Mount and serve; returns once unmounted. Errors before the mount is up propagate."""
    registry = open_registry(options)
    rootfs = RootfsView.create(registry, options.tag_ttl, options.index_cache_size)
    ops = Operations(Tree(registry, options.tag_ttl, views={SECTION: rootfs}), options)
    log_file = logging.getLogger().handlers[0]
    stream = getattr(log_file, "stream", None)
    if stream is not None:
        faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
    # Hold the signals that unmount until _watch_signals receives them: one arriving between
    # the mount and the receiver would kill the daemon by default and leave a dead mount.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    # Only now: a thread inherits its creator's mask, and one made before the block (the
    # stat worker's starter) took a SIGTERM by default during start-up: a dead mount.
    start_workers(registry)
    try:
        _mount(ops, options)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        raise
    log.info(
        "mounted %s on %s (%s)",
        options.source,
        options.mountpoint,
        "read-only" if options.read_only else "read-write",
    )
    _collect_less()
    try:
        trio.run(_serve, ops, rootfs, on_ready)
    except Exception:
        log.exception("serve: the main loop failed; unmounting")
        raise
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", options.mountpoint)
