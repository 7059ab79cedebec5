"""The entry point: a registry over one driver, and its repositories."""

from __future__ import annotations

import os

from .blobs import BlobStore
from .catalog import Catalog
from .drivers import PathNotFound, StorageDriver
from .errors import NotEmpty, UnknownRepository
from .layers import LayerService
from .manifests import ManifestService, revisions_of
from .names import validate_name
from .paths import EmptyMarker, RepositoryDir, UploadsDir, UploadStartedAt, path_for
from .tags import TagService

# Entries an emptied repository's directories are looked through before rmdir takes it for
# full: one directory per digest and tag it had, each left empty (bounds a hostile tree).
EMPTIED_ENTRIES_MAX = 100_000


class Repository:
    def __init__(self, driver: StorageDriver, blobs: BlobStore, name: str) -> None:
        self.name = validate_name(name)
        self.layers = LayerService(driver, blobs, name)
        # Tags point at stored manifests only; a deleted manifest's tags go with it. No
        # reference cycle: a repository's objects (and a root's descriptors) go with the last
        # reference, not at the next collection.
        revisions = revisions_of(blobs, self.name)
        self.tags = TagService(driver, name, revisions.stat)
        self.manifests = ManifestService(blobs, self.layers.linked, self.tags, revisions, name)


class Registry:
    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver
        self.blobs = BlobStore(driver)
        self.catalog = Catalog(driver)

    def statvfs(self) -> os.statvfs_result | None:
        return self.driver.statvfs()

    async def aclose(self) -> None:
        """Nothing to release: drivers hold no connections (a remote registry does)."""

    def forget(self) -> None:
        """Every ask reads storage; only a driver may keep something (S3: a second's
        directories and listings)."""
        self.driver.forget()

    def repository(self, name: str) -> Repository:
        """A repository view; InvalidName for a name the registry would refuse."""
        return Repository(self.driver, self.blobs, name)

    async def create_repository(self, name: str) -> Repository:
        """An empty repository that the catalog lists (`_layers` with a marker file in it)."""
        repo = self.repository(name)
        if not await self.catalog.is_repository(name):
            await self.driver.put_content(path_for(EmptyMarker(name)), b"")
        # `mkdir -p org/app` made org a repository on its way to org/app: org is a namespace.
        parent = name.rpartition("/")[0]
        if parent and await self._only_marked(parent):
            await self.driver.delete(path_for(EmptyMarker(parent)).rpartition("/")[0])
        return repo

    async def remove_repository(self, name: str) -> None:
        """rmdir: remove a repository that holds no file but what `mkdir` made (its marker),
        or a namespace directory left empty; anything else is NotEmpty, as for a local
        directory. Empty directories do not count: the registry's DELETE, and removing every
        tag, manifest, layer link and upload through a mount (`rm -r`), leave them behind.
        Blobs are never touched: they are shared, and garbage collection's."""
        directory = path_for(RepositoryDir(name))
        try:
            entries = await self.driver.list(directory)
        except PathNotFound:
            raise UnknownRepository(name) from None
        if entries and not await self._holds_nothing(name, directory, entries):
            raise NotEmpty(f"repository {name} is not empty")
        await self.driver.delete(directory)

    async def _holds_nothing(self, name: str, directory: str, entries: list[str]) -> bool:
        """Whether a repository's own directories (`_layers`, `_manifests`, `_uploads`: a
        nested repository or namespace is something) hold no file but the empty marker and
        what the registry leaves of a cancelled upload (its DELETE keeps
        `_uploads/<id>/hashstates/sha256/0`: hash states of an upload without `startedat`,
        none as uploads/ and the registry see it; its data is a lost upload's bytes, which
        `regfs check` reports and keeps, so NotEmpty), looked at through at most
        EMPTIED_ENTRIES_MAX entries (more is taken as full)."""
        if not all(entry.startswith("_") for entry in entries):
            return False
        files = await self._files(directory, entries)
        if files is None:
            return False
        marker = path_for(EmptyMarker(name))
        uploads = path_for(UploadsDir(name)) + "/"
        for path in files:
            if path == marker:
                continue
            uuid, _, inside = path.removeprefix(uploads).partition("/")
            if not (path.startswith(uploads) and inside.startswith("hashstates/")) or (
                path_for(UploadStartedAt(name, uuid)) in files
            ):
                return False
        return True

    async def _files(self, directory: str, entries: list[str]) -> set[str] | None:
        """The paths of every file below `directory` (whose `entries` are given), or None
        past EMPTIED_ENTRIES_MAX entries."""
        if (listed := await self.driver.files(directory, sizes=False)) is not None:
            return {f.path for f in listed} if len(listed) <= EMPTIED_ENTRIES_MAX else None
        files: set[str] = set()
        pending, seen = [f"{directory}/{entry}" for entry in entries], 0
        while pending:
            found = await self.driver.entries(pending.pop())
            seen += len(found)
            if seen > EMPTIED_ENTRIES_MAX:
                return None
            pending += [info.path for info in found if info.is_dir]
            files.update(info.path for info in found if not info.is_dir)
        return files

    async def _only_marked(self, name: str) -> bool:
        """Whether the repository holds nothing but the marker of an empty repository."""
        marker = path_for(EmptyMarker(name))
        layers_dir, _, marker_name = marker.rpartition("/")
        try:
            entries = await self.driver.list(path_for(RepositoryDir(name)))
            return [e for e in entries if e.startswith("_")] == ["_layers"] and (
                await self.driver.list(layers_dir) == [marker_name]
            )
        except PathNotFound:
            return False
