"""The storage-driver interface: the few primitives every store is built from.

Public methods check every path before a driver sees it, so no driver can be asked for a path
outside its tree; drivers implement the underscored methods.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import trio

from ..errors import CorruptEntry, InvalidPath, StorageError

log = logging.getLogger(__name__)

# Absolute, slash-separated, no empty, "." or ".." component.
_PATH_RE = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._-]+)+")


class PathNotFound(StorageError, LookupError):
    def __init__(self, path: str) -> None:
        super().__init__(f"path not found: {path}")
        self.path = path


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime_ns: int  # nanoseconds since the epoch, exact as the filesystem keeps them
    is_dir: bool


def check_path(path: str) -> str:
    if _PATH_RE.fullmatch(path) is None:
        raise InvalidPath(path)
    return path


def check_tree(path: str) -> str:
    """Like check_path, but also admits the root "/" (for listing and walking)."""
    return path if path == "/" else check_path(path)


def join(*parts: str) -> str:
    return "/" + "/".join(p.strip("/") for p in parts if p.strip("/"))


# What a storage path may hold besides its separators (`_PATH_RE`), for `_relative`.
_NAME_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/"


def _relative(names: Sequence[str]) -> list[str]:
    """names, each checked as a relative storage path (no `..`, no empty or absolute part):
    a driver resolves them beneath their directory. All at once (a listing's 10,000 links
    and blobs, one regex each, cost 14 ms): joined by "/", every component of every name
    lies between two slashes, so an empty one shows as "//", `.` and `..` as "/./" and
    "/../"; only the names of a list that fails are checked one by one, to say which."""
    joined = f"/{'/'.join(names)}/"
    if (
        joined.encode("ascii", "replace").translate(None, _NAME_BYTES)
        or "//" in joined
        or "/./" in joined
        or "/../" in joined
    ):
        for name in names:
            if _PATH_RE.fullmatch("/" + name) is None:
                raise InvalidPath(name)
    return list(names)


class FileReader(ABC):
    """Random access to one file: every read names its offset, so a seek costs nothing."""

    size: int

    @abstractmethod
    async def read_at(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    async def aclose(self) -> None: ...

    def fileno(self) -> int | None:
        """The file's local descriptor (`api.LocalBlobReader.fileno`); None unless local."""
        return None


class FileWriter(ABC):
    """Writes into one file at offsets up to its end; `size` is the current end."""

    size: int

    async def write_at(self, offset: int, data: bytes) -> None:
        self.write_at_blocking(offset, data)

    @abstractmethod
    def write_at_blocking(self, offset: int, data: bytes) -> None:
        """`write_at` for a worker thread: one thread at a time, none while others run."""

    @abstractmethod
    async def truncate(self, size: int) -> None: ...

    def check_write(self, offset: int) -> None:
        """InvalidOffset where a write at offset (≤ size) cannot be made: asked before
        anything is changed for it (an upload's hash states above it), so a refusal changes
        nothing. A store that rewrites anywhere refuses none; S3 refuses any below the end."""
        return None

    def check_truncate(self, size: int) -> None:
        """As check_write, for a truncate to size (≤ size): S3 cuts only its unsealed tail."""
        return None

    async def sync(self) -> None:
        """Make the data written so far durable (before anything that vouches for it)."""
        await trio.to_thread.run_sync(self.sync_blocking)

    @abstractmethod
    def sync_blocking(self) -> None:
        """`sync` for a worker thread, so a caller can go on writing while it runs."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the file (and its writer lock); this does not sync."""


# The most `get_content` reads: the files the registry keeps whole are links, upload records
# and manifests, and distribution refuses a manifest over 4 MiB. A bigger file in a hostile
# root is damage, never held in memory (docs/security.md).
CONTENT_LIMIT = 4 << 20


def _storage_paths(found: builtins.list[FileInfo]) -> builtins.list[FileInfo]:
    """found without the paths no storage path may be (`lost+found`, a space), each logged."""
    infos = []
    for info in found:
        if _PATH_RE.fullmatch(info.path) is None:
            log.warning("%r: no storage path name: passed over", info.path)
        else:
            infos.append(info)
    return infos


