"""Storage roots built through `storage/`, for tests that mount or check them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver
from storage.paths import RepositoryDir, TagCurrentLink, TagIndexLink, path_for
from storage.registry import Registry
from support.images import Entry, layer_tar
from support.oci import image_manifest, sha256_digest

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


async def put_layer_image(root: Path, name: str, tag: str, entries: list[Entry]) -> bytes:
    """An image of one plain tar layer of `entries`, its config naming the layer's diff_id
    (what rootfs/<tag> shows), stored through storage/ and tagged `tag`; its manifest."""
    tar = layer_tar(entries)
    rootfs = {"type": "layers", "diff_ids": [sha256_digest(tar)]}
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}).encode()
    await link_blobs(root, name, [config, tar])
    manifest = image_manifest(config, [tar])
    await put_tagged(root, name, tag, manifest)
    return manifest


def variants(image: dict, count: int) -> list[bytes]:
    """`count` distinct manifests of build_root's `image` (an annotation each, sizes that
    differ from its own manifest's): a tag moved to one shows other bytes and size."""
    config, layer = image["blobs"][image["config"]], image["blobs"][image["layer"]]
    notes = ({"org.example.variant": f"v{i:03d}"} for i in range(count))
    return [image_manifest(config, [layer], "application/octet-stream", [n]) for n in notes]


def write_tags(root: Path, name: str, digest: str, tags: Iterable[str], index: bool = True) -> None:
    """Tags of repository `name` on manifest `digest`, their link files written directly in
    the registry's layout (the current link, and the index link too unless `index` is
    false: regfs reads only the current one; then `digest` may be any text, a damaged
    link): 100,000 in seconds on a tmpfs, for tests of big listings. A tag already there
    is pointed at `digest`."""
    kinds = [TagCurrentLink(name, "-")]
    if index:
        kinds.append(TagIndexLink(name, "-", Digest.parse(digest)))
    paths = [path_for(kind).split("/-/") for kind in kinds]
    tags_dir = root / paths[0][0].lstrip("/")
    tags_dir.mkdir(parents=True, exist_ok=True)
    links = [below for _, below in paths]  # current/link, index/sha256/<hex>/link
    dirs = sorted({str(up) for link in links for up in PurePosixPath(link).parents} - {"."})
    fd = os.open(tags_dir, os.O_DIRECTORY)
    try:
        for tag in tags:
            for made in ("", *dirs):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(f"{tag}/{made}", dir_fd=fd)
            for link in links:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                out = os.open(f"{tag}/{link}", flags, 0o644, dir_fd=fd)
                try:
                    os.write(out, digest.encode())
                finally:
                    os.close(out)
    finally:
        os.close(fd)


def add_repositories(root: Path, namespace: str, count: int) -> list[str]:
    """`count` empty repositories `namespace/rNNNNN`, each a `_layers` directory (what the
    registry's catalog and regfs count as one), made directly in the layout; their names."""
    names = [f"r{i:05d}" for i in range(count)]
    for name in names:
        (root / path_for(RepositoryDir(f"{namespace}/{name}")).lstrip("/") / "_layers").mkdir(
            parents=True
        )
    return names


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1g") -> Iterator[Path]:
    """A tmpfs mounted on the new directory `path` (a root of 100,000 tags is made in
    seconds there, a minute on a disk), unmounted at the end. Enter it before any mount of
    regfs over it, so that mount is gone first."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
