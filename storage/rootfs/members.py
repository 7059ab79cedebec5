"""One tar entry of a layer, as the layer index stores it and the merge consumes it.

The index (`storage.rootfs.index`) yields these in tar order; the merge
(`storage.rootfs.merge`) applies the OCI layer rules to one list per layer. Paths are
normalised once, here, so that no later step can be led outside the image by a hostile tar.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import posixpath
import threading
from collections.abc import Iterator
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

    # Members are singletons, so identity will do; Enum's own hash is a Python call (a
    # listing of an image's directory looks each entry's kind up in a table).
    __hash__ = object.__hash__


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


_new = object.__new__
(_path, _kind, _mode, _uid, _gid, _mtime_ns, _size, _offset, _link, _major, _minor, _xattrs) = (
    Member.__dict__[name].__set__
    for name in Member.__slots__  # the slots' own setters
)


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
    """`Member(...)` with every field given, without the frozen dataclass's `__init__`,
    which sets each field through `object.__setattr__` (2.5 µs a member, this 1.2): a stored
    table is decoded a member at a time, on the way to a fresh mount's first `cat`."""
    member: Member = _new(Member)
    _path(member, path)
    _kind(member, kind)
    _mode(member, mode)
    _uid(member, uid)
    _gid(member, gid)
    _mtime_ns(member, mtime_ns)
    _size(member, size)
    _offset(member, offset)
    _link(member, linkname)
    _major(member, devmajor)
    _minor(member, devminor)
    _xattrs(member, xattrs)
    return member


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


_pauses = 0  # gc_paused() blocks running now, in any thread
_pauses_lock = threading.Lock()
_gc_was_enabled = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while member tables or trees are made (a stored index's load, a merge):
    they hold no reference cycles, and the collections their allocations set off walk
    every new object again and again: 12-43 ms of the 200-340 ms that loading and merging
    15,000 members took (gc.callbacks, a daemon's modules imported). Pauses in several
    threads end with the last; a GC that was off before stays off."""
    global _pauses, _gc_was_enabled
    with _pauses_lock:
        if _pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses -= 1
            if _pauses == 0 and _gc_was_enabled:
                gc.enable()
