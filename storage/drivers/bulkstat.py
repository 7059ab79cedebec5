"""Opening names beneath a directory descriptor with no symlink followed, and nothing but a
regular file opened for its bytes (`open_regular`), and the bulk calls built on it: the
stat of a listing's links and the blobs they name (`linked_stats`), the read of small files
such as tags' links (`contents`), which children of a namespace hold `_layers` (`present`:
stated, never opened) or are empty directories (`empty`); this file run as a script is the
stat worker process that runs them beside the daemon (`statworker.StatWorker`).

The standard library only, and nothing of the package: the worker starts in a few
milliseconds (`python -I -S` of this file), not the ~0.3 s that importing trio costs, and it
runs the very code the filesystem driver runs in process (storage/drivers/filesystem.py
imports it from here).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import marshal
import os
import signal
import socket
import stat as statmod
import sys
from array import array
from collections.abc import Callable, Sequence

O_BENEATH = os.O_NOFOLLOW | os.O_CLOEXEC  # added to every open below the root
# A directory of one component opened to resolve names beneath it: a symlink there fails
# (ENOTDIR: O_DIRECTORY sees the link itself), and a name is never `..` (storage paths).
DIRECTORY = os.O_PATH | os.O_DIRECTORY | O_BENEATH
_SYS_OPENAT2 = 437  # the same on x86_64 and aarch64 (every architecture's table since 5.6)
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
# A request to the worker holds at most this many entries and its reply fits in REPLY_LIMIT
# (a SOCK_SEQPACKET message is one send, at most the socket's send buffer, ~208 KiB: ~230
# bytes an entry asked, ~26 answered by `linked_stats`, up to 182 by `contents`).
REQUEST_ENTRIES = 512
REQUEST_LIMIT = 1 << 18
REPLY_LIMIT = 1 << 17
READY = b"ready"
_PR_SET_PDEATHSIG = 1
# How a regular file found by `open_regular` is opened for its bytes (the O_NONBLOCK and
# O_NOCTTY only matter where /proc is missing: `_reopen`'s second open by name).
READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

Resolve = Callable[[int, str, int, int], int]
Stat = tuple[int, int] | None  # size and mtime_ns of a regular file, or None
Content = tuple[bytes, int] | None  # the bytes and mtime_ns of a small regular file, or None
# What the worker reads of a file at most (`contents`): a tag's link is 71 bytes (sha256;
# sha512's 135), and a reply of REQUEST_ENTRIES files this big (~93 KB marshalled) must fit
# REPLY_LIMIT; a bigger file is None there, never read (the caller asks it alone).
WORKER_CONTENT = 160


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# The open_how goes by address (c_void_p) and the path as bytes: ctypes converts neither,
# a third of the call's cost when a listing opens 10,000 links.
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
]


_HOW_SIZE = ctypes.sizeof(_OpenHow)
_HOWS: list[_OpenHow] = []  # every open_how built, alive as long as its address is used


@functools.cache
def _how(flags: int, mode: int) -> int:
    """The address of the open_how of these flags, built once: a stat per tag listed must
    stay cheap."""
    _HOWS.append(_OpenHow(flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS))
    return ctypes.addressof(_HOWS[-1])


def openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    """openat2(2), which Python 3.11 lacks: no symlink, no `..` and no absolute path leads
    out of dirfd (ELOOP for a symlink anywhere on the path). Storage paths are ASCII
    (base._PATH_RE), so str.encode is their fsencode."""
    fd: int = _syscall(_SYS_OPENAT2, dirfd, path.encode(), _how(flags, mode), _HOW_SIZE)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def walk_open(dirfd: int, path: str, flags: int, mode: int) -> int:
    """openat2's job without it: one O_NOFOLLOW directory open per component. A symlink on
    the way fails with ENOTDIR (O_DIRECTORY sees the link), the last one with ELOOP."""
    *parents, leaf = path.split("/")
    fd = dirfd
    try:
        for name in parents:
            child = os.open(name, DIRECTORY, dir_fd=fd)
            if fd != dirfd:
                os.close(fd)
            fd = child
        return os.open(leaf, flags, mode, dir_fd=fd)
    finally:
        if fd != dirfd:
            os.close(fd)


def _open_fds() -> int:
    """A descriptor (O_PATH) of this process's /proc/self/fd; -1 without /proc."""
    try:
        return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1


# Opened once, as the module is imported (no two threads race to open it).
_FDS = [_open_fds()]


def _fds_in_child() -> None:
    """A fork's child: the descriptor it inherited names its parent's /proc/<pid>/fd."""
    if _FDS[0] >= 0:
        os.close(_FDS[0])
    _FDS[0] = _open_fds()


os.register_at_fork(after_in_child=_fds_in_child)


