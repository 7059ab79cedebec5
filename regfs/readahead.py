"""The kernel's read-ahead for the mount, which sets how big FUSE reads arrive.

A FUSE mount gets a backing device whose read-ahead is 128 KiB, and the kernel sends a
sequential reader's data in requests no bigger than that window, however big its read(2) calls.
Each request is a round trip through the daemon, so 1 MiB requests cost an eighth of the trips
(docs/performance.md). Only root may raise it (sysfs); anyone else keeps the kernel's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def bdi_setting(device: int) -> Path:
    """The read-ahead file of a filesystem's backing device (st_dev of its root)."""
    return Path("/sys/class/bdi", f"{os.major(device)}:{os.minor(device)}", "read_ahead_kb")


def set_read_ahead(device: int, kib: int) -> None:
    """Set the mount's read-ahead. The kernel resets it when it takes the daemon's INIT reply,
    so this must come after the first request has been served."""
    setting = bdi_setting(device)
    try:
        was = setting.read_text().strip()
        setting.write_text(str(kib))
    except OSError as exc:
        log.warning("read-ahead: cannot set %s to %d KiB (%s); it stays", setting, kib, exc)
        return
    log.info("read-ahead: %s KiB → %d KiB (%s)", was, kib, setting)
