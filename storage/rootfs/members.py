"""One tar entry of a layer, as the layer index stores it and the merge consumes it.

The index (`storage.rootfs.index`) yields these in tar order; the merge
(`storage.rootfs.merge`) applies the OCI layer rules to one list per layer. Paths are
normalised once, here, so that no later step can be led outside the image by a hostile tar.
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import Sequence
from itertools import repeat
from typing import Any, NamedTuple


class Kind(enum.Enum):
    """What a tar entry is; a hard link is its own kind until the merge resolves it."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"

    # Members are singletons, so identity will do; Enum's own hash is a Python call (a
    # listing of an image's directory looks each entry's kind up in a table).
    __hash__ = object.__hash__


class Member(NamedTuple):
    """A tar entry: where its bytes are in the uncompressed stream, and its attributes.

    `path` is normalised by `normalise()`: relative, no `.`/`..`/empty components, "" for
    the image root. `linkname` is a symlink's target exactly as stored, or a hard link's
    target path, normalised like `path`. `offset` is where the data starts in the
    uncompressed tar stream (meaningful for FILE only); `mode` holds the permission bits
    (0o7777) only.

    A named tuple, not a frozen dataclass: the same size (136 bytes against 128), its
    fields read as fast, and a stored table's members are made in C, without a Python call
    each (`make_members`): a frozen dataclass's `__init__` took 2.5 µs a member, slot
    setters 1.2.
    """

    path: str
    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    offset: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


class Table(list[Member]):
    """A layer's members as its stored index gave them, with what the file held of them
    that a kept tree's load reads (`treefile`): the fingerprint of their kinds, paths and
    link names, hashed from the file's bytes as they were read, and their kinds' bytes
    (`indexfile.KINDS`), not taken from the members made of them again."""

    __slots__ = ("codes", "fingerprint")

    def __init__(self, members: list[Member], fingerprint: str, codes: bytes) -> None:
        super().__init__(members)
        self.fingerprint = fingerprint
        self.codes = codes


_new = tuple.__new__


def make_member(
    path: str,
    kind: Kind,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    size: int,
    offset: int,
    linkname: str,
    devmajor: int,
    devminor: int,
    xattrs: tuple[tuple[str, bytes], ...],
) -> Member:
    """`Member(...)` with every field given, without the named tuple's `__new__` (a Python
    function that takes keywords): the tar scan makes one per member."""
    fields = (path, kind, mode, uid, gid, mtime_ns, size, offset, linkname)
    return _new(Member, (*fields, devmajor, devminor, xattrs))


def make_members(columns: Sequence[Sequence[Any]]) -> list[Member]:
    """Members given field by field (`columns[i][j]` is field i of member j, in `Member`'s
    order), made in C: no Python call per member. A stored table is decoded this way,
    4,096 members at a time."""
    return list(map(_new, repeat(Member), zip(*columns, strict=True)))


def normalise(name: str) -> str:
    """A tar name as a path inside the image: `/`, `./` and `..` can never climb out of it."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return posixpath.join(*parts) if parts else ""
