"""A pyfuse3 filesystem to watch pyfuse3's session loop from outside (tests/test_pyfuse3_loop.py).

bench/requests.py's in-memory filesystem, plus `big/slow`, whose lookup waits until a lookup
of `go` arrives (in another directory: the kernel serializes the lookups in one, pyfuse3 not
asking for FUSE_CAP_PARALLEL_DIROPS), and a trio task that ticks every millisecond.
getxattr of `user.loop` on the root answers what the loop did, as JSON: `getattr_tasks`, how
many trio tasks served a GETATTR; `waiting`, lookups of `big/slow` still waiting; `ticks`,
the ticker's count so far.

    python -m support.waitfs MOUNTPOINT   (cwd tests/, the project root on PYTHONPATH)
"""

from __future__ import annotations

import errno
import json
import sys

import pyfuse3
import trio

from bench.requests import DIR_INODE, FILE_INODE, Memory

LOOP = b"user.loop"


class WaitFs(Memory):
    def __init__(self) -> None:
        super().__init__(entries=10)
        self.go = trio.Event()
        self.getattr_tasks: set[str] = set()
        self.waiting = 0
        self.ticks = 0

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.getattr_tasks.add(trio.lowlevel.current_task().name)
        return await super().getattr(inode, ctx)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == b"go":
            self.go.set()
        elif parent_inode == DIR_INODE and name == b"slow":
            self.waiting += 1
            try:
                await self.go.wait()
            finally:
                self.waiting -= 1
            return self._attr(FILE_INODE)
        return await super().lookup(parent_inode, name, ctx)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode != pyfuse3.ROOT_INODE or name != LOOP:
            raise pyfuse3.FUSEError(errno.ENODATA)
        shown = {"getattr_tasks": len(self.getattr_tasks), "waiting": self.waiting}
        return json.dumps(shown | {"ticks": self.ticks}).encode()

    async def tick(self) -> None:
        while True:
            await trio.sleep(0.001)
            self.ticks += 1


async def _serve(fs: WaitFs) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.tick)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(mountpoint: str) -> None:
    fs = WaitFs()
    pyfuse3.init(fs, mountpoint, {"fsname=waitfs"})
    try:
        trio.run(_serve, fs)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(sys.argv[1])
