"""Removing a directory tree beneath a directory descriptor, opening nothing but directories.

`shutil.rmtree(name, dir_fd=)` (Python 3.11) lstats each directory, opens it with a plain
O_RDONLY, then checks that it opened the same inode: a storage root's owner who swaps the
directory for a symlink between the two makes the daemon (root) open the link's target,
outside the root, and a FIFO there holds the call for good. Here every open is
O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK: a name that is no longer a directory is unlinked as a
name, never followed or opened. Iterative, so a deep tree costs no recursion.
"""

from __future__ import annotations

import errno
import os

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What opening a name with _DIRECTORY says when it is not a directory (a symlink: ELOOP, or
# ENOTDIR with O_DIRECTORY on some kernels; a file, a FIFO: ENOTDIR).
_NOT_A_DIRECTORY = (errno.ELOOP, errno.ENOTDIR)


def remove_tree(name: str, dir_fd: int) -> None:
    """Remove `name` (a directory in `dir_fd`) and everything below it."""
    opened: list[tuple[int, str]] = []  # (descriptor, its name in the one before)
    below: str | None = name
    try:
        while True:
            parent = opened[-1][0] if opened else dir_fd
            if below is not None:
                try:
                    opened.append((os.open(below, _DIRECTORY, dir_fd=parent), below))
                except OSError as exc:
                    if exc.errno not in _NOT_A_DIRECTORY:
                        raise
                    os.unlink(below, dir_fd=parent)  # swapped for a link or a file meanwhile
                    if not opened:
                        return
            fd, own = opened[-1]
            below = _unlink_all_but_a_directory(fd)
            if below is None:
                opened.pop()
                os.close(fd)
                os.rmdir(own, dir_fd=opened[-1][0] if opened else dir_fd)
                if not opened:
                    return
    finally:
        for fd, _ in opened:
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
