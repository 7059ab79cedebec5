"""What a storage root holds, as a dict to compare before and after: two equal snapshots
mean an operation changed nothing in storage."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """Every directory and file under root (nothing excluded), files with a sha256 of their
    bytes."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(found.items()))


def files_snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes (directories left out)."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def lstat_snapshot(root: Path) -> dict[str, str]:
    """Every path under root: files by the sha256 of their bytes, the rest by kind (lstat:
    a FIFO is never opened, a symlink never followed)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    kind = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(mode):
                kind = "symlink -> " + os.readlink(path)
            else:
                kind = stat.filemode(mode)[0]
            found[os.path.relpath(path, root)] = kind
    return found
