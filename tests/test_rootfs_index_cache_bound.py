"""`--index-cache-size` holds for the entry being stored too: a one-frame zstd layer's
re-framed copy and a gzip layer's spool (each as big as the layer) once landed whatever the
bound. The least recently used entries now go first to make room; an entry that alone passes
the bound is not kept (its copy is a nameless file of this mount's, read as before), and a
spool that would is not made (the layer is indexed in process); each is logged once."""

from __future__ import annotations

import errno
import io
import logging
import os
import random
from pathlib import Path

import pytest
import trio
from support.images import directory, file, layer_tar
from support.layers import MEDIA_TYPES, MIB, compress, every_kind_tar
from support.mounts import Mount
from support.oci import image_manifest
from support.roots import CONFIG, link_blobs
from support.tools import run

from storage.api import BlobReader, RegistrySource
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.registry import Registry
from storage.rootfs import treefile
from storage.rootfs.cache import IndexCache
from storage.rootfs.index import Indexer, LayerRef
from storage.rootfs.merge import merge
from storage.rootfs.reader import LayerFiles

REPO = "library/bound"


async def stored(registry: RegistrySource, blob: bytes, how: str) -> LayerRef:
    layers = registry.repository("t/bound").layers
    upload = await layers.upload()
    await upload.write_at(0, blob)
    digest = digest_bytes(blob)
    await upload.finish(digest)

    async def opener() -> BlobReader:
        return await layers.fetch(digest)

    return LayerRef(digest, len(blob), MEDIA_TYPES[how], opener)


def on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


@pytest.mark.storage
async def test_a_copy_that_alone_passes_the_bound_is_read_from_a_private_file(
    registry, tmp_path, caplog
):
    """A 6 MiB one-frame zstd layer under a bound of 1 MiB: nothing of it stays in the
    directory (the whole copy did, with its `.idx`), its files read right from the copy
    only this mount holds, and the small entries stored after it are kept beside it (the
    private copy is not the cache's, so it evicts none of them). Logged once."""
    raw = every_kind_tar(5, big=6 * MIB)
    layer = await stored(registry, compress(raw, "zstd"), "zstd")
    tars = [every_kind_tar(seed, big=0) for seed in (6, 7)]
    smalls = [await stored(registry, compress(tar, "gzip"), "gzip") for tar in tars]
    directory_ = tmp_path / "index"
    cache = IndexCache(directory_, max_bytes=1 * MIB)
    files = LayerFiles(cache)
    try:
        indexer = Indexer(cache)
        with caplog.at_level(logging.WARNING):
            index = await indexer.index(layer)
            assert index.reframed and index.copy is not None and index.copy.private
            assert on_disk(directory_) <= cache.max_bytes
            assert not list(directory_.glob(f"{layer.digest.hex}.*"))
            for small in smalls:
                await indexer.index(small)
        told = [r for r in caplog.records if layer.digest.hex in r.getMessage()]
        assert len(told) == 1 and "not kept" in told[0].getMessage()
        assert {p.name.split(".")[0] for p in directory_.iterdir()} == {
            s.digest.hex for s in smalls
        }
        big = next(m for m in index.members if m.path == "bin/big")
        data = await files.read(layer, index, big, 0, big.size)
        assert data == raw[big.offset : big.offset + big.size]
    finally:
        await files.aclose()
        cache.close()


@pytest.mark.storage
async def test_a_spool_counts_in_the_bound_and_one_past_it_is_not_made(tmp_path, caplog):
    """The gzip child reads a remote layer from a nameless copy in the cache directory: the
    least recently used entries now make room for it first, and it counts in the bound while
    it lives (another store evicts for it); a layer whose copy alone would pass the bound is
    indexed in process, without one (logged once), and its entry is kept if it fits."""
    registry = Registry(InMemoryDriver())  # no local file: the child needs a copy
    tars = [every_kind_tar(seed, big=0) for seed in (1, 2, 3)]
    layers = [await stored(registry, compress(tar, "gzip"), "gzip") for tar in tars]
    directory_ = tmp_path / "index"
    cache = IndexCache(directory_)
    try:
        indexer = Indexer(cache)
        for layer in layers[:2]:
            await indexer.index(layer)
        entries = on_disk(directory_)
        cache.max_bytes = layers[2].size + entries // 2  # room for the copy and one entry
        spool = cache.spool(layers[2])
        assert spool is not None
        assert on_disk(directory_) + layers[2].size <= cache.max_bytes  # one evicted first
        cache.evict()  # another store while it lives: it counts
        assert on_disk(directory_) + layers[2].size <= cache.max_bytes
        spool.close()
        cache.max_bytes = layers[2].size - 1
        with caplog.at_level(logging.INFO):
            index = await indexer.index(layers[2])
        assert "a copy of its blob" in caplog.text and "indexed in process" in caplog.text
        assert "indexed in process instead" not in caplog.text  # the child never asked
        assert index.seek_points and (directory_ / f"{layers[2].digest.hex}.idx").exists()
        assert on_disk(directory_) <= cache.max_bytes
    finally:
        cache.close()


