"""Tags: `_manifests/tags/<tag>/current/link` points at a manifest, `index/` keeps its history."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Awaitable, Callable, Sequence

from .api import BlobInfo
from .blobs import below, read_link, write_link
from .digests import Digest
from .drivers import PathNotFound, StorageDriver
from .errors import CorruptEntry, InvalidName, UnknownTag
from .names import valid_tags, validate_tag
from .paths import TagCurrentLink, TagDir, TagIndexLink, TagsDir, path_for

log = logging.getLogger(__name__)


# Invalid names a listing's warning shows at most: a root may hold 100,000 (a line of MBs).
LOGGED_NAMES = 20


class TagService:
    def __init__(
        self,
        driver: StorageDriver,
        name: str,
        manifest: Callable[[Digest], Awaitable[BlobInfo]],
    ) -> None:
        """`manifest`: the stat of a manifest stored in the repository (UnknownManifest
        for one that is not), which `put` asks first."""
        self.driver = driver
        self.name = name
        self._manifest = manifest

    async def list(self) -> list[str]:
        try:
            names = await self.driver.list(path_for(TagsDir(self.name)))
        except PathNotFound:
            return []
        valid = valid_tags(names)
        if len(valid) != len(names):
            invalid = sorted(set(names) - set(valid))
            log.warning(
                "list: ignoring %d invalid tag names in %s: %s%s",
                len(invalid),
                self.name,
                invalid[:LOGGED_NAMES],  # a repr: a newline in a name forges no log line
                " and more" if len(invalid) > LOGGED_NAMES else "",
            )
        return valid

    async def get(self, tag: str) -> Digest:
        validate_tag(tag)
        try:
            return await read_link(self.driver, path_for(TagCurrentLink(self.name, tag)))
        except PathNotFound:
            raise UnknownTag(f"unknown tag {self.name}:{tag}") from None

    async def read_many(
        self, tags: Sequence[str]
    ) -> builtins.list[tuple[Digest, int] | None] | None:
        """`get` and `mtime_ns` of each (valid) tag, in one call of the driver where it reads
        many files at once (a local root); None where it does not. None for each tag those
        would not answer plainly (absent, damaged): `get` says why."""
        if not tags:
            return []
        directory = path_for(TagsDir(self.name))
        names = [f"{tag}/current/link" for tag in tags]
        first = TagCurrentLink(self.name, tags[0])
        read = await self.driver.contents(directory, below(directory, names, first))
        if read is None:
            return None
        digests: dict[bytes, Digest | None] = {}  # tags point at few manifests: parsed once
        found: builtins.list[tuple[Digest, int] | None] = []
        for got in read:
            if got is None:
                found.append(None)
                continue
            data, mtime_ns = got
            if data not in digests:
                try:
                    digests[data] = Digest.parse(data.decode("ascii"))
                except (UnicodeDecodeError, InvalidName):
                    digests[data] = None
            digest = digests[data]
            found.append(None if digest is None else (digest, mtime_ns))
        return found

    async def mtime_ns(self, tag: str) -> int:
        """When the tag last moved (its current link was written)."""
        validate_tag(tag)
        try:
            return (await self.driver.stat(path_for(TagCurrentLink(self.name, tag)))).mtime_ns
        except PathNotFound:
            raise UnknownTag(f"unknown tag {self.name}:{tag}") from None

    async def put(self, tag: str, digest: Digest) -> None:
        """Point the tag at a stored manifest (UnknownManifest, nothing written, for one that
        is not, as the registry's PUT by tag needs the manifest): record the digest in the
        tag's index, then the tag's current link (the registry's order)."""
        validate_tag(tag)
        await self._manifest(digest)
        await write_link(self.driver, path_for(TagIndexLink(self.name, tag, digest)), digest)
        await write_link(self.driver, path_for(TagCurrentLink(self.name, tag)), digest)

    async def delete(self, tag: str) -> None:
        validate_tag(tag)
        try:
            await self.driver.delete(path_for(TagDir(self.name, tag)))
        except PathNotFound:
            raise UnknownTag(f"unknown tag {self.name}:{tag}") from None

    async def move(self, tag: str, to: str) -> Digest:
        """`to` first, then `tag` goes: a failure (a crash) between the two leaves both
        names, never neither; storage deletes any tag."""
        digest = await self.get(tag)
        await self.put(to, digest)
        await self.delete(tag)
        return digest

    async def lookup(self, digest: Digest) -> builtins.list[str]:
        """Tags that point at digest now (tags that cannot be read are skipped)."""
        found = []
        for tag in await self.list():
            try:
                if await self.get(tag) == digest:
                    found.append(tag)
            except (UnknownTag, CorruptEntry):
                continue
        return found
