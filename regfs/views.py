"""The hook for a new read-only view: one more section in every repository, one module.

The registry's own sections (tags/, manifests/, layers/, uploads/) are served by `Tree`. A
view adds a section (`MNT/<repo>/<section>/`) and everything below it: `Tree` answers the
section directory's own attributes and sends every other question about the section and the
nodes below it to the view. The view defines its own node kinds (subclasses of `Node`, listed
in `node_types` so that `Tree` knows whom to ask), and passes a `View` to `Tree(views=...)`.

The rest of the daemon is generic: inodes, directory handles, open files, the kernel's
timeouts and every refusal of a change (a view's nodes are read-only: open for writing,
create, unlink, rename, setattr, mkdir are refused with EPERM, or EROFS on a read-only mount).
See docs/architecture.md.
"""

from __future__ import annotations

from typing import Protocol

from storage.api import BlobReader

from .nodes import Attr, Node


class View(Protocol):
    """A read-only section of every repository (NotFound for names that are not there)."""

    node_types: tuple[type[Node], ...]  # the kinds of node below the section

    async def lookup(self, parent: Node, name: str) -> Node:
        """The child `name` of the section (a `SectionNode`) or of one of the view's nodes."""
        ...

    async def children(self, node: Node) -> list[tuple[str, Node]]:
        """A directory's entries, in the order `ls -f` shows them."""
        ...

    async def attr(self, node: Node) -> Attr:
        """One of the view's own nodes (never the section directory)."""
        ...

    async def xattrs(self, node: Node) -> dict[str, bytes]:
        """Its extended attributes (names under `user.regfs.`)."""
        ...

    async def open(self, node: Node) -> BlobReader:
        """A reader of a file's bytes; IsADirectoryError for a directory."""
        ...

    def forget_moving(self) -> None:
        """Drop what is cached of things that can change (SIGHUP)."""
        ...