@pytest.mark.mount
def test_through_a_mount_a_layer_past_the_bound_leaves_nothing_in_the_cache(tmp_path):
    """`--index-cache-size 1M` and an image of a one-frame zstd layer of 6 MiB: its files
    read right, twice, from a mount's private copy; the cache directory stays within the
    bound (it held the 6 MiB copy), and the log says so once."""
    big = random.Random(24).randbytes(6 * MIB)
    blob = compress(layer_tar([directory("."), file("big", big), file("small", b"z\n")]), "zstd")
    root = tmp_path / "root"

    async def put() -> None:
        await link_blobs(root, REPO, [CONFIG, blob])
        repo = Registry(FilesystemDriver(root)).repository(REPO)
        await repo.tags.put(
            "v1", await repo.manifests.put(image_manifest(CONFIG, [blob], MEDIA_TYPES["zstd"]))
        )

    trio.run(put)
    cache = tmp_path / "xdg" / "regfs" / "index"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        m = Mount(str(root), tmp_path / "mnt", tmp_path / "regfs.log", ["--index-cache-size", "1M"])
        with m:
            image = m.path(*REPO.split("/"), "rootfs", "v1")
            run("ls", image)
            for _ in range(2):
                assert (image / "big").read_bytes() == big
            assert (image / "small").read_bytes() == b"z\n"
            assert on_disk(cache) <= 1 << 20
            assert not list(cache.glob(f"{digest_bytes(blob).hex}.*"))
            assert m.log_text().count("alone passes the index cache's bound") == 1
    m.check_log()


@pytest.mark.storage
async def test_a_merged_tree_lands_only_once_eviction_made_room_for_it(tmp_path):
    """`store_tree` renamed the tree into the directory and evicted afterwards: for that
    moment the cache held more than its bound. The least recently used entry (a layer of
    another image) is now evicted first, and the tree's name appears with the bound kept."""
    registry = Registry(InMemoryDriver())
    tars = [layer_tar([directory(f"d{n}"), file(f"d{n}/f", b"x" * n * 999)]) for n in (1, 2, 3)]
    layers = [await stored(registry, compress(tar, "gzip"), "gzip") for tar in tars]
    directory_ = tmp_path / "index"
    indexing = IndexCache(directory_)
    try:
        indexes = [await Indexer(indexing).index(layer) for layer in layers]
    finally:
        indexing.close()
    image, tables = [lay.digest for lay in layers[1:]], [i.members for i in indexes[1:]]
    del indexes  # no entry held open by an index in memory: each may be evicted
    other = layers[0].digest.hex  # the oldest entry, of another image
    for path in directory_.glob(f"{other}.*"):
        os.utime(path, (1, 1))
    cache = IndexCache(directory_)
    try:
        tree = merge(tables)
        encoded = io.BytesIO()
        treefile.encode(tree, tables, encoded)
        cache.max_bytes = on_disk(directory_) + len(encoded.getvalue()) - 1
        seen: list[int] = []
        rename = cache._rename

        def watched(temp: str, name: str) -> None:
            rename(temp, name)
            seen.append(on_disk(directory_))

        cache._rename = watched  # type: ignore[method-assign]
        cache.store_tree(image, tables, tree)
        assert (directory_ / f"{treefile.key(image)}.tree").exists()
        assert not list(directory_.glob(f"{other}.*"))  # evicted to make room
        assert seen and max(seen) <= cache.max_bytes
    finally:
        cache.close()


@pytest.mark.storage
async def test_a_spool_is_let_go_when_its_pass_fails_before_the_child(tmp_path, monkeypatch):
    """A remote gzip layer's nameless copy counts in the bound while it is open: a failure
    between making it and the child's start (the `.gzi` file cannot be made) left it to a
    garbage collection, counted meanwhile, while the error's traceback still held it."""
    registry = Registry(InMemoryDriver())  # no local file: the child needs a copy
    layer = await stored(registry, compress(every_kind_tar(4, big=MIB), "gzip"), "gzip")
    directory_ = tmp_path / "index"
    cache = IndexCache(directory_)

    def no_room(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "pending", no_room)
    try:
        with pytest.raises(Exception) as failed:
            await Indexer(cache).index(layer)
        assert failed.value is not None  # the traceback, and its frames, still alive
        assert cache.evict() == on_disk(directory_)  # no nameless copy counted
    finally:
        cache.close()