def _reopen(
    held: int, flags: int, resolve: Resolve, dirfd: int, path: str, st: os.stat_result
) -> int:
    """The regular file the O_PATH descriptor held names, opened for flags through
    /proc/self/fd/<held>: the very inode fstat saw, never its name looked up again, so a
    name swapped meanwhile (for a FIFO, a device) is not what opens. Without /proc, the name
    is opened again (O_NONBLOCK, O_NOCTTY) and kept only if it is still that inode: a device
    swapped in between the two opens (its mknod needs CAP_MKNOD), or a FIFO (mkfifo needs
    nothing), would then be opened."""
    fds = _FDS[0]
    if fds >= 0:
        return os.open(str(held), flags | os.O_CLOEXEC, dir_fd=fds)
    fd = resolve(dirfd, path, flags | os.O_NONBLOCK | os.O_NOCTTY | O_BENEATH, 0)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
        return fd
    os.close(fd)
    raise OSError(errno.ESTALE, "replaced while it was opened", path)


def open_regular(
    resolve: Resolve, dirfd: int, path: str, flags: int, limit: int | None = None
) -> tuple[int, os.stat_result]:
    """path beneath dirfd (`resolve`) opened for flags if it is a regular file (of at most
    limit bytes), and its stat; (-1, its stat) if it is anything else: a FIFO, a socket, a
    device, a directory, a symlink (O_PATH|O_NOFOLLOW holds the link itself). First opened
    O_PATH, which opens nothing (no FIFO waits for a writer, no device's driver runs: a
    tape rewinds, a terminal becomes the caller's), then fstat, then only a regular file
    is opened for its bytes (`_reopen`). OSError as the open's."""
    held = resolve(dirfd, path, os.O_PATH | O_BENEATH, 0)
    try:
        st = os.fstat(held)
        if not statmod.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
            return -1, st
        return _reopen(held, flags, resolve, dirfd, path, st), st
    finally:
        os.close(held)


class Parents:
    """The descriptor of one directory below `base`, kept while the names a bulk call resolves
    share it: sorted names of a listing's blobs (`<xx>/<hex>/data`) open each fan-out
    directory `<xx>` once for its ~40 blobs (`resolve`: openat2, or the walk without it)."""

    def __init__(self, base: int, resolve: Resolve) -> None:
        self.base = base
        self._resolve = resolve
        self._path = ""
        self._fd = base

    def of(self, path: str) -> int:
        """The descriptor of the directory `path` (relative, "" for base) below base."""
        if path != self._path:
            self.close()
            if path:
                self._fd = self._resolve(self.base, path, DIRECTORY, 0)
                self._path = path
        return self._fd

    def close(self) -> None:
        if self._path:
            os.close(self._fd)
            self._path, self._fd = "", self.base


