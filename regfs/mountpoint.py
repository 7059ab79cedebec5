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


def _unescape(field: bytes) -> str:
    """/proc/mounts and mountinfo escape space, tab, newline and backslash as octal, and
    nothing else: a mount point's name may hold a CR or a 0x1f, where str.splitlines and
    str.split would also cut (a name made to forge a line or a field)."""
    for code in (b"040", b"011", b"012", b"134"):
        field = field.replace(b"\\" + code, bytes([int(code, 8)]))
    return os.fsdecode(field)


def mount_table(path: str) -> list[list[bytes]]:
    """Each line of a mount table (/proc/mounts, a mountinfo) as the kernel writes it: cut
    at newlines, fields at spaces, nothing else (see `_unescape`). Any local user can mount
    (fusermount3) at a name made to forge a line where more is cut."""
    return mount_lines(Path(path).read_bytes())


def mount_lines(table: bytes) -> list[list[bytes]]:
    """`mount_table` of a table read already."""
    return [line.split(b" ") for line in table.split(b"\n") if line]


def mountinfo_type(fields: list[bytes]) -> bytes:
    """The file system type of a mountinfo line: the field after the "-" that ends the
    optional fields (b"" if there is none)."""
    try:
        return fields[fields.index(b"-", 6) + 1]
    except (ValueError, IndexError):
        return b""


def mounted_filesystem(path: str) -> str | None:
    """The filesystem type mounted exactly on path (per /proc/mounts), or None."""
    found = None
    for parts in mount_table("/proc/mounts"):
        if len(parts) > 2 and _unescape(parts[1]) == path:
            found = os.fsdecode(parts[2])  # the last one is on top
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
    for fields in mount_table("/proc/self/mountinfo"):
        # id parent dev root point options [optional...] - type source super-options
        if len(fields) < 5 or _unescape(fields[4]) != path or not mountinfo_type(fields):
            continue
        options = fields[-1].split(b",")
        found = next((int(o[8:]) for o in options if o.startswith(b"user_id=")), None)
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


def exited(pid: int) -> bool:
    """Whether process pid is gone, or every thread of it a zombie: its descriptors closed.
    The leader turns zombie while other threads still exit, holding the descriptor table
    they share: until then a disk under the storage root is busy (`umount` says EBUSY)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as stat:
                state = stat.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            return False
    return True
