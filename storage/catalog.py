"""The repository catalog: one level at a time for the mount, or every repository, paginated."""

from __future__ import annotations

import contextlib
import logging

from .drivers import PathNotFound, StorageDriver
from .errors import UnsafeEntry
from .names import is_component
from .paths import RepositoryDir, UploadsDir, UploadStartedAt, path_for
from .uploads import UUID_RE

log = logging.getLogger(__name__)

# The registry 2.8 counts a directory as a repository when it holds `_layers` (v3: `_manifests`).
MARKERS = ("_layers", "_manifests")


class Catalog:
    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver

    async def _entries(self, prefix: str) -> list[str]:
        try:
            return await self.driver.list(path_for(RepositoryDir(prefix)))
        except PathNotFound:
            return []

    async def children(self, prefix: str = "") -> list[str]:
        """Name components directly below prefix (namespaces or repositories, unvalidated ones
        logged and skipped). Reads one directory: never walks the tree."""
        names = []
        for entry in await self._entries(prefix):
            if entry.startswith("_"):
                continue
            if is_component(entry):
                names.append(entry)
            else:
                log.warning("children: ignoring %r under %r: not a repository name", entry, prefix)
        return names

    async def is_repository(self, name: str, with_uploads: bool = False) -> bool:
        """Whether name is a repository as the registry counts them; with_uploads, also one
        holding only uploads: a first push to it, interrupted before any blob finished.
        A stat of `_layers` first, which every repository holding a blob has: a listing of
        the directory pages through every entry of a namespace, and a driver may answer
        that stat from the lookup of name it made just before (S3: docs/scale-out.md)."""
        with contextlib.suppress(PathNotFound, UnsafeEntry):  # a symlink: as the listing says
            await self.driver.stat(f"{path_for(RepositoryDir(name))}/{MARKERS[0]}")
            return True
        entries = await self._entries(name)
        if any(marker in entries for marker in MARKERS):
            return True
        # An emptied `_uploads/` (the registry's purger, or its finish, leaves one) holds no
        # upload: on S3 it does not exist, and the repository is gone with its last upload.
        return with_uploads and "_uploads" in entries and await self._holds_an_upload(name)

    async def _holds_an_upload(self, name: str) -> bool:
        """Whether `_uploads/` holds an upload as uploads/ and the registry see one: a uuid
        with `startedat` (the registry's DELETE of an upload leaves its hash states only)."""
        try:
            uuids = await self.driver.list(path_for(UploadsDir(name)))
        except PathNotFound:
            return False
        for uuid in uuids:
            if UUID_RE.fullmatch(uuid) is not None:
                with contextlib.suppress(PathNotFound):
                    await self.driver.stat(path_for(UploadStartedAt(name, uuid)))
                    return True
        return False

    async def mtime_ns(self, prefix: str) -> int | None:
        """When the directory of prefix last changed (None for an absent one)."""
        try:
            return (await self.driver.stat(path_for(RepositoryDir(prefix)))).mtime_ns
        except PathNotFound:
            return None

    async def exists(self, prefix: str) -> bool:
        """Whether prefix names a repository or a namespace holding something."""
        try:
            info = await self.driver.stat(path_for(RepositoryDir(prefix)))
        except PathNotFound:
            return False
        return info.is_dir

    async def repositories(self, n: int | None = None, last: str = "") -> list[str]:
        """Every repository name in lexical order after `last`, at most n (the `_catalog` API)."""
        names = [name for name in await self.names_holding(*MARKERS) if name > last]
        return names if n is None else names[:n]

    async def names_holding(self, *entries: str) -> list[str]:
        """Sorted names whose directory holds one of entries (`_uploads`: every upload)."""
        found: list[str] = []
        pending = [""]
        while pending:
            prefix = pending.pop()
            listing = await self._entries(prefix)
            if prefix and any(entry in listing for entry in entries):
                found.append(prefix)
            pending.extend(
                f"{prefix}/{e}" if prefix else e
                for e in listing
                if not e.startswith("_") and is_component(e)
            )
        return sorted(found)
