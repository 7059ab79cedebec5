"""The vocabulary every part of the daemon shares: the nodes of the tree and their attributes.

A node is a small frozen value that names one file or directory the mount shows; equal nodes
are the same file (the inode table maps each to one inode number). The registry's own kinds
are here; a view (regfs/views.py) defines its own kinds as more subclasses of `Node`.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.digests import Digest
from storage.errors import InvalidName


class NotFound(LookupError):
    """A name that does not exist in the tree (ENOENT)."""


@dataclass(frozen=True)
class Node:
    """A file or directory of the mount; subclasses say which (equal only within one kind)."""


@dataclass(frozen=True)
class DirNode(Node):
    """The root (path "") or a namespace/repository directory."""

    path: str


@dataclass(frozen=True)
class SectionNode(Node):
    """`<repository>/<section>/`: tags, manifests, layers, uploads, or a view's section."""

    repo: str
    section: str


@dataclass(frozen=True)
class TagNode(Node):
    repo: str
    tag: str


@dataclass(frozen=True)
class ManifestNode(Node):
    repo: str
    digest: Digest


@dataclass(frozen=True)
class LayerNode(Node):
    repo: str
    digest: Digest


@dataclass(frozen=True)
class UploadNode(Node):
    repo: str
    uuid: str


ROOT = DirNode("")
REGISTRY_KINDS = (DirNode, SectionNode, TagNode, ManifestNode, LayerNode, UploadNode)


@dataclass(frozen=True)
class FixedNode(Node):
    """A view's file whose bytes never change (a file inside an image): the kernel may keep
    its pages across opens, as for layers/ and manifests/; or a view's directory whose
    entries never change: the kernel may keep its listing."""


@dataclass(frozen=True)
class Attr:
    """What the tree says of a node; regfs/attributes.py turns it into what stat shows."""

    is_dir: bool
    size: int
    mtime_ns: int
    immutable: bool = False  # digest-addressed: the kernel may keep it (and its pages) long
    # A view's own file (an image's file in rootfs/): its st_mode with the file type, owner,
    # link count and device number. None/0: the mount's mode and owner, 1 or 2 links.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    nlink: int = 0
    rdev: int = 0


def digest_name(name: str) -> Digest | None:
    """The digest a file name spells (`sha256:<hex>`), or None for any other name."""
    if ":" not in name:  # every tag and file name: no exception raised and caught per lookup
        return None
    try:
        return Digest.parse(name)
    except InvalidName:
        return None
