"""Listings the kernel keeps, and the directory mtimes that tell it to read one again.

With regfs's pyfuse3 build, opendir answers ENOSYS: Linux then sends no OPENDIR or
RELEASEDIR again and keeps every listing in its page cache (FOPEN_CACHE_DIR). It reads a
kept listing again only when, at the start of a readdir, the directory's mtime (from a
GETATTR once its attributes expired) or its own change counter (bumped by a create, unlink,
rename, mkdir or rmdir through the mount) differs from when it read it. So every directory
whose names can change without the kernel seeing it must show an mtime that moves when they
do; nothing is invalidated (docs/concurrency.md says why, and what the kernel keeps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .nodes import Node


def names_of(entries: Sequence[tuple[str, Node]]) -> int:
    """What is compared of two listings: their names, in order (a hash: holding the names of
    every directory the kernel keeps would cost as much as the listings)."""
    return hash(tuple(map(itemgetter(0), entries)))


@dataclass
class Held:
    """A directory whose listing the kernel may keep: the names it was last handed, the mtime
    that moved for it (0: the storage's own), and until when its entries are in use
    (`KeptListings.entries_used`)."""

    names: int
    mtime_ns: int = 0  # at least the last mtime shown, so a move goes past it
    used_until: float = 0.0
    stored_ns: int = 0  # the storage's own mtime, last read: what ctime shows (`ctime_ns`)
    # Whether the listing the kernel last read may still be good in its eyes: not if it saw a
    # change of the directory itself since (an rmdir or mkdir in it through the mount bumps
    # its change counter), until it reads the listing again (`filled`, `kernel_changed`).
    fresh: bool = True


class KeptListings:
    """The directories (outside images) whose listings the kernel may hold: one entry per
    directory inode the kernel holds that it has read, dropped when the kernel forgets the
    inode (its listing goes with it), so this is bounded by the kernel's own inodes."""

    def __init__(self) -> None:
        self._held: dict[Node, Held] = {}

    def get(self, node: Node) -> Held | None:
        return self._held.get(node)

    def listed(self, node: Node, names: int) -> None:
        """The kernel reads a listing of node with these names (a readdir at offset 0), or
        the daemon has these now (a GETATTR of a kept listing): if the kernel may hold other
        names, the mtime moves, so that whatever it kept is read again."""
        held = self._held.get(node)
        if held is None:
            self._held[node] = Held(names)
        elif held.names != names:
            held.names = names
            self._move(held)

    def filled(self, node: Node) -> None:
        """The kernel reads node's listing from its start: what it keeps from now is good in
        its eyes until its attributes expire (and the mtime moved) or it changes node."""
        held = self._held.get(node)
        if held is not None:
            held.fresh = True

    def kernel_changed(self, node: Node) -> None:
        """An rmdir or mkdir in node succeeded: the kernel bumps node's change counter at the
        reply, so the listing it keeps is read again at the next readdir, whatever else moves
        meanwhile (a readdir answered before this reply began its fill before the bump)."""
        held = self._held.get(node)
        if held is not None:
            held.fresh = False

    def may_hold(self, node: Node) -> bool:
        """Whether the kernel may hold a listing of node that it would show without asking."""
        held = self._held.get(node)
        return held is not None and held.fresh

    def move(self, node: Node) -> None:
        """node's names changed (through the mount, or it must be read again): its mtime moves."""
        held = self._held.get(node)
        if held is not None:
            self._move(held)

    def move_all(self) -> None:
        """SIGHUP: every kept listing is read again."""
        for held in self._held.values():
            self._move(held)

    def entries_used(self, node: Node, seconds: float) -> None:
        """node's entries are in use: one was looked up (`ls -l`, `du`, `find -size` stat the
        names of a listing), or a listing handed them with their attributes. A kept listing
        goes to the kernel as names only, and an entry that expires in 0.1 s (tags/, layers/,
        manifests/, uploads/) then costs a LOOKUP each; listed by the daemon, its READDIRPLUS
        chunks carry the attributes. So for `seconds` after, each GETATTR moves the mtime
        (`relists`) and the next readdir lists it from the daemon. Tags listed as
        placeholders (names only) leave it alone: a plain `ls` of them stays kept."""
        held = self._held.get(node)
        if held is not None:
            held.used_until = time.monotonic() + seconds

    def relists(self, node: Node) -> bool:
        held = self._held.get(node)
        return held is not None and time.monotonic() < held.used_until

    def mtime_ns(self, node: Node, stored_ns: int) -> int:
        """What stat shows: the storage's mtime, or when the daemon last saw the names move."""
        held = self._held.get(node)
        if held is None:
            return stored_ns
        held.stored_ns = stored_ns
        held.mtime_ns = max(stored_ns, held.mtime_ns)  # never back, while the kernel holds it
        return held.mtime_ns

    def ctime_ns(self, node: Node, mtime_ns: int) -> int:
        """What stat shows as ctime beside `mtime_ns`: the storage's mtime, not one moved
        only to have the kernel list the directory again. `tar -c` compares a directory's
        ctime before and after it read it, and said "file changed as we read it" (exit 1)
        of layers/ after it had stat'ed its entries, though nothing had changed."""
        held = self._held.get(node)
        return held.stored_ns if held is not None and held.stored_ns else mtime_ns

    def drop(self, node: Node) -> None:
        """The kernel forgot node's inode, and its listing with it."""
        self._held.pop(node, None)

    @staticmethod
    def _move(held: Held) -> None:
        """Strictly later than any mtime shown before: the kernel compares for equality."""
        held.mtime_ns = max(time.time_ns(), held.mtime_ns + 1)
