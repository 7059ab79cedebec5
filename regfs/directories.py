"""Directories: a listing per opendir, readdir from it, and repositories made by mkdir and
removed by rmdir."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import EntryAttributes, ReaddirToken

from storage.errors import CorruptEntry

from .attributes import Attributes
from .inodes import InodeTable
from .nodes import Attr, DirNode, Node
from .tree import Tree

log = logging.getLogger(__name__)


@dataclass
class Listing:
    """A directory snapshot taken at opendir, so readdir offsets stay stable."""

    entries: list[tuple[str, Node]]


class Directories:
    def __init__(self, tree: Tree, inodes: InodeTable, attributes: Attributes) -> None:
        self.tree = tree
        self.inodes = inodes
        self.attributes = attributes
        self._listings: dict[int, Listing] = {}
        self._next_fh = 1

    async def open(self, node: Node) -> int:
        listing = Listing(await self.tree.children(node))
        fh = self._next_fh
        self._next_fh += 1
        self._listings[fh] = listing
        return fh

    async def read(self, fh: int, start_id: int, token: ReaddirToken) -> None:
        listing = self._listings[fh]
        for index in range(start_id, len(listing.entries)):
            name, node = listing.entries[index]
            entry = self.attributes.listed(node)  # a tag: no storage read
            try:
                if entry is None:
                    entry = await self.attributes.entry_of(node)
            except CorruptEntry as exc:
                # Listed, so the user sees it; uncached, so the next lookup reports EIO.
                log.error("readdir: %s: %s", name, exc)
                entry = self.attributes.entry(node, Attr(False, 0, self.tree.started_ns), 0)
            except LookupError:
                continue  # gone since opendir
            if not pyfuse3.readdir_reply(token, name.encode(), entry, index + 1):
                break
            self.inodes.ref(entry.st_ino)

    def release(self, fh: int) -> None:
        del self._listings[fh]

    async def make(self, parent: DirNode, name: str) -> EntryAttributes:
        """mkdir: a new repository (or namespace) beneath parent."""
        node = await self.tree.mkdir(parent, name)
        entry = self.attributes.entry(node, await self.tree.attr(node))
        self.inodes.ref(entry.st_ino)
        log.info("mkdir: created repository %s", node.path)
        return entry

    async def remove(self, parent: DirNode, name: str) -> None:
        """rmdir of an empty repository or namespace."""
        node = await self.tree.rmdir(parent, name)
        log.info("rmdir: removed repository %s", node.path)
