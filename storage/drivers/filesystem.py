"""The filesystem driver: the same tree the registry's filesystem driver keeps under its root.

No path below the root is resolved through a symbolic link: whoever can write the root (a
registry run by another user, a shared volume) must not steer the daemon, usually root, to
read, write or delete anything outside it. The root is opened once; every call opens its path
from that descriptor with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) or, where the kernel
(or a seccomp filter) lacks openat2, by a walk of one O_NOFOLLOW open per component. The bulk
reads of a listing open its directories so; `contents` then opens each name beneath that
descriptor the same way, and `linked_stats` reads each link so, keeps the descriptor of a
blob's fan-out directory (opened so) for the sorted names that share it, opens each blob's
own directory from it (O_NOFOLLOW, one component) and lstats `data` in that: an lstat
(AT_SYMLINK_NOFOLLOW) refuses only a last link, so it never gets a path of two
components. A symlink met anywhere is UnsafeEntry for that entry (EIO through the mount,
logged); listings leave symlinks out, so the rest of a directory stays reachable; trees are
removed through directory descriptors, which never follow a link.

Small local calls (stat, a link file, a read of up to a FUSE request) run inline: a thread hop
costs more than they do. Calls that may block for long (fsync, large reads, tree deletes, the
bulk reads of a big listing) go to a worker thread; a big listing's `linked_stats` goes to the
stat worker process once it runs (statworker.py: the same code, bulkstat.py, on descriptors
opened here).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat as statmod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TypeVar

import trio

from ..errors import Busy, CorruptEntry, InvalidOffset, UnsafeEntry
from ..nurseries import open_nursery
from .base import (
    CONTENT_LIMIT,
    FileInfo,
    FileReader,
    FileWriter,
    PathNotFound,
    StorageDriver,
    join,
)
from .bulkstat import CHECKS, contents, linked_stats, open_regular
from .bulkstat import DIRECTORY as _DIRECTORY
from .bulkstat import O_BENEATH as _O_BENEATH
from .bulkstat import READ as _READ
from .bulkstat import openat2 as _openat2
from .bulkstat import walk_open as _walk_open
from .removal import remove_tree
from .statworker import StatWorker

log = logging.getLogger(__name__)
T = TypeVar("T")

INLINE_READ_LIMIT = 1 << 20
# Bulk reads (`contents`, `linked_stats`) of more entries than this go to a worker thread (or
# the stat worker process): one hop, where a listing of 10,000 links would hold the event loop
# for tens of milliseconds.
INLINE_ENTRIES = 64
# The registry's driver creates files with 0666 and lets the umask cut it (0644 under 022).
# tempfile.mkstemp's 0600 would lock a registry running as another user (Debian's service
# runs as `docker-registry`) out of every link, startedat and hash state regfs writes.
FILE_MODE = 0o666
DIR_MODE = 0o777
# Walks of _makedirs: a directory on the way removed meanwhile by another mount is made again.
_MAKEDIRS_TRIES = 3
# A writer's lock file: writable as the data file is (after the umask), readable by nobody
# else, so only a user who could write the data anyway can open it to take the lock.
LOCK_MODE = 0o622
LOCK_SUFFIX = ".regfs-lock"
# How long a writer waits for another's lock before Busy. A mount's writer lets go in FUSE's
# release, which comes after close() has returned: another process (another mount) that
# opens the file at once would be refused for a few milliseconds without this wait.
LOCK_WAIT = 2.0

# Tries of `_open_or_create` while its name comes and goes between its open and its create.
_CREATE_TRIES = 3

_openat2_works: bool | None = None


def _kind(mode: int) -> str:
    """What a file of this mode is, for a log line."""
    for test, kind in (
        (statmod.S_ISDIR, "a directory"), (statmod.S_ISFIFO, "a FIFO"),
        (statmod.S_ISSOCK, "a socket"), (statmod.S_ISCHR, "a character device"),
        (statmod.S_ISBLK, "a block device"), (statmod.S_ISLNK, "a symbolic link"),
    ):  # fmt: skip
        if test(mode):
            return kind
    return f"of mode {mode:o}"


def _openat2_usable(dirfd: int) -> bool:
    """Whether openat2 works here (Linux 5.6+, no seccomp filter refusing it); asked once."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2(dirfd, ".", os.O_PATH | os.O_CLOEXEC, 0))
            _openat2_works = True
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            log.info("openat2 unavailable (%s): paths are walked a component at a time", exc)
            _openat2_works = False
    return _openat2_works


