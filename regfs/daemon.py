"""The daemon: mount, serve until unmounted or signalled, unmount cleanly.

SIGINT and SIGTERM unmount; SIGHUP drops every cached tag and listing; SIGUSR1 dumps the
stacks of all threads to the log (faulthandler).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
from collections.abc import Callable

import pyfuse3
import trio

from .operations import Operations
from .options import MountOptions
from .readahead import set_read_ahead
from .sources import open_registry
from .tree import Tree

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _watch_signals(ops: Operations, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(*SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # held since serve(): take them
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: dropping cached tags and listings")
                ops.tree.forget_moving()
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _ready_when_served(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Report ready once a request of our own has been served. That proves the mount works,
    and the kernel has taken the INIT reply by then, which resets the read-ahead we set."""
    root = await trio.to_thread.run_sync(os.stat, options.mountpoint, abandon_on_cancel=True)
    set_read_ahead(root.st_dev, options.read_ahead_kb)
    on_ready()


async def _serve(ops: Operations, on_ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, ops)
        nursery.start_soon(_ready_when_served, ops.options, on_ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    await ops.tree.registry.aclose()


def serve(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Mount and serve; returns once unmounted. Errors before the mount is up propagate."""
    registry = open_registry(options)
    ops = Operations(Tree(registry, options.tag_ttl), options)
    log_file = logging.getLogger().handlers[0]
    stream = getattr(log_file, "stream", None)
    if stream is not None:
        faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
    # Hold the signals that unmount until _watch_signals receives them: one arriving between
    # the mount and the receiver would kill the daemon by default and leave a dead mount.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        pyfuse3.init(ops, options.mountpoint, options.fuse_options())
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        raise
    log.info(
        "mounted %s on %s (%s)",
        options.source,
        options.mountpoint,
        "read-only" if options.read_only else "read-write",
    )
    try:
        trio.run(_serve, ops, on_ready)
    except Exception:
        log.exception("serve: the main loop failed; unmounting")
        raise
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", options.mountpoint)