class StorageDriver(ABC):
    name: str
    keeps_symlinks = False  # whether `symlinks` can ever name one (a filesystem's root)

    async def get_content(self, path: str) -> bytes:
        data = await self._get_content(check_path(path), CONTENT_LIMIT + 1)
        if len(data) > CONTENT_LIMIT:
            why = f"over {CONTENT_LIMIT} bytes, too big for a link, record or manifest"
            raise CorruptEntry(path, why)
        return data

    async def put_content(self, path: str, data: bytes) -> None:
        """Replace the file atomically: readers see the old or the new content, never a mix."""
        await self._put_content(check_path(path), data)

    async def reader(self, path: str) -> FileReader:
        return await self._reader(check_path(path))

    async def writer(self, path: str) -> FileWriter:
        """Open for writing, creating an empty file (and its parents) when missing.

        A writer is exclusive while open, across processes too (Busy); the lock dies with
        the writer's process, so a killed daemon never leaves a file locked.
        """
        return await self._writer(check_path(path))

    async def stat(self, path: str) -> FileInfo:
        return await self._stat(check_tree(path))

    async def being_written(self, path: str) -> bool:
        """Whether a writer, of this process or another, holds path's writer lock now, asked
        without taking it (S3: its lock object is there, renewed within its expiry by the
        server's clock). `purge-uploads` asks it of an upload's data before
        it deletes the upload: it deleted one a mount was writing, whose close then
        succeeded with every byte gone."""
        return await self._being_written(check_path(path))

    async def list(self, path: str) -> list[str]:
        """Sorted names of the entries of a directory (a symbolic link is left out, logged)."""
        return await self._list(check_tree(path))

    async def symlinks(self, path: str) -> builtins.list[str]:
        """Sorted names of the symbolic links in a directory, which `list` leaves out: damage
        for `regfs check` to report. Stores without links have none."""
        return await self._symlinks(check_tree(path))

    async def move(self, source: str, dest: str) -> None:
        """Atomically move a file, replacing dest; creates dest's parents."""
        await self._move(check_path(source), check_path(dest))

    async def delete(self, path: str) -> None:
        """Delete a file or a whole directory tree."""
        await self._delete(check_path(path))

    async def remove_empty(self, path: str) -> bool:
        """Remove the directory at path if it holds nothing, in one step (rmdir(2)), so an
        entry made there meanwhile keeps it; whether it went. A store without directories
        (S3) has none to remove: its empty directories do not exist."""
        return await self._remove_empty(check_path(path))

    async def walk(self, path: str) -> AsyncIterator[FileInfo]:
        """Every entry below path, depth first, in sorted order (see `entries`)."""
        for info in await self.entries(check_tree(path)):
            yield info
            if info.is_dir:
                async for below in self.walk(info.path):
                    yield below

    async def entries(self, path: str) -> builtins.list[FileInfo]:
        """What `stat` says of each entry of a directory, in `list`'s order; a name no storage
        path may hold (`lost+found`, a space) is passed over, as every other call would
        refuse it."""
        return _storage_paths(await self._entries(check_tree(path)))

    async def files(self, path: str, sizes: bool = True) -> builtins.list[FileInfo] | None:
        """What `stat` says of every file below a directory, where the store lists a whole
        tree in fewer requests than one per directory (S3: 1000 keys a request); None where
        it does not (walk instead). A path no storage path may be is passed over.

        sizes=False is for a caller that needs only which files are there (a purge): a
        file whose size and time would cost a request of its own (on S3 an upload in
        progress, a ListParts each) is listed with size and time 0, and one finished or
        cancelled since the listing may still be listed."""
        found = await self._files(check_tree(path), sizes)
        return None if found is None else _storage_paths(found)

    async def contents(
        self, directory: str, names: Sequence[str]
    ) -> builtins.list[tuple[bytes, int] | None] | None:
        """`get_content` of each `directory/name` (names are relative paths: a link below
        the directory that lists it) with its `mtime_ns`, in one call where the store reads
        many small files cheaply (a local root); None where it has no such way (ask each).
        An entry is None where `get_content` would not answer plainly (absent, too big, no
        regular file, a symbolic link on its way): ask it for why, and it logs what it logs.
        Also None for a file over what the store reads in bulk (a local root's stat worker:
        WORKER_CONTENT bytes, a tag's link): a caller asks that one alone too."""
        return await self._contents(check_tree(directory), _relative(names))

    async def linked_stats(
        self, links: str, link_names: Sequence[str], targets: Sequence[bytes], files: str,
        file_names: Sequence[str],
    ) -> builtins.list[tuple[int, int] | None] | None:  # fmt: skip
        """For each i, where the link file `links/link_names[i]` holds exactly `targets[i]`,
        the size and mtime_ns that `stat` gives of the regular file `files/file_names[i]` (a
        listing's links, each naming its blob, and those blobs' data), in one call where
        the store reads many small files cheaply (a local root); None where it has no such
        way (ask each). An entry is None where the link holds anything else or either is not
        plainly there (absent, no regular file, a symbolic link on its way): ask each, which
        says why."""
        if not len(link_names) == len(targets) == len(file_names):
            raise ValueError("linked_stats: a target and a file for each link")
        return await self._linked_stats(
            check_tree(links), _relative(link_names), targets, check_tree(files),
            _relative(file_names),
        )  # fmt: skip

    async def present(self, directory: str, names: Sequence[str]) -> builtins.list[bool] | None:
        """For each relative name (a path below directory), True where `stat` of
        `directory/name` answers plainly (there, no symbolic link on its way or at its end),
        in one call for all where the store can say it so (a local root's stat worker: an
        lstat each; S3: listings, not a request per name); None where it has no such way
        (ask each). False where it is not there, or the store could not tell at once: ask
        that one alone, which says why (and logs a symlink)."""
        return await self._present(check_tree(directory), _relative(names))

    async def empty(self, directory: str, names: Sequence[str]) -> builtins.list[bool] | None:
        """For each relative name, True where `directory/name` is a directory that holds no
        entry at all (no symbolic link on its way or at its end), in one call for all where
        the store can say it so (a local root); None where it cannot, or keeps no empty
        directory (S3). False where it is anything else or the store could not tell: ask."""
        return await self._empty(check_tree(directory), _relative(names))

    def statvfs(self) -> os.statvfs_result | None:
        """Space and file counts of the store, where it has such a thing."""
        return None

    def start_workers(self) -> None:  # noqa: B027 (most drivers have none: nothing to start)
        """Start now what the driver would start at its first call that needs it: a daemon
        about to serve wants it ready for its first request."""

    def forget(self) -> None:  # noqa: B027 (most drivers keep nothing: nothing to drop)
        """Drop whatever the driver keeps of the store's state (SIGHUP)."""

    @abstractmethod
    async def _get_content(self, path: str, limit: int) -> bytes:
        """At most `limit` bytes of the file."""

    @abstractmethod
    async def _put_content(self, path: str, data: bytes) -> None: ...
    @abstractmethod
    async def _reader(self, path: str) -> FileReader: ...
    @abstractmethod
    async def _writer(self, path: str) -> FileWriter: ...
    @abstractmethod
    async def _stat(self, path: str) -> FileInfo: ...
    @abstractmethod
    async def _list(self, path: str) -> builtins.list[str]: ...
    async def _entries(self, path: str) -> builtins.list[FileInfo]:
        """A stat of each listed name. A driver whose listing already says what a stat would
        (S3's ListObjectsV2, os.scandir) overrides this to spare a request per entry."""
        return [await self._stat(join(path, name)) for name in await self._list(path)]

    async def _files(self, path: str, sizes: bool) -> builtins.list[FileInfo] | None:
        return None

    async def _contents(
        self, directory: str, names: builtins.list[str]
    ) -> builtins.list[tuple[bytes, int] | None] | None:
        return None

    async def _linked_stats(
        self, links: str, link_names: builtins.list[str], targets: Sequence[bytes], files: str,
        file_names: builtins.list[str],
    ) -> builtins.list[tuple[int, int] | None] | None:  # fmt: skip
        return None

    async def _present(
        self, directory: str, names: builtins.list[str]
    ) -> builtins.list[bool] | None:
        return None

    async def _empty(self, directory: str, names: builtins.list[str]) -> builtins.list[bool] | None:
        return None

    async def _symlinks(self, path: str) -> builtins.list[str]:
        await self._list(path)  # PathNotFound as list() would say it
        return []

    async def _being_written(self, path: str) -> bool:
        return False

    async def _remove_empty(self, path: str) -> bool:
        return False

    @abstractmethod
    async def _move(self, source: str, dest: str) -> None: ...
    @abstractmethod
    async def _delete(self, path: str) -> None: ...