async def flock_polled(fd: int, path: str) -> None:
    """flock(LOCK_EX), polled (a blocking flock would hold a thread, or the trio loop) for
    up to LOCK_WAIT, then Busy; the remote source's upload records take theirs so too."""
    deadline = trio.current_time() + LOCK_WAIT
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if trio.current_time() >= deadline:
                raise Busy(f"{path} is being written by another writer") from None
        await trio.sleep(delay)
        delay = min(delay * 2, 0.1)


class _Reader(FileReader):
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

    async def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0:
            raise InvalidOffset(f"negative offset {offset}")
        if length <= INLINE_READ_LIMIT:
            return os.pread(self._fd, length, offset)
        return await trio.to_thread.run_sync(os.pread, self._fd, length, offset)

    def fileno(self) -> int | None:
        return self._fd if self._fd >= 0 else None

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Writer(FileWriter):
    def __init__(self, fd: int, lock: int, size: int) -> None:
        self._fd = fd
        self._lock = lock
        self.size = size

    def write_at_blocking(self, offset: int, data: bytes) -> None:
        if not 0 <= offset <= self.size:
            raise InvalidOffset(f"write at {offset} would leave a gap after {self.size}")
        view = memoryview(data)
        pos = offset
        while view:
            done = os.pwrite(self._fd, view, pos)
            view, pos = view[done:], pos + done
        self.size = max(self.size, pos)

    async def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self.size = size

    def sync_blocking(self) -> None:
        os.fdatasync(self._fd)

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            os.close(self._lock)


