"""One tar entry of a layer, as the layer index stores it and the merge consumes it.

The index (`storage.rootfs.index`) yields these in tar order; the merge
(`storage.rootfs.merge`) applies the OCI layer rules to one list per layer. Paths are
normalised once, here, so that no later step can be led outside the image by a hostile tar.
"""

from __future__ import annotations

import enum
import posixpath
from dataclasses import dataclass


class Kind(enum.Enum):
    """What a tar entry is; a hard link is its own kind until the merge resolves it."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(frozen=True, slots=True)
class Member:
    """A tar entry: where its bytes are in the uncompressed stream, and its attributes.

    `path` is normalised by `normalise()`: relative, no `.`/`..`/empty components, "" for
    the image root. `linkname` is a symlink's target exactly as stored, or a hard link's
    target path, normalised like `path`. `offset` is where the data starts in the
    uncompressed tar stream (meaningful for FILE only); `mode` holds the permission bits
    (0o7777) only.
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
