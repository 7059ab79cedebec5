"""Which close(2) of a file being written is its last: the one that stores a tag or finishes
an upload named by its digest, and so the one whose error the writer must see.

Every close of a descriptor is a FLUSH, and a descriptor has copies: a shell's redirect dups
it (and closes the original before anything is written), the children of
`{ cat a; cat b; } > tags/v1` inherit it and close it as they exit, a program may open a file
on one thread and close it on another. Only the last close of the process that opened the
file is its end: a FLUSH from another process (thread group) ends nothing, and one from the
opener ends the file only if neither that process nor its children hold another descriptor
open for writing on the same inode of this mount (a parent that hands the descriptor to a
child it does not wait for, as Python's `Popen(..., stdout=f)` then `f.close()`, does not
end the file there; a reader it opened, held by a child or not, is no copy of the writer's
and keeps nothing from ending). The kernel tells the closing thread (its id; 0 outside our
pid namespace) with each FLUSH; close(2) takes the descriptor out of the table before it
flushes, and an exiting process's table is detached before its descriptors are closed, so
what /proc shows then is what remains. What nobody's flush ended, the release ends
(docs/concurrency.md).

Reading /proc costs a few syscalls per descriptor of the closer and its children: done only
for the opener's closes of a file with something to end, for at most `MAX_DESCRIPTORS` in all
and `MAX_CHILDREN` children. Procfs reads do not block on I/O, so a few run inline; many go
to a worker thread (a flush's added cost: docs/concurrency.md).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from .mountpoint import mount_table, mountinfo_type

log = logging.getLogger(__name__)

# A closer and its children holding more descriptors than this are taken as holding none of
# ours: the scan stays bounded, and the file ends at this close. Up to INLINE_DESCRIPTORS
# are read on the trio thread (~7 us each), more in a worker thread.
MAX_DESCRIPTORS = 4096
INLINE_DESCRIPTORS = 64
MAX_CHILDREN = 64  # children of the closer scanned, found through as many of its threads
_CHILDREN_BYTES = MAX_CHILDREN * 8  # "<pid> " of MAX_CHILDREN pids (7 digits at most)
_MOUNT_IDS_KEPT = 64  # mount ids known to be this mount (bind mounts, other namespaces)
_NAMESPACES_KEPT = 16  # mount namespaces whose other mounts' ids are kept
_OTHERS_LIFETIME = 1.0  # seconds (monotonic) those ids are kept: one mountinfo read a second


class Close(enum.Enum):
    """What a FLUSH is to the file it closes."""

    LAST = "last"  # the opener's last descriptor on the file: it ends here
    NOT_LAST = "not last"  # another process's, or the opener keeps another descriptor
    UNKNOWN = "unknown"  # no closer known (stock pyfuse3, pid 0, /proc unreadable)


@dataclass(frozen=True)
class Opener:
    """Who opened a tag, an upload or a manifest being written: the process (tgid; 0 if
    unknown) and the inode."""

    process: int
    inode: int


@dataclass(frozen=True)
class _Others:
    """Mount ids of one mount namespace known not to be this mount, until `expires`
    (monotonic): an id is reused once its mount is gone, perhaps by a bind mount of this
    one. No descriptor of its mountinfo is kept to poll for a change: an open mountinfo
    holds its namespace, and every mount in it, alive after its last process exits."""

    ids: frozenset[int]
    expires: float


class Closers:
    """Tells a FLUSH's `Close` from the closing thread's id (see the module's docstring)."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self._device: bytes | None = None  # "major:minor" of this mount, once found
        self._device_looked_up = False
        self._mount_ids: set[int] = set()
        # per mount namespace (st_dev, st_ino of /proc/<pid>/ns/mnt): a descriptor of a tty
        # (/dev/pts/N is inode N+3) or a file elsewhere with the inode number of the file
        # being written read the whole mountinfo at each close (~5 ms at 3,000 mounts)
        self._others: dict[tuple[int, int], _Others] = {}
        self._learning = threading.Lock()  # scans run on the trio thread and on workers
        self._proc_is_ours = _proc_is_ours()

    def thread_group(self, tid: int) -> int:
        """The process of thread tid (its tgid), or 0 if it cannot be told: also when the
        /proc mounted here is another pid namespace's than the daemon's (`unshare --pid`
        without a /proc of its own, a container given the host's), where tid is another
        process."""
        if tid <= 0 or not self._proc_is_ours:
            return 0
        try:
            with open(f"/proc/{tid}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"Tgid:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def opener(self, tid: int, inode: int) -> Opener:
        """The opener of inode by thread tid (an OPEN's or CREATE's)."""
        return Opener(self.thread_group(tid), inode)

    async def close_of(self, opener: Opener, tid: int, others: Mapping[int, int]) -> Close:
        """What the FLUSH by thread tid of a file opener opened is.

        others: per process, how many other writer handles of the same inode it opened are
        still open; descriptors of theirs do not keep this one from ending (two writers of
        one tag in one process each end at their own close). A closer (with its children)
        holding more than INLINE_DESCRIPTORS is scanned in a worker thread."""
        if opener.process == 0:
            return Close.UNKNOWN
        closer = tid if tid == opener.process else self.thread_group(tid)  # its main thread
        if closer == 0:
            return Close.UNKNOWN
        if closer != opener.process:
            return Close.NOT_LAST
        close = self._scan(closer, opener.inode, others, INLINE_DESCRIPTORS)
        if close is None:
            close = await trio.to_thread.run_sync(
                self._scan, closer, opener.inode, others, MAX_DESCRIPTORS
            )
        return Close.LAST if close is None else close

    def _scan(
        self, closer: int, inode: int, others: Mapping[int, int], budget: int
    ) -> Close | None:
        """Whether the closer or a child holds a descriptor for writing on inode besides
        those of its other writer handles; None if that takes reading more than budget
        descriptors."""
        for process in (closer, *self._children(closer)):
            budget -= 1  # a process costs its listing, even one without descriptors
            try:
                fds = _names(f"/proc/{process}/fdinfo", budget)
            except OSError:  # another user's, or gone: the closer's is unknown, a child's
                if process == closer:  # holds none of ours then
                    return Close.UNKNOWN
                continue
            budget -= len(fds)
            if budget < 0:
                return None
            held = self._held(process, fds, inode)
            if held is None and process == closer:
                return Close.UNKNOWN
            if held is not None and held > others.get(process, 0):
                return Close.NOT_LAST
        return Close.LAST

    def _children(self, pid: int) -> set[int]:
        """The children of process pid (of each of its threads), at most MAX_CHILDREN: a
        thread's list is read only as far as that many pids reach, and cut there."""
        found: set[int] = set()
        try:
            tasks = _names(f"/proc/{pid}/task", MAX_CHILDREN)[:MAX_CHILDREN]
        except OSError:
            return found
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children", "rb") as children:
                    listed = children.read(_CHILDREN_BYTES + 1)
            except OSError:
                continue
            pids = listed.split()
            if len(listed) > _CHILDREN_BYTES:
                pids.pop()  # perhaps cut short
            found.update(int(child) for child in pids if child.isdigit())
            if len(found) >= MAX_CHILDREN:
                return set(sorted(found)[:MAX_CHILDREN])
        return found

    def _held(self, pid: int, fds: list[str], inode: int) -> int | None:
        """How many of process pid's descriptors fds are open for writing on inode of this
        mount; None if /proc cannot say (another user's process, a process gone). A reader's
        is left out: it is no copy of a writer's, wherever it went (a reader handed to a
        child counted against the child, whose writer handles are none)."""
        wanted = b"\nino:\t%d\n" % inode
        mounts: list[int] = []
        try:
            table = os.open(f"/proc/{pid}/fdinfo", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            for fd in fds:
                try:
                    info = os.open(fd, os.O_RDONLY, dir_fd=table)
                except OSError:  # closed meanwhile
                    continue
                try:
                    text = os.read(info, 4096)
                except OSError:  # the process exited since the open (ENOENT): none held
                    continue
                finally:
                    os.close(info)
                if wanted in text and _field(text, b"flags:", 8) & os.O_ACCMODE != os.O_RDONLY:
                    mounts.append(_field(text, b"mnt_id:", 10))
        finally:
            os.close(table)
        ours = self._mount_ids
        if any(m not in ours for m in mounts):
            ours = ours | self._learn_mounts(pid, set(mounts) - ours)
            if self._device is None:
                return None
        return sum(m in ours for m in mounts)

    def _learn_mounts(self, pid: int, ids: set[int]) -> set[int]:
        """Which of ids (in process pid's mount namespace) are this mount: those of its
        device. Asked only when a descriptor's inode number is ours (a tty's may be too);
        the first _MOUNT_IDS_KEPT found are kept (a set only added to, so a scan in a
        worker thread and one on the trio thread never see it shrink), and those found
        not ours are kept per namespace for _OTHERS_LIFETIME (`_Others`): the mountinfo
        is read again only for an id not seen before, or a second later. The trio thread
        never waits for a worker's read: it reads the table without the cache instead."""
        if not self._device_looked_up:
            self._device_looked_up = True
            self._device = self._find_device()
        if self._device is None:
            return set()
        cached = self._learning.acquire(blocking=not trio.lowlevel.in_trio_run())
        try:
            return self._learn(pid, ids, cached)
        finally:
            if cached:
                self._learning.release()

    def _learn(self, pid: int, ids: set[int], cached: bool) -> set[int]:
        """`_learn_mounts`, with the cache (`_others`) used only if cached (its lock held)."""
        namespace = None
        if cached:
            try:
                ns = os.stat(f"/proc/{pid}/ns/mnt")
                namespace = (ns.st_dev, ns.st_ino)
            except OSError:
                pass  # not kept: each read again
        now = time.monotonic()
        known = self._others.get(namespace) if namespace is not None else None
        if known is not None and known.expires > now and ids <= known.ids:
            return set()
        try:
            mounts = mount_table(f"/proc/{pid}/mountinfo")
        except OSError:
            return set()
        found = set()
        for fields in mounts:  # mount id, parent id, major:minor, ...
            if len(fields) > 2 and fields[2] == self._device and fields[0].isdigit():
                found |= {int(fields[0])} & ids
        if cached and len(self._mount_ids) < _MOUNT_IDS_KEPT:
            self._mount_ids |= found
        if namespace is not None:
            for gone in [n for n, o in self._others.items() if o.expires <= now]:
                del self._others[gone]
            if namespace in self._others or len(self._others) < _NAMESPACES_KEPT:
                kept = ids - found | (known.ids if known is not None else set())
                self._others[namespace] = _Others(frozenset(kept), now + _OTHERS_LIFETIME)
        return found

    def _find_device(self) -> bytes | None:
        """This mount's device ("major:minor"), from the daemon's own mount table. The
        mountpoint's parent is resolved (mountinfo shows real paths), never the mountpoint
        itself: that would ask this daemon, which is busy asking."""
        parent, name = os.path.split(self.mountpoint)
        escaped = os.fsencode(os.path.join(os.path.realpath(parent), name))
        for char in b"\\ \t\n":  # as /proc escapes them, backslash first
            escaped = escaped.replace(bytes([char]), b"\\%03o" % char)
        try:
            mounts = mount_table("/proc/self/mountinfo")
        except OSError:
            return None
        found = None
        for fields in mounts:
            fuse = mountinfo_type(fields).startswith(b"fuse")
            if len(fields) > 4 and fields[4] == escaped and fuse:
                found = fields[2]  # the last one is on top
        if found is None:
            log.warning("flush: %r not in /proc/self/mountinfo: closes not told apart", escaped)
        return found


def _proc_is_ours() -> bool:
    """Whether /proc shows the daemon's pid namespace, in which FUSE numbers a request's
    thread: its /proc/self is then the daemon's own pid."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _names(directory: str, most: int) -> list[str]:
    """The names in a /proc directory, at most one more than most (more than most tells
    that there are more): a process may hold a million descriptors, and listing them whole
    on the trio thread stalled every request for seconds."""
    names: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            names.append(entry.name)
            if len(names) > most:
                break
    return names


def _field(fdinfo: bytes, name: bytes, base: int) -> int:
    """A descriptor's number `name` (`mnt_id:` decimal, `flags:` octal), or -1 if its fdinfo
    has none: no mount's id, and flags whose access mode is not read-only."""
    for line in fdinfo.splitlines():
        if line.startswith(name):
            field = line[len(name) :].strip()
            try:
                return int(field, base) if field.isdigit() else -1
            except ValueError:  # an 8 or 9 in octal
                return -1
    return -1
