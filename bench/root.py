"""Build the storage root the bench runs on, fast, by writing the registry's layout directly.

Big blobs are written straight into `blobs/` (hashed on the way, then renamed into place) and
linked with a link file: going through an upload would time setup, not regfs. The layout comes
from storage/paths.py, so the registry and regfs both see an ordinary registry. Thousands of
repositories and tags are plain directories and link files for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver
from storage.manifest_format import OCI_MANIFEST
from storage.paths import (
    BlobData,
    BlobDir,
    LayerLink,
    Location,
    RepositoryDir,
    RevisionLink,
    TagCurrentLink,
    TagIndexLink,
    path_for,
)
from storage.registry import Registry

CHUNK = 1 << 20
_POOL_SIZE = 64 << 20
_pool: bytes = b""


def data_chunks(size: int, seed: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """`size` bytes that look random and differ for every seed, at memcpy speed.

    os.urandom makes ~0.3 GB/s here; slices of one random pool behind a (seed, index) header
    make every chunk of every blob distinct, which is all a digest or a page cache can tell.
    """
    global _pool
    if not _pool:
        _pool = os.urandom(_POOL_SIZE)
    for index, start in enumerate(range(0, size, chunk)):
        n = min(chunk, size - start)
        head = struct.pack("<QQ", seed, index)
        offset = (index * 7_919 * 4096 + seed * 104_729) % (_POOL_SIZE - chunk)
        yield (head + _pool[offset : offset + chunk - len(head)])[:n]


def write_file(path: Path, size: int, seed: int) -> Digest:
    """Write `size` bytes of `data_chunks` to path; their digest."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for piece in data_chunks(size, seed):
            f.write(piece)
            digest.update(piece)
    return Digest("sha256", digest.hexdigest())


@dataclass(frozen=True)
class Blob:
    """A blob linked into repository `name`, and where each side finds it."""

    name: str
    digest: Digest
    size: int
    data: Path  # the backing file in the root

    def in_mount(self, mountpoint: Path) -> Path:
        return mountpoint / self.name / "layers" / str(self.digest)

    @property
    def url_path(self) -> str:
        return f"/v2/{self.name}/blobs/{self.digest}"


@dataclass(frozen=True)
class Root:
    """A registry storage root, plus a scratch directory on the same filesystem."""

    root: Path
    scratch: Path

    def path(self, location: Location) -> Path:
        return self.root / path_for(location).lstrip("/")

    def _write(self, location: Location, data: bytes) -> None:
        path = self.path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def add_blob(self, name: str, size: int, seed: int) -> Blob:
        """A new blob of `size` bytes in the blob store, linked into repository `name`."""
        tmp = self.scratch / f"blob-{seed}"
        digest = write_file(tmp, size, seed)
        data = self.path(BlobData(digest))
        data.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, data)
        self.link(name, digest)
        return Blob(name, digest, size, data)

    def link(self, name: str, digest: Digest) -> None:
        self._write(LayerLink(name, digest), str(digest).encode())

    def remove_blob(self, name: str, digest: Digest) -> None:
        """Undo a push (blob data and the repository's link), so the next one starts afresh."""
        shutil.rmtree(self.path(BlobDir(digest)), ignore_errors=True)
        shutil.rmtree(self.path(LayerLink(name, digest)).parent, ignore_errors=True)

    def has_blob(self, name: str, digest: Digest, size: int) -> bool:
        data, link = self.path(BlobData(digest)), self.path(LayerLink(name, digest))
        return data.is_file() and data.stat().st_size == size and link.is_file()

    def add_repository(self, name: str) -> None:
        """An empty repository: a `_layers` directory is what both the registry's catalog and
        regfs look for."""
        (self.path(RepositoryDir(name)) / "_layers").mkdir(parents=True, exist_ok=True)

    def add_repositories(self, namespace: str, count: int) -> list[str]:
        """`count` empty repositories `namespace/rNNNNN`."""
        names = [f"{namespace}/r{i:05d}" for i in range(count)]
        for name in names:
            self.add_repository(name)
        return names

    def add_tags(self, name: str, count: int) -> list[str]:
        """`count` tags in repository `name`, all on one small valid image manifest."""
        manifest = trio.run(self._put_manifest, name)
        tags = [f"t{i:05d}" for i in range(count)]
        link = str(manifest).encode()
        for tag in tags:
            self._write(TagIndexLink(name, tag, manifest), link)
            self._write(TagCurrentLink(name, tag), link)
        return tags

    def add_digests(self, name: str, count: int) -> None:
        """`count` small blobs in repository `name`, each linked both as a layer and as a
        manifest revision: `count` entries in its layers/ and in its manifests/."""
        for i in range(count):
            data = json.dumps({"schemaVersion": 2, "annotations": {"n": str(i)}}).encode()
            digest = digest_bytes(data)
            self._write(BlobData(digest), data)
            self.link(name, digest)
            self._write(RevisionLink(name, digest), str(digest).encode())

    async def _put_manifest(self, name: str) -> Digest:
        """One config and one tiny layer, and a manifest naming them, through storage/."""
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}'
        layer = b"bench layer\n"
        for blob in (config, layer):
            data = self.path(BlobData(digest_bytes(blob)))
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_bytes(blob)
            self.link(name, digest_bytes(blob))

        def descriptor(media_type: str, blob: bytes) -> dict[str, object]:
            return {"mediaType": media_type, "digest": str(digest_bytes(blob)), "size": len(blob)}

        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor("application/vnd.oci.image.config.v1+json", config),
                "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
            }
        ).encode()
        repo = Registry(FilesystemDriver(self.root)).repository(name)
        return await repo.manifests.put(manifest)
