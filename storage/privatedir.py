"""The daemon's own directories under a user's base directory (the index cache under
$XDG_CACHE_HOME, upload records under $XDG_STATE_HOME), opened so that nobody else can
steer what is written there or where.

The base is the user's choice (their links are theirs); each directory below it is made
0700 where missing and opened one component at a time from the one above, O_NOFOLLOW:
nothing is ever made or opened through a link someone planted in a shared base (a sticky
1777 $XDG_CACHE_HOME), and a component that is one is refused. docs/security.md.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import StorageError

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectory(StorageError):
    """A directory of the daemon's that someone else could write or that is reached by a link."""


def open_private(
    base: Path, parts: Sequence[str], refuse: type[UnsafeDirectory] = UnsafeDirectory
) -> int:
    """A descriptor of base/parts..., each part made 0700 when missing. `refuse` is raised
    unless the last part is the user's own and writable by nobody else, and the base and
    every part above the last are the user's or root's and writable by others only if
    sticky (as /tmp), so that nobody else can swap what is below them."""
    where = base.joinpath(*parts)
    base.mkdir(parents=True, exist_ok=True)
    fd = _open(str(base), None, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, where, refuse)
    try:
        for depth, part in enumerate(parts):
            _check_holder(fd, where, refuse)
            with contextlib.suppress(FileExistsError):  # a link too: opening it refuses it
                os.mkdir(part, 0o700, dir_fd=fd)
            fd, above = _open(part, fd, _DIRECTORY, where, refuse), fd
            os.close(above)
            if depth == len(parts) - 1:
                st = os.fstat(fd)
                if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                    raise refuse(f"{where}: {_owner(st)}; it must be ours alone")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_holder(fd: int, where: Path, refuse: type[UnsafeDirectory]) -> None:
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise refuse(f"{where}: a directory above it is {_owner(st)}")


def _open(
    name: str, parent: int | None, flags: int, where: Path, refuse: type[UnsafeDirectory]
) -> int:
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        raise refuse(f"{where}: {name}: {exc.strerror}") from None


def _owner(st: os.stat_result) -> str:
    return f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}"
