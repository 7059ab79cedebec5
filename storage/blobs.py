"""The global content-addressed blob store, and a repository's view of it through link files."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

from .api import BlobInfo
from .digests import SHA256, Digest, digest_bytes
from .drivers import FileReader, PathNotFound, StorageDriver
from .errors import CorruptEntry, InvalidName, UnknownLayer
from .paths import BlobData, BlobDir, BlobsDir, Location, path_for

log = logging.getLogger(__name__)

# A listing of sha256 links, one name to a line: every name checked in one regex pass (a
# name holding a newline adds one to the count of newlines, so cannot pass as two).
_HEX_LINES_RE = re.compile(r"(?:[0-9a-f]{64}\n)*")


async def read_link(driver: StorageDriver, path: str) -> Digest:
    """The digest a link file names; PathNotFound when absent, CorruptEntry when garbage."""
    raw = await driver.get_content(path)
    try:
        return Digest.parse(raw.decode("ascii"))
    except (UnicodeDecodeError, InvalidName) as exc:
        raise CorruptEntry(path, f"not a digest link: {raw[:80]!r}") from exc


async def write_link(driver: StorageDriver, path: str, digest: Digest) -> None:
    await driver.put_content(path, str(digest).encode("ascii"))


def below(directory: str, names: list[str], first: Location) -> list[str]:
    """names, paths below directory that a caller of the driver's bulk calls made from
    the layout (path_for costs ~3 us, per entry of a listing of 10,000), checked: the first
    must be where path_for puts `first`."""
    if names and path_for(first) != f"{directory}/{names[0]}":
        raise ValueError(f"{directory}/{names[0]} is not {path_for(first)}")
    return names


class BlobStore:
    """Blobs by digest, shared by every repository. Never deletes: that is garbage collection."""

    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver

    async def stat(self, digest: Digest) -> BlobInfo:
        try:
            info = await self.driver.stat(path_for(BlobData(digest)))
        except PathNotFound:
            raise UnknownLayer(f"blob unknown to registry: {digest}") from None
        if info.is_dir:  # no blob's data: its size would be the directory's
            raise UnknownLayer(f"blob unknown to registry: {digest} (data is a directory)")
        return BlobInfo(digest, info.size, info.mtime_ns)

    async def exists(self, digest: Digest) -> bool:
        try:
            await self.stat(digest)
        except UnknownLayer:
            return False
        return True

    async def collected(self, digest: Digest) -> bool:
        """Whether the blob's whole directory is gone, as garbage collection leaves it (a
        directory without usable `data` is damage instead; the registry answers 404 for both)."""
        try:
            await self.driver.stat(path_for(BlobDir(digest)))
        except PathNotFound:
            return True
        except CorruptEntry:  # there, but never followed (a symbolic link): not gc's doing
            return False
        return False

    async def open(self, digest: Digest) -> FileReader:
        try:
            return await self.driver.reader(path_for(BlobData(digest)))
        except PathNotFound:
            raise UnknownLayer(f"blob unknown to registry: {digest}") from None

    async def get(self, digest: Digest) -> bytes:
        try:
            return await self.driver.get_content(path_for(BlobData(digest)))
        except PathNotFound:
            raise UnknownLayer(f"blob unknown to registry: {digest}") from None

    async def put(self, data: bytes) -> Digest:
        """Store small content (a manifest) by its digest; present content is not rewritten."""
        digest = digest_bytes(data)
        if not await self.exists(digest):
            await self.driver.put_content(path_for(BlobData(digest)), data)
        return digest


class LinkedBlobs:
    """The blobs one repository reaches through link files (`_layers`, `_manifests/revisions`).

    `link_of(digest)` gives a link's location and `directory` the directory that lists them.
    """

    def __init__(
        self,
        blobs: BlobStore,
        link_of: Callable[[Digest], Location],
        directory: Location,
        unknown: type[LookupError],
    ) -> None:
        self.blobs = blobs
        self.driver = blobs.driver
        self._link_of = link_of
        self._directory = directory
        self._unknown = unknown

    def _link_path(self, digest: Digest) -> str:
        return path_for(self._link_of(digest))

    async def stat(self, digest: Digest) -> BlobInfo:
        """The linked blob; unknown when it is not linked or its blob is gone, CorruptEntry
        when the link is garbage or names another blob.

        The registry's own operations leave links that name nothing: its DELETE removes only
        the `link` file (the digest's directory stays, empty), and garbage collection deletes
        blobs but not the links to them. It answers 404 for both, and so does this.
        """
        path = self._link_path(digest)
        try:
            target = await read_link(self.driver, path)
        except PathNotFound:
            raise self._unknown(f"{digest} is not linked here") from None
        if target != digest:  # the bytes of another blob under this digest's name
            raise CorruptEntry(path, f"names {target}, not {digest}")
        try:
            return await self.blobs.stat(target)
        except UnknownLayer:
            if not await self.blobs.collected(target):
                log.warning("stat: %s links to %s whose blob data is missing", path, target)
            raise self._unknown(f"{digest} is linked here, but its blob is gone") from None

    async def exists(self, digest: Digest) -> bool:
        try:
            await self.stat(digest)
        except (LookupError, CorruptEntry):
            return False
        return True

    async def stats(self, digests: Sequence[Digest]) -> list[BlobInfo | None]:
        """`stat` of each digest, in one call of the driver where it reads many files at
        once (a local root: each link, and the blob it names if it names the right one):
        None for each that `stat` would not answer plainly (absent, damaged, or a store
        without such calls), for the caller to ask `stat`, which says why."""
        if not digests:
            return []
        links, blobs = path_for(self._directory), path_for(BlobsDir())
        link_names = [f"{d.hex}/link" for d in digests]
        data_names = [f"{d.hex[:2]}/{d.hex}/data" for d in digests]
        found = await self.driver.linked_stats(
            links,
            below(links, link_names, self._link_of(digests[0])),
            [str(d).encode() for d in digests],
            blobs,
            below(blobs, data_names, BlobData(digests[0])),
        )
        if found is None:
            return [None] * len(digests)
        return [
            None if got is None else BlobInfo(digest, *got)
            for digest, got in zip(digests, found, strict=True)
        ]

    async def is_linked(self, digest: Digest) -> bool:
        try:
            await self.driver.stat(self._link_path(digest))
        except PathNotFound:
            return False
        return True

    async def link(self, digest: Digest) -> None:
        await write_link(self.driver, self._link_path(digest), digest)

    async def unlink(self, digest: Digest) -> None:
        """Remove the link directory; the blob stays for garbage collection."""
        link_dir = self._link_path(digest).rsplit("/", 1)[0]
        try:
            await self.driver.delete(link_dir)
        except PathNotFound:
            raise self._unknown(f"{digest} is not linked here") from None

    async def list(self) -> list[Digest]:
        """Linked digests, by directory name; entries that are not digests are logged, skipped.

        Names only: a digest whose link the registry's DELETE removed, or whose blob its
        garbage collection deleted, is listed too; `stat` tells which are there (the
        registry's own walk skips those the same way)."""
        try:
            names = await self.driver.list(path_for(self._directory))
        except PathNotFound:
            return []
        text = "\n".join([*names, ""])
        if text.count("\n") == len(names) and _HEX_LINES_RE.fullmatch(text) is not None:
            return [Digest(SHA256, name) for name in names]  # one regex pass, not one each
        found = []
        for name in names:
            try:
                found.append(Digest.parse(f"{SHA256}:{name}"))
            except InvalidName:
                log.warning(
                    "list: ignoring %r in %s: not a digest", name, path_for(self._directory)
                )
        return found
