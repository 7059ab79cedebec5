"""The vocabulary every part of the daemon shares: the nodes of the tree and their attributes.

A node is a small frozen value that names one file or directory the mount shows; equal nodes
are the same file (the inode table maps each to one inode number). The registry's own kinds
are here; a view (regfs/views.py) defines its own kinds as more subclasses of `Node`.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

from storage.digests import Digest
from storage.errors import InvalidName
from storage.gcpause import gc_paused

_TAG_KIND = "tag"
_HEX = attrgetter("hex")  # a Digest's


class NotFound(LookupError):
    """A name that does not exist in the tree (ENOENT)."""


class Node:
    """A file or directory of the mount; subclasses say which (equal only within one kind)."""

    __slots__ = ()


@dataclass(frozen=True)
class DirNode(Node):
    """The root (path "") or a namespace/repository directory."""

    path: str


@dataclass(frozen=True)
class SectionNode(Node):
    """`<repository>/<section>/`: tags, manifests, layers, uploads, or a view's section."""

    repo: str
    section: str


class TagNode(tuple[str, str, str], Node):
    """`<repository>/tags/<tag>`: a tuple (a kind marker, repo, tag), not a dataclass. A listing
    makes one per tag (10,000 and more) and its readdir looks each up in several tables; a
    tuple is made, hashed and compared in C, about 3x cheaper than a frozen dataclass (see
    docs/performance.md). The marker keeps it unequal to every other kind, as a dataclass is."""

    __slots__ = ()
    __match_args__ = ("repo", "tag")

    def __new__(cls, repo: str, tag: str) -> TagNode:
        return tuple.__new__(cls, (_TAG_KIND, repo, tag))

    @property
    def repo(self) -> str:
        return self[1]

    @property
    def tag(self) -> str:
        return self[2]

    def __repr__(self) -> str:
        return f"TagNode(repo={self[1]!r}, tag={self[2]!r})"

    def __getnewargs__(self) -> tuple[str, str]:  # copy and pickle call __new__ with these
        return self[1], self[2]

    @classmethod
    def listing(cls, repo: str, tags: Sequence[str]) -> list[tuple[str, Node]]:
        """(tag, its node) for each of a repository's tags, made without a Python call per
        tag (10,000 in ~2.5 ms, not ~6) and no cyclic collection (`gc_paused`)."""
        fields = zip(repeat(_TAG_KIND), repeat(repo), tags, strict=False)  # as long as tags
        with gc_paused():
            return list(zip(tags, map(tuple.__new__, repeat(cls), fields), strict=True))


@dataclass(frozen=True, slots=True, weakref_slot=True)
class DigestNode(Node):
    """A digest of a repository, in its manifests/ or layers/ (the subclasses). Hashed once:
    readdir of 10,000 looks each up in ~5 tables, and a dataclass hashes (repo, Digest) in two
    Python calls every time (35% of readdir's work per entry, cProfile). Equal only within
    one subclass, as dataclasses are. Slots: less memory per kept digest, and `listing`
    makes them without a Python call each; a weak reference: the tree shares one manifest
    node among the tags that point at it (`Tree._targets`)."""

    repo: str
    digest: Digest
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((type(self).__name__, self.repo, self.digest.hex)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def listing(cls, repo: str, digests: Sequence[Digest]) -> list[tuple[str, Node]]:
        """(its name, its node) for each digest of a listing, the nodes made and hashed as
        one at a time, but field by field in C (10,000 in ~6 ms, not ~11)."""
        count, put = len(digests), object.__setattr__  # past the frozen dataclass's refusal
        with gc_paused():
            nodes = list(map(object.__new__, repeat(cls, count)))
            hashes = map(hash, zip(repeat(cls.__name__), repeat(repo), map(_HEX, digests)))
            for name, values in (
                ("repo", repeat(repo, count)),
                ("digest", digests),
                ("_hash", hashes),
            ):
                deque(map(put, nodes, repeat(name), values), maxlen=0)
            return list(zip(map(str, digests), nodes, strict=True))


class ManifestNode(DigestNode):
    """`<repository>/manifests/<digest>` (no @dataclass of its own: it would hash again)."""

    __slots__ = ()


class LayerNode(DigestNode):
    """`<repository>/layers/<digest>`."""

    __slots__ = ()


@dataclass(frozen=True)
class UploadNode(Node):
    repo: str
    uuid: str


@dataclass(frozen=True)
class FinishedNode(Node):
    """`<repository>/uploads/<digest>` for a few seconds after the upload of that name finished
    (`Tree.finished`): the layer it became, read-only. Tools that copy by path set the mode
    and times by path after close (`install -m`, Python's `shutil.copy`, `rsync -a
    --inplace`), and found no file there. Not listed: it is no upload."""

    repo: str
    digest: Digest


ROOT = DirNode("")
REGISTRY_KINDS = (DirNode, SectionNode, TagNode, ManifestNode, LayerNode, UploadNode, FinishedNode)


class FixedNode(Node):
    """A view's file whose bytes never change (a file inside an image): the kernel may keep
    its pages across opens, as for layers/ and manifests/; or a view's directory whose
    entries never change: the kernel may keep its listing."""

    __slots__ = ()


class Attr(NamedTuple):
    """What the tree says of a node; regfs/attributes.py turns it into what stat shows.
    A named tuple, made 3x faster than a frozen dataclass: a listing of an image's
    directory makes one per entry."""

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


class AttrColumns(NamedTuple):
    """What stat shows of each entry of a listing, a column per field (entry i's is each
    column's item i): `Attr`'s fields of a view's fixed file (`immutable`, mode with the
    file type, owner and link count given), made a column at a time, not an `Attr` each."""

    mode: list[int]
    nlink: list[int]
    uid: list[int]
    gid: list[int]
    rdev: list[int]
    size: list[int]
    mtime_ns: list[int]


class Listing(list[tuple[str, Node]]):
    """A directory's entries that are all fixed files and directories (`FixedNode`,
    immutable: an image's), with their names as bytes (`encoded`) and what stat shows of
    each packed as `readdir_reply_many` takes it (`rows`, `attributes.packed`), as a view's
    `children` may answer. An image's directory has every entry's attributes in its merged
    tree, so readdirplus asks for no attributes entry by entry (15,000 trips through the
    tree and the view in a `find` of an image), and hands them in runs
    (`Directories._reply_packed`)."""

    __slots__ = ("encoded", "rows")

    def __init__(self, encoded: list[bytes], rows: array[int]) -> None:
        super().__init__()
        self.encoded = encoded
        self.rows = rows


def digest_name(name: str) -> Digest | None:
    """The digest a file name spells (`sha256:<hex>`), or None for any other name."""
    if ":" not in name:  # every tag and file name: no exception raised and caught per lookup
        return None
    try:
        return Digest.parse(name)
    except InvalidName:
        return None
