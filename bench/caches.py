"""Making reads cold or warm on purpose.

Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` drops the page cache of every file, the
backing blob's and the mount's alike, so both sides of a cold comparison start from disk.
Where one file is enough, `posix_fadvise(DONTNEED)` drops just that file's pages (it also
works on a file in the mount: the kernel drops the FUSE inode's pages, so the next read goes
to the daemon again).
"""

from __future__ import annotations

import os
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
HOW_COLD = "sync; echo 3 > /proc/sys/vm/drop_caches before each side"


def can_drop_all() -> bool:
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def drop_all() -> None:
    """Write back dirty pages, then drop every clean page, dentry and inode cache."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def drop_fd(fd: int) -> None:
    """Drop one open file's clean pages (setup syncs what it wrote, so none are dirty)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_fd(fd)
    finally:
        os.close(fd)


def warm(*paths: Path) -> None:
    """Read files whole so their pages sit in the page cache."""
    buf = bytearray(1 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