def _lstat_at(parents: Parents, name: str) -> os.stat_result:
    """The lstat of name (`<xx>/<hex>/data`, `<repository>/_layers`) below parents.base: of
    its last component in its own directory, opened (O_PATH, O_NOFOLLOW, one component) from
    the kept descriptor of the one above, so no path of two components goes to a call that
    would follow a link on its way, and nothing stated is ever opened (a FIFO, a device)."""
    head, _, leaf = name.rpartition("/")
    up, _, below = head.rpartition("/")
    if not below:  # a name of one component
        return os.stat(leaf, dir_fd=parents.base, follow_symlinks=False)
    fd = os.open(below, DIRECTORY, dir_fd=parents.of(up))
    try:
        return os.stat(leaf, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def _stat_at(parents: Parents, name: str) -> Stat:
    """Size and mtime_ns of the regular file at name below parents.base (`_lstat_at`), None
    if it is anything else (a directory, a symlink: lstat's own mode, a FIFO)."""
    st = _lstat_at(parents, name)
    return (st.st_size, st.st_mtime_ns) if statmod.S_ISREG(st.st_mode) else None


def linked_stats(
    resolve: Resolve, links: int, files: int, link_names: Sequence[str],
    targets: Sequence[bytes], file_names: Sequence[str],
) -> list[Stat]:  # fmt: skip
    """Each link beneath the descriptor `links` (`resolve`: openat2, or the walk) read if it
    is a regular file of just its target's size (`open_regular`: nothing else is opened)
    and compared with its target; then the file beneath `files` (`_stat_at`). None for
    each entry that is anything else, or fails."""
    found: list[Stat] = []
    parents = Parents(files, resolve)
    try:
        for link, target, name in zip(link_names, targets, file_names, strict=True):
            try:
                fd, st = open_regular(resolve, links, link, READ, len(target))
                if fd < 0 or st.st_size != len(target):
                    if fd >= 0:
                        os.close(fd)
                    found.append(None)
                    continue
                try:
                    read = os.pread(fd, len(target) + 1, 0)
                finally:
                    os.close(fd)
                found.append(_stat_at(parents, name) if read == target else None)
            except OSError:
                found.append(None)
    finally:
        parents.close()
    return found


def contents(resolve: Resolve, dirfd: int, names: Sequence[str], limit: int) -> list[Content]:
    """The whole of each small regular file beneath the descriptor dirfd (`resolve`: openat2,
    or the walk), read by its size, and its mtime_ns: None for one that is anything else
    (never opened: `open_regular`), over limit bytes, of a size that moved meanwhile, or
    fails."""
    found: list[Content] = []
    for name in names:
        try:
            fd, st = open_regular(resolve, dirfd, name, READ, limit)
            if fd < 0:
                found.append(None)
                continue
            try:
                data = os.read(fd, st.st_size + 1)
            finally:
                os.close(fd)
            found.append((data, st.st_mtime_ns) if len(data) == st.st_size else None)
        except OSError:
            found.append(None)
    return found


def present(resolve: Resolve, dirfd: int, names: Sequence[str]) -> list[bool]:
    """Whether each name is there beneath the descriptor dirfd, and no symbolic link, with
    none followed on its way (`_lstat_at`: the directories above it opened O_PATH by
    `resolve`, openat2 or the walk, the name itself only stated): the children of a namespace
    that hold `_layers` (`Catalog.children`). False for anything absent or failing."""
    found: list[bool] = []
    parents = Parents(dirfd, resolve)
    try:
        for name in names:
            try:
                found.append(not statmod.S_ISLNK(_lstat_at(parents, name).st_mode))
            except OSError:
                found.append(False)
    finally:
        parents.close()
    return found


def empty(resolve: Resolve, dirfd: int, names: Sequence[str]) -> list[bool]:
    """Whether each name beneath the descriptor dirfd is a directory that holds nothing,
    with no symbolic link followed: the directory above it opened O_PATH (`resolve`), the
    name itself O_DIRECTORY|O_NOFOLLOW from there, so nothing but a directory is ever
    opened (a FIFO or a device fails that open before it is opened), and its first entry
    read. The children of a namespace that the registry's deletes left empty
    (`Catalog.children`). False for anything else, or failing."""
    flags = os.O_RDONLY | os.O_DIRECTORY | O_BENEATH
    found: list[bool] = []
    parents = Parents(dirfd, resolve)
    try:
        for name in names:
            up, _, leaf = name.rpartition("/")
            try:
                fd = os.open(leaf, flags, dir_fd=parents.of(up))
                try:
                    with os.scandir(fd) as entries:
                        found.append(next(entries, None) is None)
                finally:
                    os.close(fd)
            except OSError:
                found.append(False)
    finally:
        parents.close()
    return found


# The checks of names beneath one directory the worker runs, by the name a request gives.
CHECKS: dict[str, Callable[[Resolve, int, Sequence[str]], list[bool]]] = {
    "present": present,
    "empty": empty,
}


def serve(sock: socket.socket) -> None:
    """The worker's loop: each request is one message, the descriptors of the directories
    (opened by the driver, as it opens them) and, marshalled, whether to resolve with openat2
    and the names: of links and files beneath two (`linked_stats`), of files beneath one
    and a limit (`contents`), or of names beneath one and which of CHECKS (`present`,
    `empty`); the reply is the list it returns.
    Returns when the daemon's end closes (it exited, was killed, or gave this worker up
    with a reply unread: a reset, not an error); anything unexpected ends the worker, and
    the daemon answers EIO for the listings waiting for it."""
    fd_size = array("i").itemsize
    while True:
        try:
            data, ancillary, flags, _ = sock.recvmsg(REQUEST_LIMIT, socket.CMSG_SPACE(2 * fd_size))
        except ConnectionResetError:
            return
        fds = array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
        try:
            if not data:
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("a request cut short")
            use_openat2, *asked = marshal.loads(data)
            resolve = openat2 if use_openat2 else walk_open
            found: list[Stat] | list[Content] | list[bool]
            if len(fds) == 2 and len(asked) == 3:
                found = linked_stats(resolve, fds[0], fds[1], *asked)
            elif len(fds) == 1 and len(asked) == 2 and asked[1] in CHECKS:
                found = CHECKS[asked[1]](resolve, fds[0], asked[0])
            elif len(fds) == 1 and len(asked) == 2:
                found = contents(resolve, fds[0], *asked)
            else:
                raise ValueError(f"a request of {len(asked)} parts with {len(fds)} descriptors")
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.send(marshal.dumps(found))
        except (BrokenPipeError, ConnectionResetError):
            return


def main(argv: list[str]) -> int:
    """`bulkstat.py FD PARENT`: serve the daemon (pid PARENT) on the socket FD. The kernel
    kills the worker when the thread that started it ends (PR_SET_PDEATHSIG: that thread
    waits for the worker as long as the daemon lives), and it ends when the daemon's end of
    the socket closes; a daemon gone before the signal was asked for is seen as a new parent."""
    sock = socket.socket(fileno=int(argv[1]))
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return 1
    if os.getppid() != int(argv[2]):
        return 1
    sock.send(READY)
    serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
