"""Storage roots built through `storage/`, for tests that mount or check them."""

from __future__ import annotations

import os
from pathlib import Path

from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver
from storage.registry import Registry
from support.oci import image_manifest

CONFIG = b'{"architecture":"amd64","os":"linux"}'


async def link_blobs(root: Path, name: str, blobs: list[bytes]) -> list[str]:
    """Upload blobs into repository `name` through storage/; returns their digests."""
    repo = Registry(FilesystemDriver(root)).repository(name)
    digests = []
    for data in blobs:
        upload = await repo.layers.upload()
        await upload.write(data)
        digest = digest_bytes(data)
        await upload.finish(digest)
        digests.append(str(digest))
    return digests


async def put_tagged(root: Path, name: str, tag: str, manifest: bytes) -> str:
    """Put `manifest` (its blobs already linked) into repository `name` through storage/
    and tag it `tag`; returns its digest."""
    repo = Registry(FilesystemDriver(root)).repository(name)
    digest = await repo.manifests.put(manifest)
    await repo.tags.put(tag, digest)
    return str(digest)


async def build_root(
    root: Path,
    name: str = "library/demo",
    size: int = 3_000_000,
    tag: str = "latest",
    config: bytes = CONFIG,
) -> dict:
    """A repository with a config, one big random layer, a manifest and one tag."""
    blobs = [config, os.urandom(size)]
    config_digest, layer = await link_blobs(root, name, blobs)
    manifest = image_manifest(config, blobs[1:], layer_type="application/octet-stream")
    digest = await put_tagged(root, name, tag, manifest)
    return {
        "blobs": dict(zip([config_digest, layer], blobs, strict=True)),
        "manifest": manifest,
        "digest": digest,
        "layer": layer,
        "config": config_digest,
    }
