"""A writer that also holds a descriptor on another file system with the inode number of the
file it writes (`/dev/pts/N` is inode N+3) made each of its closes read the whole mountinfo
again to learn that descriptor's mount is not this one (~5 ms at 3,000 mounts). The mount
ids found not to be this mount are now kept per mount namespace for _OTHERS_LIFETIME (no
descriptor of its mountinfo is kept to poll for a change: it would keep a namespace whose
processes exited alive): one read, then none until that time has passed."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from support.mounts import Mount
from support.roots import build_root

from regfs.closers import _OTHERS_LIFETIME, Close, Closers, Opener

pytestmark = pytest.mark.mount

COUNTING = threading.Event()
READS: list[str] = []


def _count(event: str, args: tuple[object, ...]) -> None:
    if COUNTING.is_set() and event == "open" and str(args[0]).endswith("/mountinfo"):
        READS.append(str(args[0]))


sys.addaudithook(_count)  # hooks stay for the process: it counts only while COUNTING


@pytest.fixture
def counted() -> Iterator[list[str]]:
    READS.clear()
    COUNTING.set()
    try:
        yield READS
    finally:
        COUNTING.clear()


async def test_a_descriptor_elsewhere_with_the_same_inode_number_reads_mountinfo_once(
    tmp_path: Path, mount: Callable[..., Mount], counted: list[str]
) -> None:
    await build_root(tmp_path / "root", size=1_000)
    mounted = mount(tmp_path / "root")
    closers = Closers(str(mounted.mountpoint))
    elsewhere = tmp_path / "elsewhere"  # the test's own file system, not the mount
    with open(elsewhere, "wb") as held:  # a writer of the mount's file would hold this too
        opener = Opener(os.getpid(), os.fstat(held.fileno()).st_ino)
        tid = threading.get_native_id()
        for _ in range(50):
            assert await closers.close_of(opener, tid, {}) is Close.LAST
        first = len(counted)
        # the daemon's own (its device) and the writer's once (again if the closes took
        # longer than the lifetime, under load): not 50
        assert first <= 5, counted
        await trio.sleep(_OTHERS_LIFETIME)
        for _ in range(50):
            assert await closers.close_of(opener, tid, {}) is Close.LAST
        assert first + 1 <= len(counted) <= first + 4  # the kept ids expired: read again


def test_the_trio_thread_does_not_wait_for_a_workers_mount_table_read(tmp_path: Path) -> None:
    # a close scanned inline waited on the lock for a worker thread's read (~5 ms at 3,000
    # mounts), stalling every request: it now reads the table without the cache
    closers = Closers(str(tmp_path))
    closers._device_looked_up, closers._device = True, b"0:999999"  # no mount needed
    held, done = threading.Event(), threading.Event()

    def worker() -> None:
        with closers._learning:
            held.set()
            done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        held.wait()

        async def inline() -> tuple[set[int], float]:
            start = trio.current_time()
            found = closers._learn_mounts(os.getpid(), {987654})
            return found, trio.current_time() - start

        found, took = trio.run(inline)
    finally:
        done.set()
        thread.join()
    assert found == set() and took < 5
    assert closers._others == {}  # the cache is the lock holder's
