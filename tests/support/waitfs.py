"""A pyfuse3 filesystem to watch pyfuse3's session loop from outside (tests/test_pyfuse3_loop.py).

bench/requests.py's in-memory filesystem, plus `big/slow`, whose lookup waits until a lookup
of `go` arrives (in another directory: the kernel serializes the lookups in one, since
libfuse 3.14 never passes FUSE_PARALLEL_DIROPS on), `big/<n>`, whose getattr computes for 2 ms
without waiting (so that clients of several keep requests queued: Linux asks for one inode's
attributes one request at a time), `big/9`, whose `getattr_kept` raises EIO, a listing of
`big/` that reports its end (`readdir_ended`, regfs's build), and a trio task
that ticks every millisecond (unless `--quiet`: then the daemon uses no CPU between requests).
getxattr of `user.loop` on the root answers what the loop did, as JSON: `getattr_tasks`, how
many trio tasks served a GETATTR; `getattrs`, how many GETATTRs `getattr` answered; `kept`, how
many GETATTRs of `kept` (answered by `getattr_kept` on regfs's build); `readdirs`, how many
READDIRs `readdir` answered; `waiting`, lookups of
`big/slow` still waiting; `longest_gap_ms`, the longest time between two ticks so far.

    python -m support.waitfs MOUNTPOINT [--quiet]   (cwd tests/, the project root on PYTHONPATH)
"""

from __future__ import annotations

import errno
import json
import sys
import time

import pyfuse3
import trio

from bench.requests import DIR_INODE, FILE_INODE, Memory

LOOP = b"user.loop"
BROKEN_INODE = DIR_INODE + 1 + 9  # big/9, whose getattr_kept raises EIO


class WaitFs(Memory):
    def __init__(self) -> None:
        super().__init__(entries=10)
        self.go = trio.Event()
        self.getattr_tasks: set[str] = set()
        self.waiting = 0
        self.longest_gap = 0.0  # s, between two ticks
        self.last_tick = 0.0

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.getattr_tasks.add(trio.lowlevel.current_task().name)
        if inode > DIR_INODE:
            time.sleep(0.002)  # blocks the loop, as a handler that computes does
        return await super().getattr(inode, ctx)

    def getattr_kept(self, inode: int) -> pyfuse3.EntryAttributes | None:
        if inode == BROKEN_INODE:
            raise pyfuse3.FUSEError(errno.EIO)
        return super().getattr_kept(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == b"go":
            self.go.set()
            self.go = trio.Event()  # the next lookup of big/slow waits again
        elif parent_inode == DIR_INODE and name == b"slow":
            self.waiting += 1
            try:
                await self.go.wait()
            finally:
                self.waiting -= 1
            return self._attr(FILE_INODE)
        return await super().lookup(parent_inode, name, ctx)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await super().readdir(fh, start_id, token)
        # big/'s 10 entries go out in one reply (~1.5 KB; clients ask for 4 KiB or more).
        if fh == DIR_INODE and start_id < self.entries and hasattr(pyfuse3, "readdir_ended"):
            pyfuse3.readdir_ended(token, self.entries)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode != pyfuse3.ROOT_INODE or name != LOOP:
            raise pyfuse3.FUSEError(errno.ENODATA)
        shown: dict[str, float] = {"getattr_tasks": len(self.getattr_tasks)}
        shown |= {"waiting": self.waiting, "getattrs": self.counts["getattr"]}
        shown |= {"kept": self.counts["kept"], "readdirs": self.counts["readdir"]}
        return json.dumps(shown | {"longest_gap_ms": self._gap() * 1000}).encode()

    def _gap(self) -> float:
        """The longest time between two ticks, the one going on counted too."""
        return max(self.longest_gap, trio.current_time() - self.last_tick)

    async def tick(self) -> None:
        self.last_tick = trio.current_time()
        while True:
            await trio.sleep(0.001)
            self.longest_gap = self._gap()
            self.last_tick = trio.current_time()


async def _serve(fs: WaitFs, tick: bool) -> None:
    async with trio.open_nursery() as nursery:
        if tick:
            nursery.start_soon(fs.tick)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(mountpoint: str, quiet: bool) -> None:
    fs = WaitFs()
    pyfuse3.init(fs, mountpoint, {"fsname=waitfs"})
    try:
        trio.run(_serve, fs, not quiet)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["--quiet"])