def _create_temp(dirfd: int) -> tuple[int, str]:
    """Like mkstemp in dirfd, but with the registry's file mode (umask applied), not 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BENEATH
    while True:
        tmp = f".tmp-{secrets.token_hex(8)}"
        try:
            return os.open(tmp, flags, FILE_MODE, dir_fd=dirfd), tmp
        except FileExistsError:
            continue


class FilesystemDriver(StorageDriver):
    name = "filesystem"
    keeps_symlinks = True

    def __init__(self, root: str | os.PathLike[str], openat2: bool = True) -> None:
        """openat2=False walks paths component by component even where openat2 works (the
        fallback, for tests)."""
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        # The root itself is the operator's choice: a symlink naming it is followed, once.
        self._fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        use = openat2 and _openat2_usable(self._fd)
        self._resolve: Callable[[int, str, int, int], int] = _openat2 if use else _walk_open
        self._stat_worker = StatWorker()

    def __del__(self) -> None:
        with suppress(AttributeError, OSError):
            os.close(self._fd)
        with suppress(AttributeError):
            self._stat_worker.close()

    def __repr__(self) -> str:
        return f"FilesystemDriver({self.root!r})"

    def start_workers(self) -> None:
        """The stat worker, started now, not at the first big listing: a fresh mount's first
        `ls -l` finds it ready, rather than stating its first chunks in threads that hold the
        GIL against the loop while the worker starts (10-45 ms)."""
        self._stat_worker.start()

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self._fd)

    # -- resolving beneath the root ------------------------------------------------------

    def _refusal(self, exc: OSError, path: str) -> Exception:
        """What an OSError met on path means: a symlink on it (ELOOP, or ENOTDIR where
        O_DIRECTORY met the link) is UnsafeEntry, an absent one PathNotFound, anything else
        itself. Paths hold no `..`, so RESOLVE_BENEATH's EXDEV cannot happen here."""
        code = exc.errno
        if code == errno.ELOOP or (code == errno.ENOTDIR and self._linked(path)):
            log.error("%r: a symbolic link in the storage root, never followed: refused", path)
            return UnsafeEntry(path, "a symbolic link (or one on its way), never followed")
        if code in (errno.ENOENT, errno.ENOTDIR):
            return PathNotFound(path)
        return exc

    @contextmanager
    def _beneath(self, path: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise self._refusal(exc, path) from None

    def _linked(self, path: str) -> bool:
        """Whether a component of path is a symlink. Only after an ENOTDIR (a symlink and a
        file look alike to O_DIRECTORY): lstat of each prefix in turn reads no link's target."""
        parts = path.strip("/").split("/")
        for end in range(1, len(parts) + 1):
            try:
                st = os.stat("/".join(parts[:end]), dir_fd=self._fd, follow_symlinks=False)
            except OSError:
                return False
            if not statmod.S_ISDIR(st.st_mode):
                return statmod.S_ISLNK(st.st_mode)
        return False

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        """A descriptor of path, opened beneath the root with no symlink followed."""
        try:  # not `with self._beneath(…)`: this runs for every stat, and a generator costs
            return self._resolve(self._fd, path[1:] or ".", flags | _O_BENEATH, mode)
        except OSError as exc:
            raise self._refusal(exc, path) from None

    def _parent(self, path: str, create: bool = False) -> tuple[int, str]:
        """A descriptor (O_PATH) of path's directory, made first when create, and its name."""
        head, _, leaf = path.rpartition("/")
        try:
            return self._open(head or "/", os.O_PATH | os.O_DIRECTORY), leaf
        except PathNotFound:
            if not create:
                raise
        return self._makedirs(head), leaf

    def _makedirs(self, path: str) -> int:
        """os.makedirs beneath the root: each directory made and opened in the one before.
        One removed after its open (ENOENT: another mount's cancel rmdirs an emptied
        `_uploads/` and its repository) makes the walk again, a few times: no `rm` asked."""
        with self._beneath(path):
            for _ in range(_MAKEDIRS_TRIES - 1):
                try:
                    return self._make_each(path)
                except FileNotFoundError:
                    log.info("%r: a directory on the way was removed meanwhile: again", path)
            return self._make_each(path)

    def _make_each(self, path: str) -> int:
        """One walk of _makedirs; an OSError is raised as it is."""
        fd = os.dup(self._fd)
        try:
            for name in path.strip("/").split("/"):
                with suppress(FileExistsError):
                    os.mkdir(name, DIR_MODE, dir_fd=fd)
                child = os.open(name, _DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- the driver's calls --------------------------------------------------------------

    def _open_file(self, path: str) -> int:
        """A descriptor of the regular file at path, for reading. Anything else (a directory,
        a FIFO, a socket, a device) is absent, as in the in-memory driver, and never opened
        (`open_regular`: an O_PATH open, fstat, then only a regular file opened to read; an
        open of a FIFO waits for a writer, a device's runs its driver)."""
        try:
            fd, st = open_regular(self._resolve, self._fd, path[1:] or ".", _READ)
        except OSError as exc:
            raise self._refusal(exc, path) from None
        if fd >= 0:
            return fd
        if statmod.S_ISLNK(st.st_mode):
            raise self._refusal(OSError(errno.ELOOP, "a symbolic link"), path)
        log.warning("%r is %s, not a regular file: treated as absent", path, _kind(st.st_mode))
        raise PathNotFound(path)

    def _open_or_create(self, parent: int, leaf: str, path: str, flags: int, mode: int) -> int:
        """leaf in the directory parent opened for flags, made (O_EXCL, mode) where there is
        none. One found is opened only if it is a regular file (`open_regular`): anything
        else is CorruptEntry, never opened (a device's open runs its driver, a terminal's
        makes it the daemon's), a symlink UnsafeEntry."""
        for _ in range(_CREATE_TRIES):
            with self._beneath(path):
                try:
                    fd, st = open_regular(_walk_open, parent, leaf, flags)
                except FileNotFoundError:
                    try:
                        made = flags | os.O_CREAT | os.O_EXCL | _O_BENEATH
                        return os.open(leaf, made, mode, dir_fd=parent)
                    except FileExistsError:  # made meanwhile: opened as any found
                        continue
            if fd >= 0:
                return fd
            if statmod.S_ISLNK(st.st_mode):
                raise self._refusal(OSError(errno.ELOOP, "a symbolic link"), path)
            log.error("%r is %s, not a regular file: not opened", path, _kind(st.st_mode))
            raise CorruptEntry(path, f"{_kind(st.st_mode)}, not a regular file")
        raise CorruptEntry(path, f"came and went {_CREATE_TRIES} times while it was opened")

    async def _get_content(self, path: str, limit: int) -> bytes:
        with open(self._open_file(path), "rb") as f:
            return f.read(limit)

    async def _put_content(self, path: str, data: bytes) -> None:
        await trio.to_thread.run_sync(self._put_sync, path, data)

    def _put_sync(self, path: str, data: bytes) -> None:
        """Write a temp file beside path and rename it over path (a symlink there is replaced,
        never followed: rename(2) acts on the name)."""
        parent, leaf = self._parent(path, create=True)
        try:
            fd, tmp = _create_temp(parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                with self._beneath(path):
                    os.replace(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
                raise
        finally:
            os.close(parent)

    async def _reader(self, path: str) -> FileReader:
        return _Reader(self._open_file(path))

    async def _writer(self, path: str) -> FileWriter:
        parent, leaf = self._parent(path, create=True)
        try:
            fd = self._open_or_create(parent, leaf, path, os.O_RDWR, FILE_MODE)
            try:
                st = os.fstat(fd)
                if not statmod.S_ISREG(st.st_mode):
                    raise CorruptEntry(path, f"of mode {st.st_mode:o}, not a regular file")
                # A second name of the file could be anywhere on the same filesystem, outside
                # the root too: writing through it would change a file nobody meant. The
                # registry never makes hard links (and protected_hardlinks limits who can).
                if st.st_nlink > 1:
                    log.error("%r has %d hard links: not written through", path, st.st_nlink)
                    raise UnsafeEntry(path, f"{st.st_nlink} hard links: not written through")
                lock = await self._lock(parent, leaf, path)
            except BaseException:
                os.close(fd)
                raise
        finally:
            os.close(parent)
        return _Writer(fd, lock, st.st_size)

    async def _lock(self, parent: int, leaf: str, path: str) -> int:
        """The writer's exclusive flock, on `<name>.regfs-lock` beside the file.

        Not on the file itself: anyone who can read a file can flock it, and would keep its
        writer out (Busy). The lock file is opened write-only and made unreadable by others
        (LOCK_MODE), so only a user who could write the data can take it. It stays, and goes
        with its directory: removing it on close would let two writers lock two files of the
        same name. flock dies with its process, and the registry, which never locks, never
        sees it. A lock file found is used as it is: only someone who can write the
        directory could have made it, and they could remove the whole upload anyway.
        """
        fd = self._open_or_create(
            parent, leaf + LOCK_SUFFIX, path + LOCK_SUFFIX, os.O_WRONLY, LOCK_MODE
        )
        try:
            await flock_polled(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _being_written(self, path: str) -> bool:
        """Whether the flock of `<name>.regfs-lock` (`_lock`) is held: taken and let go at
        once if it is free (a writer opening meanwhile waits LOCK_WAIT for it)."""
        try:
            parent, leaf = self._parent(path)
        except (PathNotFound, UnsafeEntry):  # a planted link leads to no lock of ours
            return False
        try:
            with self._beneath(path + LOCK_SUFFIX):
                fd, _ = open_regular(_walk_open, parent, leaf + LOCK_SUFFIX, os.O_WRONLY)
        except (PathNotFound, UnsafeEntry):  # no lock
            return False
        finally:
            os.close(parent)
        if fd < 0:  # a planted link, FIFO or device is no lock of ours, and never opened
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # and the lock with it, if it was free
        return False

    async def _stat(self, path: str) -> FileInfo:
        fd = self._open(path, os.O_PATH)  # O_PATH|O_NOFOLLOW: a last symlink is opened as such
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if statmod.S_ISLNK(st.st_mode):
            raise self._refusal(OSError(errno.ELOOP, "a symbolic link"), path)
        return FileInfo(path, st.st_size, st.st_mtime_ns, statmod.S_ISDIR(st.st_mode))

    async def _contents(
        self, directory: str, names: list[str]
    ) -> list[tuple[bytes, int] | None] | None:
        """`bulkstat.contents` beneath the directory: many go to the stat worker process
        (files of WORKER_CONTENT bytes at most there: a tag's link), as `_linked_stats`."""
        resolve = self._resolve

        def run(fds: list[int]) -> list[tuple[bytes, int] | None]:
            return contents(resolve, fds[0], names, CONTENT_LIMIT)

        async def elsewhere(fds: list[int]) -> list[tuple[bytes, int] | None] | None:
            return await self._stat_worker.contents(fds[0], resolve is not _walk_open, names)

        return await self._bulk((directory,), len(names), run, elsewhere)

    async def _linked_stats(
        self, links: str, link_names: list[str], targets: Sequence[bytes], files: str,
        file_names: list[str],
    ) -> list[tuple[int, int] | None] | None:  # fmt: skip
        """`bulkstat.linked_stats` beneath the two directories: many go to the stat worker
        process (started by the first such call; in a thread until it is ready)."""
        resolve = self._resolve

        def run(fds: list[int]) -> list[tuple[int, int] | None]:
            return linked_stats(resolve, fds[0], fds[1], link_names, targets, file_names)

        async def elsewhere(fds: list[int]) -> list[tuple[int, int] | None] | None:
            return await self._stat_worker.linked_stats(
                fds[0], fds[1], resolve is not _walk_open, link_names, targets, file_names
            )

        return await self._bulk((links, files), len(link_names), run, elsewhere)

    async def _present(self, directory: str, names: list[str]) -> list[bool]:
        """`bulkstat.present` beneath the directory: an lstat of each name, none opened
        (`_on_both_cores`)."""
        return await self._on_both_cores(directory, names, "present")

    async def _empty(self, directory: str, names: list[str]) -> list[bool]:
        """`bulkstat.empty` beneath the directory: only directories opened (`_on_both_cores`)."""
        return await self._on_both_cores(directory, names, "empty")

    async def _on_both_cores(self, directory: str, names: list[str], which: str) -> list[bool]:
        """`bulkstat.CHECKS[which]` of the names beneath the directory; many are split: the
        stat worker process takes the later half while a worker thread takes the first, so
        both cores work on a namespace's listing (~3 µs a name on each); the thread takes
        them all when no worker is ready, or the worker was given up or failed meanwhile (a
        check only reads: unlike a listing's stats, no EIO where a thread can answer)."""
        check = CHECKS[which]
        resolve = self._resolve

        def run(fds: list[int], part: Sequence[str] = names) -> list[bool | None]:
            return [*check(resolve, fds[0], part)]

        async def split(fds: list[int]) -> list[bool | None] | None:
            if not self._stat_worker.ready:
                return None  # `_ask` would start one; a thread takes them all meanwhile
            cut = len(names) // 2
            later: list[bool | None] | None = None

            async def worker_part() -> None:
                nonlocal later
                try:
                    answer = await self._stat_worker.check(
                        which, fds[0], resolve is not _walk_open, names[cut:]
                    )
                except CorruptEntry:  # it failed meanwhile (logged): the thread's, as below
                    return
                later = None if answer is None else [*answer]

            async with open_nursery() as nursery:  # an error comes out as itself
                nursery.start_soon(worker_part)
                first = await trio.to_thread.run_sync(run, fds, names[:cut])
            if later is None:  # the worker was given up, or failed, meanwhile
                later = await trio.to_thread.run_sync(run, fds, names[cut:])
            return [*first, *later]

        return [bool(yes) for yes in await self._bulk((directory,), len(names), run, split)]

    async def _bulk(
        self, directories: tuple[str, ...], count: int, run: Callable[[list[int]], list[T | None]],
        elsewhere: Callable[[list[int]], Awaitable[list[T | None] | None]] | None = None,
    ) -> list[T | None]:  # fmt: skip
        """run(a descriptor of each directory, opened as `_open` opens: no symlink followed)
        for `count` names resolved beneath them, in one worker thread call for many (or
        `elsewhere` for many, unless it answers None).
        Whatever fails is None: the caller asks the path alone, which says why (and logs a
        symlink); all are None where a directory is not there plainly."""
        fds: list[int] = []
        try:
            try:
                for directory in directories:
                    fds.append(self._open(directory, os.O_PATH | os.O_DIRECTORY))
            except (PathNotFound, CorruptEntry):
                return [None] * count
            if count <= INLINE_ENTRIES:
                return run(fds)
            if elsewhere is not None and (found := await elsewhere(fds)) is not None:
                return found
            return await trio.to_thread.run_sync(run, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _scan(
        self, path: str, stat: bool = False
    ) -> tuple[dict[str, os.stat_result | None], list[str]]:
        """A directory's entries that are no symlink (each with its lstat, taken through the
        directory's descriptor, when `stat`), and the sorted names of those that are."""
        found: dict[str, os.stat_result | None] = {}
        links: list[str] = []
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False) if stat else None
                    except FileNotFoundError:
                        continue  # deleted since the directory was read
                    if entry.is_symlink() or (st is not None and statmod.S_ISLNK(st.st_mode)):
                        links.append(entry.name)
                    else:
                        found[entry.name] = st
        finally:
            os.close(fd)
        return found, sorted(links)

    def _listed(self, path: str, stat: bool = False) -> dict[str, os.stat_result | None]:
        found, links = self._scan(path, stat)
        for name in links:
            log.warning("%r: a symbolic link in the storage root: not listed", f"{path}/{name}")
        return found

    async def _list(self, path: str) -> list[str]:
        """The names alone (os.listdir: no object per entry) where the link count says each is
        a directory (ext4, XFS and tmpfs count two and one per subdirectory: a tags/ or
        repositories/ directory), so none is a symlink; else, or where the count is no guide
        (btrfs: 1; ext4 past 65,000 subdirectories: 1), `_scan`'s. The count is taken before
        and after the names and must not move: a directory made meanwhile, counted after but
        not listed, would make a symlink's name look like its own."""
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = os.fstat(fd).st_nlink
            names = os.listdir(fd)
            only_directories = os.fstat(fd).st_nlink == before == len(names) + 2
        finally:
            os.close(fd)
        if only_directories:
            names.sort()
            return names
        return sorted(self._listed(path))

    async def _entries(self, path: str) -> list[FileInfo]:
        """One scandir, each entry's lstat with it: no path resolved per entry."""
        found = self._listed(path, stat=True)
        return [
            FileInfo(join(path, name), st.st_size, st.st_mtime_ns, statmod.S_ISDIR(st.st_mode))
            for name, st in sorted(found.items())
            if st is not None
        ]

    async def _symlinks(self, path: str) -> list[str]:
        return self._scan(path)[1]

    async def _move(self, source: str, dest: str) -> None:
        src_parent, src_leaf = self._parent(source)
        try:
            with self._beneath(source):
                mode = os.stat(src_leaf, dir_fd=src_parent, follow_symlinks=False).st_mode
            if statmod.S_ISLNK(mode):
                raise self._refusal(OSError(errno.ELOOP, "a symbolic link"), source)
            dst_parent, dst_leaf = self._parent(dest, create=True)
            try:
                with self._beneath(source):
                    os.rename(src_leaf, dst_leaf, src_dir_fd=src_parent, dst_dir_fd=dst_parent)
            finally:
                os.close(dst_parent)
        finally:
            os.close(src_parent)

    async def _delete(self, path: str) -> None:
        """Remove the name at path; a symlink is unlinked, never followed, and a tree is
        removed through directory descriptors, opening no link (`removal.remove_tree`)."""
        parent, leaf = self._parent(path)
        try:
            with self._beneath(path):
                mode = os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode
                if statmod.S_ISDIR(mode):
                    await trio.to_thread.run_sync(remove_tree, leaf, parent)
                else:
                    os.unlink(leaf, dir_fd=parent)
        finally:
            os.close(parent)

    async def _remove_empty(self, path: str) -> bool:
        try:
            parent, leaf = self._parent(path)
        except PathNotFound:
            return False
        try:
            os.rmdir(leaf, dir_fd=parent)  # a symlink is ENOTDIR, never followed
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                return False
            raise self._refusal(exc, path) from None
        finally:
            os.close(parent)
        return True
