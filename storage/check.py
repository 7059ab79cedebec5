"""A read-only consistency check of a registry root, and the upload purger.

Findings are of three severities: DAMAGE (something points at nothing, content is not what its
digest says, a symbolic link in the root), MAINTENANCE (what garbage collection or the upload
purger would remove) and RECLAIMABLE: what the registry's own DELETE and garbage collection
leave behind and nothing ever removes (a digest directory without its link, a link to a
collected blob). The registry answers 404 for those, regfs shows them as absent, and they do
not change the exit status (0); deleting them frees a directory entry or two.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

from .blobs import read_link
from .digests import Digest, Sha256State
from .drivers import FileInfo, FileReader, FileWriter, PathNotFound, StorageDriver
from .drivers.base import join
from .errors import CorruptEntry, InvalidName, StorageError, UnknownUpload
from .hashing import HASH_CHUNK, hash_range
from .paths import (
    ROOT,
    BlobData,
    BlobsDir,
    LayerLink,
    RevisionLink,
    TagCurrentLink,
    UploadData,
    UploadDir,
    UploadLabel,
    UploadsDir,
    path_for,
)
from .registry import Registry
from .uploads import UUID_RE, read_started_at

log = logging.getLogger(__name__)

UPLOAD_PURGE_AGE = timedelta(hours=168)  # the registry's default uploadpurging age
T = TypeVar("T")


class Severity(enum.IntEnum):
    """The exit status of `regfs check` is the worst one found (0 when none)."""

    RECLAIMABLE = 0
    MAINTENANCE = 1
    DAMAGE = 2


@dataclass(frozen=True)
class Finding:
    severity: Severity
    kind: str
    path: str
    detail: str

    def __str__(self) -> str:
        """One line of the report: a name in the root (its owner's) is escaped where it is
        not printable, so that a link named with a newline or a terminal escape cannot
        write lines of its own into the report an administrator reads."""
        path, detail = _printable(self.path), _printable(self.detail)
        return f"{self.severity.name.lower()}: {self.kind}: {path}: {detail}"


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)[1:-1]


class Progress(Protocol):
    """How far long work has got, for a progress bar on a terminal: a stage of `total`
    units ("repositories", "B"), then `advance` as each piece is done."""

    def begin(self, what: str, total: int, unit: str) -> None: ...

    def advance(self, amount: int) -> None: ...


class NoProgress:
    def begin(self, what: str, total: int, unit: str) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


class ListedOnce(StorageDriver):
    """A read-only view of a driver for one check, whose passes (blobs, repositories, the
    tree) ask about the same directories: the whole tree is listed at once where the driver
    can (`files`: on S3 a request per 1000 keys), else each directory once, with what its
    listing says of each entry (`entries`), and a stat is answered from those listings. The
    check reads a snapshot taken as it goes; contents (links, start times, blobs) are still
    read from the driver. It holds every listing it made, a FileInfo per entry of the tree,
    until the check ends. The check and the purge ask only whether an upload's data is
    there, never its size: a file whose size would cost a request of its own (S3: an
    upload in progress, a ListParts) is listed with size and time 0 (`files` without
    sizes)."""

    name = "listed-once"

    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver
        self.keeps_symlinks = driver.keeps_symlinks
        self._listed: dict[str, dict[str, FileInfo]] = {}
        self._missing: set[str] = set()  # directories found not there
        self._whole: bool | None = None  # whether every directory came from `files`

    def __repr__(self) -> str:
        return f"ListedOnce({self.driver!r})"

    async def _list_whole_tree(self) -> bool:
        """Every directory from one listing of all files (`files`), where the driver has
        one: on S3 a request per 1000 keys instead of one per directory."""
        files = await self.driver.files("/", sizes=False)
        if files is None:
            return False
        self._listed["/"] = {}
        for info in files:
            parts = info.path.split("/")  # "", then the components
            for depth in range(1, len(parts) - 1):
                directory = "/".join(parts[: depth + 1])
                above = self._listed["/".join(parts[:depth]) or "/"]
                above.setdefault(parts[depth], FileInfo(directory, 0, 0, True))
                self._listed.setdefault(directory, {})
            self._listed["/".join(parts[:-1]) or "/"][parts[-1]] = info
        return True

    async def _entries(self, path: str) -> list[FileInfo]:
        if self._whole is None:
            self._whole = await self._list_whole_tree()
        if path not in self._listed and not self._whole and path not in self._missing:
            try:
                infos = await self.driver.entries(path)
            except PathNotFound:
                self._missing.add(path)
            else:
                self._listed[path] = {info.path.rpartition("/")[2]: info for info in infos}
        if path not in self._listed:
            raise PathNotFound(path)
        return sorted(self._listed[path].values(), key=lambda info: info.path)

    async def _list(self, path: str) -> list[str]:
        return [info.path.rpartition("/")[2] for info in await self._entries(path)]

    async def _stat(self, path: str) -> FileInfo:
        if path == "/":
            return await self.driver.stat(path)
        parent, _, name = path.rpartition("/")
        try:
            await self._entries(parent or "/")
        except PathNotFound:
            raise PathNotFound(path) from None
        info = self._listed[parent or "/"].get(name)
        if info is not None:
            return info
        if self.keeps_symlinks:  # a symlink, not listed: the driver says CorruptEntry for it
            return await self.driver.stat(path)
        raise PathNotFound(path)

    async def _symlinks(self, path: str) -> list[str]:
        await self._entries(path)  # PathNotFound as list() would say it
        return await self.driver.symlinks(path) if self.keeps_symlinks else []

    async def _get_content(self, path: str, limit: int) -> bytes:
        return await self.driver.get_content(path)  # its own limit: CorruptEntry above

    async def _reader(self, path: str) -> FileReader:
        return await self.driver.reader(path)

    async def _put_content(self, path: str, data: bytes) -> None:
        raise _read_only(path)

    async def _writer(self, path: str) -> FileWriter:
        raise _read_only(path)

    async def _move(self, source: str, dest: str) -> None:
        raise _read_only(source)

    async def _delete(self, path: str) -> None:
        raise _read_only(path)


def _read_only(path: str) -> StorageError:
    return StorageError(f"{path}: the check changes nothing")


class Checker:
    def __init__(
        self,
        driver: StorageDriver,
        verify: bool,
        upload_age: timedelta,
        progress: Progress | None = None,
    ) -> None:
        self.driver = ListedOnce(driver)
        self.registry = Registry(self.driver)
        self.verify = verify
        self.upload_age = upload_age
        self.progress = progress or NoProgress()
        self.referenced: set[Digest] = set()

    async def run(self) -> AsyncIterator[Finding]:
        blobs = {d async for d in self._blobs()}
        catalog = self.registry.catalog
        names = await catalog.names_holding("_layers", "_manifests", "_uploads")
        self.progress.begin("checking repositories", len(names), "repositories")
        for name in names:
            async for finding in self._repository(name, blobs):
                yield finding
            self.progress.advance(1)
        for digest in sorted(blobs - self.referenced):
            yield Finding(
                Severity.MAINTENANCE,
                "unlinked-blob",
                str(digest),
                "no repository links it (garbage collection removes it)",
            )
        if self.verify:
            sizes = [await self._size(digest) for digest in sorted(blobs)]
            self.progress.begin("hashing blobs", sum(sizes), "B")
            for digest in sorted(blobs):
                actual = await self._hash(digest)
                if actual != digest:
                    yield Finding(
                        Severity.DAMAGE,
                        "digest-mismatch",
                        str(digest),
                        f"content hashes to {actual}",
                    )
        async for finding in self._tree():
            yield finding

    async def _tree(self) -> AsyncIterator[Finding]:
        """Symlinks on the way down to the registry's tree and in it, and temp files in it.
        Only the registry's tree: a root made with `--init`, or a volume's root, holds other
        files (lost+found) that are no concern of the registry's."""
        parts = ROOT.strip("/").split("/")
        try:
            for depth in range(len(parts) + 1):
                async for finding in self._symlinks("/" + "/".join(parts[:depth])):
                    yield finding
            async for info in self.driver.walk(ROOT):
                name = info.path.rpartition("/")[2]
                if info.is_dir:
                    async for finding in self._symlinks(info.path):
                        yield finding
                if name.startswith(".tmp-"):
                    yield Finding(
                        Severity.MAINTENANCE,
                        "temp-file",
                        info.path,
                        "left by an interrupted write; safe to delete",
                    )
        except PathNotFound:
            return  # no registry tree yet (an empty root), or not all of the way down

    async def _symlinks(self, directory: str) -> AsyncIterator[Finding]:
        """Symbolic links, which neither regfs nor this check follow (whoever can write the
        root must not reach outside it through the daemon): each is EIO or absent for regfs."""
        for name in await self.driver.symlinks(directory):
            yield Finding(
                Severity.DAMAGE,
                "symlink",
                join(directory, name),
                "a symbolic link in the root, never followed: put the real entry there",
            )

    async def _blobs(self) -> AsyncIterator[Digest]:
        root = path_for(BlobsDir())
        try:
            fanouts = await self.driver.list(root)
        except PathNotFound:
            return
        for fanout in fanouts:
            for name in await self.driver.list(f"{root}/{fanout}"):
                try:
                    digest = Digest.parse(f"sha256:{name}")
                    await self.driver.stat(f"{root}/{fanout}/{name}/data")
                except (InvalidName, PathNotFound, CorruptEntry):  # a symlink: reported apart
                    continue
                yield digest

    async def _links(
        self, kind: str, paths: list[tuple[Digest, str]], blobs: set[Digest], present: set[Digest]
    ) -> AsyncIterator[Finding]:
        """Findings about each link; adds to `present` the digests the registry would serve."""
        for digest, path in paths:
            try:
                target = await read_link(self.driver, path)
            except PathNotFound:
                if await _exists(self.driver, path):  # a directory or a FIFO in its place
                    yield Finding(Severity.DAMAGE, f"corrupt-{kind}-link", path, "not a file")
                else:
                    yield Finding(
                        Severity.RECLAIMABLE,
                        f"deleted-{kind}-link",
                        path,
                        "no link file, as the registry's DELETE leaves it: absent (404)",
                    )
                continue
            except CorruptEntry as exc:
                yield Finding(Severity.DAMAGE, f"corrupt-{kind}-link", path, str(exc))
                continue
            self.referenced.add(target)
            if target != digest:
                yield Finding(
                    Severity.DAMAGE, f"misplaced-{kind}-link", path, f"names {target}, not {digest}"
                )
            if target in blobs:
                if target == digest:
                    present.add(digest)
            elif await self.registry.blobs.collected(target):
                yield Finding(
                    Severity.RECLAIMABLE,
                    f"collected-{kind}-link",
                    path,
                    f"blob {target} was garbage-collected: absent (404)",
                )
            else:
                yield Finding(
                    Severity.DAMAGE, f"dangling-{kind}-link", path, f"blob {target} is missing"
                )

    async def _repository(self, name: str, blobs: set[Digest]) -> AsyncIterator[Finding]:
        repo = self.registry.repository(name)
        layers = [(d, path_for(LayerLink(name, d))) for d in await _listed(repo.layers.list())]
        async for finding in self._links("layer", layers, blobs, set()):
            yield finding
        revisions: set[Digest] = set()
        links = [(d, path_for(RevisionLink(name, d))) for d in await _listed(repo.manifests.list())]
        async for finding in self._links("manifest", links, blobs, revisions):
            yield finding
        for tag in await _listed(repo.tags.list()):
            path = path_for(TagCurrentLink(name, tag))
            try:
                target = await read_link(self.driver, path)
            except PathNotFound:
                yield Finding(
                    Severity.MAINTENANCE,
                    "incomplete-tag",
                    path,
                    "an interrupted tag push (no current link): push it again or rm",
                )
                continue
            except CorruptEntry as exc:
                yield Finding(Severity.DAMAGE, "corrupt-tag", path, str(exc))
                continue
            self.referenced.add(target)
            if target not in revisions:
                yield Finding(
                    Severity.DAMAGE,
                    "tag-to-missing-manifest",
                    path,
                    f"tag {name}:{tag} points at {target}, not a manifest of {name}",
                )
        now = datetime.now(UTC)
        for uuid in await _upload_dirs(self.driver, name):
            path = path_for(UploadDir(name, uuid))
            try:
                started = await read_started_at(self.driver, name, uuid)
            except (UnknownUpload, CorruptEntry) as exc:
                if await _holds_data(self.driver, name, uuid):
                    yield Finding(
                        Severity.DAMAGE,
                        "broken-upload",
                        path,
                        f"{exc} (the registry never purges it)",
                    )
                else:  # a create or a final delete cut short: no bytes of anyone's
                    yield Finding(
                        Severity.MAINTENANCE,
                        "empty-upload-leftover",
                        path,
                        f"{exc}, and no data: purge-uploads removes it",
                    )
                continue
            if now - started > self.upload_age:
                yield Finding(
                    Severity.MAINTENANCE,
                    "stale-upload",
                    path,
                    f"started {started:%Y-%m-%d %H:%M:%S}Z",
                )

    async def _size(self, digest: Digest) -> int:
        try:
            return (await self.driver.stat(path_for(BlobData(digest)))).size
        except (PathNotFound, CorruptEntry):  # reported by the hash that follows
            return 0

    async def _hash(self, digest: Digest) -> Digest:
        reader = await self.registry.blobs.open(digest)
        state = Sha256State()
        try:
            # A chunk at a time, to show progress within a big blob; a short read ends it.
            while state.size < reader.size:
                done = state.size
                await hash_range(reader, state, min(reader.size, done + HASH_CHUNK))
                self.progress.advance(state.size - done)
                if state.size < min(reader.size, done + HASH_CHUNK):
                    break
        finally:
            await reader.aclose()
        return state.digest()


async def check(
    driver: StorageDriver,
    verify: bool = False,
    upload_age: timedelta = UPLOAD_PURGE_AGE,
    progress: Progress | None = None,
) -> list[Finding]:
    """Every finding about the root; it changes nothing."""
    return [f async for f in Checker(driver, verify, upload_age, progress).run()]


async def _upload_dirs(driver: StorageDriver, name: str) -> list[str]:
    """Every upload directory, with or without a start time."""
    try:
        entries = await driver.list(path_for(UploadsDir(name)))
    except (PathNotFound, CorruptEntry):  # a symlinked `_uploads`: reported, never followed
        return []
    return [e for e in entries if UUID_RE.fullmatch(e)]


async def _listed(listing: Awaitable[list[T]]) -> list[T]:
    """A section's entries; none where a symlink stands for its directory (reported apart)."""
    try:
        return await listing
    except CorruptEntry:
        return []


async def _holds_data(driver: ListedOnce, name: str, uuid: str) -> bool:
    """Whether the data of an upload without a start time is there: a symlink counts, so
    it is never purged as empty. On S3, data that is the upload's only file is not: the
    registry's purge deletes objects, never multipart uploads (an upload's data until it
    finishes), and the driver's own delete removes the objects first, then aborts; either
    left cut short leaves a multipart upload alone, which S3 bills and nobody can resume
    (no start time). On a root such data would be a lost upload: kept, and reported."""
    data = path_for(UploadData(name, uuid))
    if not await _exists(driver, data):
        return False
    if driver.driver.name != "s3":
        return True
    return await driver.list(path_for(UploadDir(name, uuid))) != [data.rpartition("/")[2]]


async def _exists(driver: StorageDriver, path: str) -> bool:
    """Whether anything stands at path (a symlink too, though never followed)."""
    try:
        await driver.stat(path)
    except PathNotFound:
        return False
    except CorruptEntry:
        pass
    return True


@dataclass(frozen=True)
class PurgedUpload:
    repository: str
    uuid: str
    started_at: datetime
    label: str | None = None  # the name it was given through a mount (uploads/<label>)

    @property
    def shown(self) -> str:
        """The upload as uploads/ shows it: by its name where it has a printable one."""
        return self.label if self.label and self.label.isprintable() else self.uuid


async def purge_uploads(
    driver: StorageDriver,
    older_than: timedelta,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> list[PurgedUpload]:
    """Delete uploads started longer ago than older_than, as the registry's purger does.

    An upload without a readable start time is left alone, as there, unless it holds no
    data: that is what a crash during an upload's create or final delete leaves behind.
    Listings and stats come from the check's view (on S3 one listing of the bucket, not one
    per directory); start times are read, and uploads deleted, through the driver itself.
    """
    view = ListedOnce(driver)  # read-only: a delete through it would be refused
    registry = Registry(view)
    cutoff = datetime.now(UTC) - older_than
    purged = []
    uploads = [
        (name, uuid)
        for name in await registry.catalog.names_holding("_uploads")
        for uuid in await _upload_dirs(view, name)
    ]
    progress = progress or NoProgress()
    progress.begin("reading uploads", len(uploads), "uploads")
    for name, uuid in uploads:
        progress.advance(1)
        try:
            started = await read_started_at(view, name, uuid)
        except (UnknownUpload, CorruptEntry):
            if await _holds_data(view, name, uuid):
                continue
            started = datetime.min.replace(tzinfo=UTC)
        if started < cutoff:
            label = None  # read only where listed: most uploads have none (the registry's)
            if await _exists(view, path_for(UploadLabel(name, uuid))):
                label = await registry.repository(name).layers.label(uuid)
            if await driver.being_written(path_for(UploadData(name, uuid))):
                log.info("purge: upload %s of %s is being written: left", uuid, name)
                continue
            if not dry_run:
                try:
                    await driver.delete(path_for(UploadDir(name, uuid)))
                except PathNotFound:  # finished or cancelled elsewhere since it was read
                    log.info("purge: upload %s of %s is gone already", uuid, name)
                    continue
                log.info("purge: deleted upload %s of %s (started %s)", uuid, name, started)
            purged.append(PurgedUpload(name, uuid, started, label))
    return purged
