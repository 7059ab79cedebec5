"""A listing's attributes read ahead of its READDIRs, a chunk at a time.

A cold `ls -l` of 10,000 layers waited for every link and blob to be stated (~120 ms)
before its first READDIRPLUS was answered, and `ls` did its own work (statx, output) only
after. Read in chunks by a task of their own (in the stat worker process on a local root,
`storage/drivers/statworker.py`), each READDIR hands what is read so far, and `ls` works
while the rest are read. The reading stays within AHEAD of the furthest entry a READDIR
asked for: an `ls | head` states no more than that, and no chunk pushes out of the tree's
cache (DIGESTS_KEPT) what a READDIR has yet to hand.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from . import tree as tree_module

if TYPE_CHECKING:
    from .nodes import Node
    from .tree import Tree

log = logging.getLogger(__name__)

# The first chunk is small, so the first reply goes out soon; the rest are small too, so a
# READDIR waits for little more than what it hands (256: ~15 ms less per cold `ls -l` of
# 10,000 than 512, as fast as 128). Two are asked at once, so the worker always has the next.
FIRST_CHUNK = 128
CHUNK = 256
IN_FLIGHT = 2
# How far past the furthest entry a READDIR asked for the reading may go (a chunk is cut
# there): a READDIRPLUS hands ~145 digests, so the worker can be seven READDIRs ahead of `ls`,
# and what is read and not handed yet stays well within DIGESTS_KEPT.
AHEAD = 4 * CHUNK


class StatAhead:
    """`Tree.read_attrs` of a listing's nodes, chunk after chunk in a system task, each cached
    by the tree as it is read, none more than AHEAD past the furthest node asked;
    `ready` says how far. `stop`: its listing was let go."""

    def __init__(self, tree: Tree, nodes: list[Node]) -> None:
        self._tree = tree
        self._nodes = nodes
        self._next = 0  # where the next chunk begins
        self._ends: dict[int, int] = {}  # chunks read out of order: start -> end
        self.read = 0  # the nodes read, from the first on without a gap
        self._asked = 0  # the furthest node a READDIR waited for
        # Half the cache at most: what is read and not handed yet never pushes out itself
        # (DIGESTS_KEPT is smaller in tests).
        self._ahead = max(1, min(AHEAD, tree_module.DIGESTS_KEPT // 2))
        self._stopped = False
        self._ended = False  # no chunk will be read any more
        self._failed: BaseException | None = None
        self._moved = trio.Event()
        trio.lowlevel.spawn_system_task(self._run)

    async def ready(self, index: int) -> int:
        """Once node `index` is read (or all are), how many are, from the first on; what
        failed the reading, raised (EIO for that READDIR). Fewer once the reading ended
        (`stop`): the caller states the rest itself."""
        if index > self._asked and not self._stopped:
            self._asked = index
            self._move()  # the window moved: a chunk may begin
        while self.read <= index < len(self._nodes) and not self._ended:
            await self._moved.wait()
        if self._failed is not None:
            raise self._failed
        return self.read

    def stop(self) -> None:
        """No READDIR will come for what is not asked yet (the listing was let go): the
        chunks a READDIR waits for are read, no other begins, and the nodes are let go."""
        self._stopped = True
        self._move()

    async def _run(self) -> None:
        """A system task: whatever fails is kept for `ready`, never raised."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(IN_FLIGHT):
                    nursery.start_soon(self._read_chunks)
        except Exception as exc:  # kept for the READDIRs that wait
            while isinstance(exc, ExceptionGroup):  # a nursery's: what its task raised
                exc = exc.exceptions[0]
            log.debug("reading a listing's attributes ahead failed: %s", exc)
            self._failed = exc
        self._ended = True
        self._nodes = []
        self._move()

    async def _read_chunks(self) -> None:
        while self._next < len(self._nodes):
            limit = self._limit()
            if self._next >= limit:
                if self._stopped:
                    return
                await self._moved.wait()
                continue
            start = self._next
            end = self._next = min(start + (FIRST_CHUNK if start == 0 else CHUNK), limit)
            await self._tree.read_attrs(self._nodes[start:end])
            self._ends[start] = end
            while self.read in self._ends:
                self.read = self._ends.pop(self.read)
            self._move()

    def _limit(self) -> int:
        """Where what may be read for now ends: AHEAD past the furthest node asked, or just
        past it once stopped."""
        return min(len(self._nodes), self._asked + (1 if self._stopped else self._ahead))

    def _move(self) -> None:
        self._moved.set()
        self._moved = trio.Event()
