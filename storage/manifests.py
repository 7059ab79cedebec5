"""Manifests: validated on put like the registry does, stored as blobs, linked as revisions."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence

from .api import BlobInfo, Manifest
from .blobs import BlobStore, LinkedBlobs
from .digests import Digest
from .errors import MissingReference, UnknownLayer, UnknownManifest
from .manifest_format import parse_manifest, sniff_media_type
from .paths import RevisionLink, RevisionsDir
from .tags import TagService

log = logging.getLogger(__name__)


def revisions_of(blobs: BlobStore, name: str) -> LinkedBlobs:
    """A repository's manifests as linked blobs (`_manifests/revisions/`): what its tags
    may point at and its ManifestService keeps."""
    return LinkedBlobs(blobs, lambda d: RevisionLink(name, d), RevisionsDir(name), UnknownManifest)


class ManifestService:
    def __init__(
        self,
        blobs: BlobStore,
        layers: LinkedBlobs,
        tags: TagService,
        revisions: LinkedBlobs,
        name: str,
    ) -> None:
        self.name = name
        self._blobs = blobs
        self._layers = layers
        self._tags = tags
        self.revisions = revisions

    async def put(self, data: bytes, content_type: str | None = None) -> Digest:
        """Check, store as a blob, link as a revision; nothing is written when a check fails."""
        parsed = parse_manifest(data, content_type)
        for blob in parsed.blobs:
            if not blob.urls and not await self._layers.exists(blob.digest):
                what = f"{blob.where} names blob {blob.digest}, not in {self.name}"
                raise MissingReference(what, child=False)
        for child in parsed.children:
            if not await self.revisions.exists(child.digest):
                what = f"{child.where} names manifest {child.digest}, not in {self.name}"
                raise MissingReference(what, child=True)
        digest = await self._blobs.put(data)
        await self.revisions.link(digest)
        log.info("put: manifest %s (%s) in %s", digest, parsed.media_type, self.name)
        return digest

    async def stat(self, digest: Digest) -> BlobInfo:
        return await self.revisions.stat(digest)

    async def stats(self, digests: Sequence[Digest]) -> builtins.list[BlobInfo | None]:
        return await self.revisions.stats(digests)

    async def exists(self, digest: Digest) -> bool:
        return await self.revisions.exists(digest)

    async def get(self, digest: Digest) -> Manifest:
        info = await self.revisions.stat(digest)
        try:
            data = await self._blobs.get(info.digest)
        except UnknownLayer:  # collected since the stat: the registry answers 404 too
            raise UnknownManifest(f"unknown manifest {digest} in {self.name}") from None
        return Manifest(info.digest, sniff_media_type(data), data)

    async def list(self) -> list[Digest]:
        return await self.revisions.list()

    async def delete(self, digest: Digest) -> builtins.list[str]:
        """Delete the revision and every tag that points at it; returns those tags."""
        if not await self.revisions.is_linked(digest):
            raise UnknownManifest(f"unknown manifest {digest} in {self.name}")
        tags = await self._tags.lookup(digest)
        for tag in tags:
            await self._tags.delete(tag)
        await self.revisions.unlink(digest)
        return tags
