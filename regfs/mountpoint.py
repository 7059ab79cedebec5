"""Mountpoint checks, dead-mount clean-up, and finding the daemon that serves a mount."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


class MountError(Exception):
    """A mount or unmount that cannot go ahead; the message is for the user."""


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def mounted_filesystem(path: str) -> str | None:
    """The filesystem type mounted exactly on path (per /proc/mounts), or None."""
    found = None
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and _unescape(parts[1]) == path:
            found = parts[2]  # the last one is on top
    return found


def force_unmount(path: str) -> None:
    for command in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if subprocess.run(command, capture_output=True).returncode == 0:
            return
    raise MountError(f"could not unmount {path}")


def prepare(mountpoint: str) -> str:
    """The absolute mountpoint, ready to mount on; a dead regfs mount there is cleaned up."""
    path = os.path.abspath(mountpoint)
    try:
        os.stat(path)
        if (mounted_filesystem(path) or "").startswith("fuse"):
            # stat can answer from the kernel's attribute cache for a while after the daemon
            # died; statfs always asks the daemon, so a dead mount fails it with ENOTCONN.
            os.statvfs(path)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"mountpoint {path}: {exc.strerror}") from None
        log.warning("prepare: %s is a dead FUSE mount (%s); cleaning it up", path, exc.strerror)
        force_unmount(path)
    if not os.path.isdir(path):
        raise MountError(f"mountpoint {path} is not a directory")
    kind = mounted_filesystem(path)
    if kind is not None and os.path.ismount(path):
        raise MountError(f"mountpoint {path} is busy: {kind} is already mounted there")
    return path


def mount_owner(path: str) -> int | None:
    """The user a FUSE mount on path belongs to (its `user_id=` in /proc/self/mountinfo),
    or None if none is mounted there."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) < 5 or _unescape(fields[4]) != path or " - " not in line:
            continue
        options = line.rsplit(" - ", 1)[1].split()[-1].split(",")
        found = next((int(o[8:]) for o in options if o.startswith("user_id=")), None)
    return found


def daemon_pids(mountpoint: str) -> list[int]:
    """Pids of the regfs daemons serving mountpoint: their command line ends with it, and
    they run as the mount's user (as the caller, if nothing is mounted there). Anyone can
    name a process `regfs ... --foreground MNT`; root's `regfs umount` must not wait on
    another user's look-alike."""
    owner = mount_owner(mountpoint)
    uid = os.getuid() if owner is None else owner
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            runs_as = entry.stat().st_uid
        except OSError:
            continue
        is_regfs = any(a == b"regfs" or a.endswith(b"/regfs") for a in args)
        if (
            is_regfs
            and b"--foreground" in args
            and args[-1] == os.fsencode(mountpoint)
            and runs_as == uid
        ):
            pids.append(int(entry.name))
    return pids
