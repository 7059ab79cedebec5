"""Removing a directory tree beneath a directory descriptor, opening nothing but directories.

`shutil.rmtree(name, dir_fd=)` (Python 3.11) lstats each directory, opens it with a plain
O_RDONLY, then checks that it opened the same inode: a storage root's owner who swaps the
directory for a symlink between the two makes the daemon (root) open the link's target,
outside the root, and a FIFO there holds the call for good. Here every open is
O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK: a name that is no longer a directory is unlinked as a
name, never followed or opened. Iterative, so a deep tree costs no recursion, and it holds
a bounded number of descriptors.
"""

from __future__ import annotations

import errno
import os

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What opening a name with _DIRECTORY says when it is not a directory (a symlink: ELOOP, or
# ENOTDIR with O_DIRECTORY on some kernels; a file, a FIFO: ENOTDIR).
_NOT_A_DIRECTORY = (errno.ELOOP, errno.ENOTDIR)
HELD = 32  # descriptors held at most while a tree is removed (RLIMIT_NOFILE may be 1024)


def remove_tree(name: str, dir_fd: int) -> None:
    """Remove `name` (a directory in `dir_fd`) and everything below it, whatever its depth,
    holding at most HELD descriptors: a directory above those is opened again from `dir_fd`
    by its names when its turn comes (never by `..`, which a rename could lead outside)."""
    names: list[str] = []  # from dir_fd down to the directory being emptied
    held: dict[int, int] = {}  # depth (len of names) -> descriptor of that directory

    def at(depth: int) -> int:
        if depth == 0:
            return dir_fd
        if depth not in held:  # opened again, with the few below it, from the nearest held
            start = max((d for d in held if d < depth), default=0)
            for d in range(start + 1, depth + 1):
                hold(d, os.open(names[d - 1], _DIRECTORY, dir_fd=at(d - 1)))
        return held[depth]

    def hold(depth: int, fd: int) -> None:
        held[depth] = fd
        while len(held) > HELD:
            os.close(held.pop(min(held)))

    below: str | None = name
    try:
        while True:
            if below is not None:
                try:
                    fd = os.open(below, _DIRECTORY, dir_fd=at(len(names)))
                except OSError as exc:
                    if exc.errno not in _NOT_A_DIRECTORY:
                        raise
                    os.unlink(below, dir_fd=at(len(names)))  # swapped for a link or a file
                    if not names:
                        return
                else:
                    names.append(below)
                    hold(len(names), fd)
            below = _unlink_all_but_a_directory(at(len(names)))
            if below is None:
                os.close(held.pop(len(names)))
                own = names.pop()
                os.rmdir(own, dir_fd=at(len(names)))
                if not names:
                    return
    finally:
        for fd in held.values():
            os.close(fd)


def _unlink_all_but_a_directory(fd: int) -> str | None:
    """Unlink every entry of the directory `fd` that is not a directory; the name of a
    directory found among them (its turn is next), or None once none is left."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except IsADirectoryError:  # made a directory since it was listed
                return entry.name
            except FileNotFoundError:
                pass
    return None
