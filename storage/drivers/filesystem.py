"""The filesystem driver: the same tree the registry's filesystem driver keeps under its root.

Small local calls (stat, a link file, a read of up to a FUSE request) run inline: a thread hop
costs more than they do. Calls that may block for long (fsync, large reads, tree deletes) go to
a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat as statmod
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import trio

from ..errors import Busy, InvalidOffset
from .base import FileInfo, FileReader, FileWriter, PathNotFound, StorageDriver

log = logging.getLogger(__name__)

INLINE_READ_LIMIT = 1 << 20
# The registry's driver creates files with 0666 and lets the umask cut it (0644 under 022).
# tempfile.mkstemp's 0600 would lock a registry running as another user (Debian's service
# runs as `docker-registry`) out of every link, startedat and hash state regfs writes.
FILE_MODE = 0o666
# How long a writer waits for another's lock before Busy. A mount's writer lets go in FUSE's
# release, which comes after close() has returned: another process (another mount) that
# opens the file at once would be refused for a few milliseconds without this wait.
LOCK_WAIT = 2.0


async def _lock(fd: int, path: str) -> None:
    """flock(LOCK_EX), polled (a blocking flock would hold a thread) for up to LOCK_WAIT."""
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


@contextmanager
def _not_found_as(path: str) -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise PathNotFound(path) from exc


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

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Writer(FileWriter):
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

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


def _create_temp(directory: str) -> tuple[int, str]:
    """Like mkstemp, but with the registry's file mode (umask applied) instead of 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, flags, FILE_MODE), tmp
        except FileExistsError:
            continue


class FilesystemDriver(StorageDriver):
    name = "filesystem"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"FilesystemDriver({self.root!r})"

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)

    def _full(self, path: str) -> str:
        return self.root + path

    def _open_file(self, path: str) -> int:
        """A descriptor of the regular file at path, for reading. Anything else (a directory,
        a FIFO, a socket, a device) is absent, as in the in-memory driver. O_NONBLOCK: a FIFO
        without a writer would block its open, and with it the whole daemon."""
        try:
            fd = os.open(self._full(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            kind = "a socket"
        else:
            mode = os.fstat(fd).st_mode
            if statmod.S_ISREG(mode):
                return fd
            os.close(fd)
            kind = "a directory" if statmod.S_ISDIR(mode) else f"of mode {mode:o}"
        log.warning("%s is %s, not a regular file: treated as absent", path, kind)
        raise PathNotFound(path)

    async def _get_content(self, path: str) -> bytes:
        with open(self._open_file(path), "rb") as f:
            return f.read()

    async def _put_content(self, path: str, data: bytes) -> None:
        await trio.to_thread.run_sync(self._put_sync, self._full(path), data)

    @staticmethod
    def _put_sync(full: str, data: bytes) -> None:
        directory = os.path.dirname(full)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = _create_temp(directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, full)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def _reader(self, path: str) -> FileReader:
        return _Reader(self._open_file(path))

    async def _writer(self, path: str) -> FileWriter:
        full = self._full(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            await _lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return _Writer(fd)

    async def _stat(self, path: str) -> FileInfo:
        try:
            st = os.stat(self._full(path))
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        return FileInfo(path, st.st_size, st.st_mtime_ns, statmod.S_ISDIR(st.st_mode))

    async def _list(self, path: str) -> list[str]:
        full = self.root if path == "/" else self._full(path)
        with _not_found_as(path):
            return sorted(os.listdir(full))

    async def _move(self, source: str, dest: str) -> None:
        full_dest = self._full(dest)
        os.makedirs(os.path.dirname(full_dest), exist_ok=True)
        with _not_found_as(source):
            os.rename(self._full(source), full_dest)

    async def _delete(self, path: str) -> None:
        full = self._full(path)
        with _not_found_as(path):
            if os.path.isdir(full) and not os.path.islink(full):
                await trio.to_thread.run_sync(shutil.rmtree, full)
            else:
                os.unlink(full)
