"""The daemon's inode table seen from outside, and making the kernel let inodes go."""

from __future__ import annotations

import os
from pathlib import Path

from support.mounts import Mount, wait_until
from support.tools import run


def held(m: Mount) -> int:
    """How many inodes the daemon holds for the kernel (`getfattr -n user.regfs.inodes`)."""
    value = run("getfattr", "--only-values", "-n", "user.regfs.inodes", m.mountpoint).stdout
    return int(value)


def drop_kernel_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2")


def forgotten(m: Mount, at_most: int) -> None:
    """Drop the kernel's unused inodes until the daemon holds at most `at_most` (FORGETs
    come asynchronously, after the write returns)."""

    def settled() -> bool:
        drop_kernel_caches()
        return held(m) <= at_most

    wait_until(settled, 10, f"the daemon to hold at most {at_most} inodes")
