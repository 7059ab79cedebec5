"""The kernel's read-ahead for the mount, which sets how big FUSE reads arrive.

A FUSE mount gets a backing device whose read-ahead is 128 KiB, and the kernel sends a
sequential reader's data in requests no bigger than that window, however big its read(2) calls.
Each request is a round trip through the daemon, so 1 MiB requests cost an eighth of the trips
(docs/performance.md). Only root may raise it (sysfs); anyone else keeps the kernel's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .mountpoint import unescape

log = logging.getLogger(__name__)


def mount_device(mountpoint: str) -> str | None:
    """The `major:minor` of the filesystem mounted on mountpoint (the top one), or None."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        if len(parts) > 4 and unescape(parts[4]) == mountpoint:
            found = parts[2]
    return found


def bdi_setting(mountpoint: str) -> Path | None:
    device = mount_device(mountpoint)
    return None if device is None else Path("/sys/class/bdi", device, "read_ahead_kb")


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Set the mount's read-ahead. The kernel resets it when it takes the daemon's INIT reply,
    so this must come after the first request has been served."""
    setting = bdi_setting(mountpoint)
    if setting is None:
        log.warning("read-ahead: %s is not in the mount table; left as it is", mountpoint)
        return
    try:
        was = setting.read_text().strip()
        setting.write_text(str(kib))
    except OSError as exc:
        log.warning("read-ahead: cannot set %s to %d KiB (%s); it stays", setting, kib, exc)
        return
    log.info("read-ahead: %s KiB → %d KiB (%s)", was, kib, setting)
