"""The repository catalog: one level at a time for the mount, or every repository, paginated."""

from __future__ import annotations

import contextlib
import logging

from .drivers import PathNotFound, StorageDriver
from .errors import UnsafeEntry
from .layers import started_uploads
from .names import MAX_NAME_LENGTH, is_component
from .nurseries import open_nursery
from .paths import RepositoryDir, path_for

log = logging.getLogger(__name__)

# The registry 2.8 counts a directory as a repository when it holds `_layers` (v3: `_manifests`).
MARKERS = ("_layers", "_manifests")
# Children a listing checks at once (`Catalog.children`): S3 answers each with a request.
CHECKS_AT_ONCE = 32


class Catalog:
    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver

    async def _entries(self, prefix: str) -> list[str]:
        try:
            return await self.driver.list(path_for(RepositoryDir(prefix)))
        except PathNotFound:
            return []

    async def children(self, prefix: str = "") -> list[str]:
        """Name components directly below prefix that the registry's catalog counts: each a
        repository, or a namespace with one somewhere below it (`holds_repository`). What
        the registry's own deletes leave (a cancelled first push's hash states, an
        `_uploads/` its purge emptied, a namespace emptied of its last repository) is left
        out, as `_catalog` leaves it out and as S3, which keeps no empty directory, shows
        it. Unvalidated names are logged and skipped."""
        names = []
        for entry in await self._entries(prefix):
            if entry.startswith("_"):
                continue
            if is_component(entry):
                names.append(entry)
            else:
                log.warning("children: ignoring %r under %r: not a repository name", entry, prefix)
        directory = path_for(RepositoryDir(prefix))
        # One call for all (`StorageDriver.present`): which hold `_layers`, as
        # `holds_repository`'s first question asks, a stat each; only the rest is walked.
        marked = await self.driver.present(directory, [f"{e}/{MARKERS[0]}" for e in names])
        shown = {entry for entry, yes in zip(names, marked or (), strict=False) if yes}
        rest = [entry for entry in names if entry not in shown]
        # What the registry's deletes leave most: empty directories, none walked (a root of
        # 20,000 took its mount 0.8 s, and each listing of it after --tag-ttl 0.4 s).
        if rest and (emptied := await self.driver.empty(directory, rest)) is not None:
            rest = [entry for entry, yes in zip(rest, emptied, strict=True) if not yes]
        pending = iter(rest)

        async def check() -> None:
            """Checks children one after another: a local root's stat never yields, so one
            of these does them all; S3's is a request, so CHECKS_AT_ONCE are under way."""
            for entry in pending:
                if await self.holds_repository(f"{prefix}/{entry}" if prefix else entry):
                    shown.add(entry)

        async with open_nursery() as nursery:  # a child's error comes out as itself
            for _ in range(min(CHECKS_AT_ONCE, len(rest))):
                nursery.start_soon(check)
        return [entry for entry in names if entry in shown]

    async def holds_repository(self, name: str) -> bool:
        """Whether name is a repository (`is_repository`, with uploads) or a namespace with
        one below it: what the mount shows as a directory. Depth first, done at the first
        found, so a repository costs `is_repository`'s one stat of `_layers`. Iterative, and
        never below a name no repository can have (past MAX_NAME_LENGTH): a root's owner
        can nest empty directories past any depth, and a recursion per level raised
        RecursionError from the root's listing (the mount's root EIO, `regfs mount` failed)."""
        pending = [name]
        while pending:
            name = pending.pop()
            entries = await self._unless_repository(name, with_uploads=True)
            if entries is None:
                return True
            pending.extend(
                below
                for entry in reversed(entries)
                if not entry.startswith("_")
                and is_component(entry)
                and len(below := f"{name}/{entry}") <= MAX_NAME_LENGTH
            )
        return False

    async def is_repository(self, name: str, with_uploads: bool = False) -> bool:
        """Whether name is a repository as the registry counts them; with_uploads, also one
        holding only uploads: a first push to it, interrupted before any blob finished."""
        return await self._unless_repository(name, with_uploads) is None

    async def _unless_repository(self, name: str, with_uploads: bool) -> list[str] | None:
        """None where name is a repository (as `is_repository` says), else its entries.
        A stat of `_layers` first, which every repository holding a blob has: a listing of
        the directory pages through every entry of a namespace, and a driver may answer
        that stat from the lookup of name it made just before (S3: docs/scale-out.md)."""
        with contextlib.suppress(PathNotFound, UnsafeEntry):  # a symlink: as the listing says
            await self.driver.stat(f"{path_for(RepositoryDir(name))}/{MARKERS[0]}")
            return None
        entries = await self._entries(name)
        if any(marker in entries for marker in MARKERS):
            return None
        # An emptied `_uploads/` (the registry's purger, or its finish, leaves one) holds no
        # upload: on S3 it does not exist, and the repository is gone with its last upload.
        if with_uploads and "_uploads" in entries and await self._holds_an_upload(name):
            return None
        return entries

    async def _holds_an_upload(self, name: str) -> bool:
        async with contextlib.aclosing(started_uploads(self.driver, name)) as uploads:
            async for _ in uploads:
                return True
        return False

    async def mtime_ns(self, prefix: str) -> int | None:
        """When the directory of prefix last changed (None for an absent one)."""
        try:
            return (await self.driver.stat(path_for(RepositoryDir(prefix)))).mtime_ns
        except PathNotFound:
            return None

    async def exists(self, prefix: str) -> bool:
        """Whether prefix names a repository or a namespace holding one (`holds_repository`):
        a name `children` lists."""
        return await self.holds_repository(prefix)

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
