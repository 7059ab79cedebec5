"""Directories: a listing per opendir, readdir from it, and repositories made by mkdir and
removed by rmdir."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import EntryAttributes, FileInfo, ReaddirToken

from storage.errors import CorruptEntry

from . import fusefeatures
from .attributes import Attributes
from .inodes import InodeTable
from .nodes import Attr, DirNode, FixedNode, Node
from .tree import Tree

log = logging.getLogger(__name__)


@dataclass
class Listing:
    """A directory snapshot taken at opendir, so readdir offsets stay stable; of a directory
    whose entries never change, at the first readdir (None until then), which never comes
    while the kernel keeps the listing."""

    node: Node
    entries: list[tuple[str, Node]] | None


class Directories:
    def __init__(self, tree: Tree, inodes: InodeTable, attributes: Attributes) -> None:
        self.tree = tree
        self.inodes = inodes
        self.attributes = attributes
        self._listings: dict[int, Listing] = {}
        self._next_fh = 1

    async def open(self, node: Node) -> int | FileInfo:
        """A handle; for a directory whose entries never change (inside an image), one that
        lets the kernel keep its listing across opens, where pyfuse3 allows it."""
        fixed = isinstance(node, FixedNode) and fusefeatures.PATCHED
        listing = Listing(node, None if fixed else await self.tree.children(node))
        fh = self._next_fh
        self._next_fh += 1
        self._listings[fh] = listing
        return FileInfo(fh=fh, keep_cache=True, cache_readdir=True) if fixed else fh

    async def read(self, fh: int, start_id: int, token: ReaddirToken) -> None:
        listing = self._listings[fh]
        if listing.entries is None:
            listing.entries = await self.tree.children(listing.node)
        for index in range(start_id, len(listing.entries)):
            name, node = listing.entries[index]
            listed = self.attributes.listed(node)  # a tag: no storage read
            if listed is not None and not listed[1]:  # by name only: no inode, no count
                entry = listed[0]
                if not pyfuse3.readdir_reply(token, name.encode(), entry, index + 1, lookup=False):
                    break
                continue
            try:
                entry = listed[0] if listed is not None else await self.attributes.entry_of(node)
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
