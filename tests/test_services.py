"""The service-level contract, run on every source (the `source` fixture in conftest.py, a
support/sources.py `Source`: in memory, a filesystem root, an S3 bucket on moto, and the
remote registry against the real docker-registry).

The calls are the ones regfs/tree.py and regfs/handles.py make (storage/api.py writes them
down). What a source legitimately cannot do is in `source.cannot` (support/sources.py), and the
tests assert its documented fallback there instead of skipping; everything else every source
must pass alike.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from support.oci import image_manifest
from support.registry import OCI_INDEX, OCI_MANIFEST
from support.tools import MIB

import storage.registry
from storage.digests import EMPTY_DIGEST, Digest, digest_bytes
from storage.drivers.filesystem import FilesystemDriver
from storage.errors import (
    DigestMismatch,
    InvalidManifest,
    InvalidName,
    InvalidOffset,
    NotEmpty,
    StorageError,
    UnknownLayer,
    UnknownManifest,
    UnknownRepository,
    UnknownTag,
    UnknownUpload,
)
from storage.registry import Registry

pytestmark = pytest.mark.storage

if TYPE_CHECKING:
    from support.sources import Source

    from storage.api import Repository, Upload

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
PIECE = 64 << 10  # a FUSE-sized write
NOWHERE = Digest.parse("sha256:" + "0" * 64)
NO_UUID = "00000000-0000-4000-8000-000000000000"


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def write_pieces(upload: Upload, data: bytes, start: int = 0) -> None:
    """Write data from `start` as the kernel does: in order, PIECE bytes at a time."""
    for at in range(0, len(data), PIECE):
        await upload.write_at(start + at, data[at : at + PIECE])


async def push(repo: Repository, data: bytes) -> Digest:
    """A blob pushed through an upload, as `cp x uploads/sha256:...` does."""
    upload = await repo.layers.upload()
    await write_pieces(upload, data)
    return (await upload.finish(digest_bytes(data))).digest


async def push_image(repo: Repository, seed: int = 0) -> tuple[bytes, list[Digest]]:
    """An OCI image manifest (not stored yet) and the config and layer it names (pushed)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layer = blob(1000, seed)
    blobs = [await push(repo, config), await push(repo, layer)]
    return image_manifest(config, [layer], layer_type=LAYER_TYPE), blobs


async def repo_with_tag(repo: Repository) -> Digest:
    """Tag `v1` on a pushed image: a repository holding something by every source's API."""
    digest = await repo.manifests.put((await push_image(repo))[0])
    await repo.tags.put("v1", digest)
    return digest


# --------------------------------------------------------------------------- layers, uploads


async def test_pushed_blob_reads_back_at_any_offset(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    data = blob(300_000)
    digest = digest_bytes(data)
    upload = await repo.layers.upload()
    await write_pieces(upload, data)
    assert upload.size == len(data)
    assert await upload.digest() == digest
    info = await upload.finish(digest)
    assert (info.digest, info.size) == (digest, len(data))
    assert upload.uuid not in await repo.layers.uploads()

    assert (await repo.layers.stat(digest)).size == len(data)
    assert await repo.layers.exists(digest)
    reader = await repo.layers.fetch(digest)
    try:
        for offset, size in [(0, 1), (1, PIECE), (123_456, 100_000), (len(data) - 10, 4096)]:
            assert bytes(await reader.read_at(offset, size)) == data[offset : offset + size]
        assert bytes(await reader.read_at(len(data), 10)) == b""
    finally:
        await reader.aclose()


async def test_concurrent_reads(source: Source) -> None:
    """The kernel sends a file's reads several at a time, and other files' reads beside
    them: every one gets its own bytes."""
    repo = source.registry.repository(source.name("app"))
    data = blob(MIB, seed=4)
    digest = await push(repo, data)
    readers = [await repo.layers.fetch(digest) for _ in range(2)]
    got: dict[tuple[int, int], bytes] = {}

    async def read(which: int, at: int) -> None:
        got[which, at] = bytes(await readers[which].read_at(at, PIECE))

    try:
        async with trio.open_nursery() as nursery:
            for at in range(0, len(data), PIECE):
                for which in (0, 1):
                    nursery.start_soon(read, which, at)
    finally:
        for reader in readers:
            await reader.aclose()
    assert got == {(w, at): data[at : at + PIECE] for w, at in got}
    assert len(got) == 2 * len(data) // PIECE


async def test_flush_makes_writes_visible(source: Source) -> None:
    """close-to-open: once flush returns, another view (another process) sees the bytes
    as the upload's size, before the writer closes."""
    name = source.name("app")
    upload = await source.registry.repository(name).layers.upload()
    await write_pieces(upload, blob(100_000, seed=5))
    await upload.flush()
    other = source.reopen().repository(name).layers
    assert (await other.upload_info(upload.uuid)).size == 100_000
    assert upload.name == name
    assert abs(upload.started_at.timestamp() - time.time()) < 60
    await upload.close()


async def test_empty_blob(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    upload = await repo.layers.upload()
    info = await upload.finish(EMPTY_DIGEST)
    assert (str(info.digest), info.size) == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        0,
    )
    assert await repo.layers.exists(EMPTY_DIGEST)
    reader = await repo.layers.fetch(EMPTY_DIGEST)
    try:
        assert bytes(await reader.read_at(0, 10)) == b""
    finally:
        await reader.aclose()


async def test_upload_resumes_in_a_reopened_registry(source: Source) -> None:
    """What a remount (or a crash) finds: the upload, its name, its size; it goes on and
    finishes there. 9 MiB: the remote source sends more than one PATCH."""
    name = source.name("app")
    data = blob(9 * MIB + 1, seed=1)
    half = 5 * MIB
    upload = await source.registry.repository(name).layers.upload(label="part")
    await write_pieces(upload, data[:half])
    await upload.close()

    layers = source.reopen().repository(name).layers
    assert await layers.uploads() == [upload.uuid]
    assert await layers.label(upload.uuid) == "part"
    assert (await layers.upload_info(upload.uuid)).size == half
    resumed = await layers.resume(upload.uuid)
    assert resumed.size == half
    with pytest.raises(InvalidOffset):
        await resumed.write_at(half + 1, b"a gap")
    await write_pieces(resumed, data[half:], start=half)
    assert (await resumed.finish(digest_bytes(data))).size == len(data)
    assert await layers.uploads() == []
    reader = await layers.fetch(digest_bytes(data))
    try:  # as `cat` reads: in order (the remote source reads ahead and checks the digest)
        read = [await reader.read_at(at, MIB) for at in range(0, len(data), MIB)]
        assert b"".join(read) == data
    finally:
        await reader.aclose()


async def test_wrong_digest_is_refused_and_the_upload_stays(source: Source) -> None:
    layers = source.registry.repository(source.name("app")).layers
    data = blob(70_000, seed=2)
    upload = await layers.upload()
    await write_pieces(upload, data)
    wrong = digest_bytes(data + b"x")
    with pytest.raises(DigestMismatch) as refused:
        await upload.finish(wrong)
    assert str(wrong) in str(refused.value) and str(digest_bytes(data)) in str(refused.value)
    await upload.close()
    assert await layers.uploads() == [upload.uuid]
    assert (await layers.upload_info(upload.uuid)).size == len(data)
    assert not await layers.exists(wrong)

    resumed = await layers.resume(upload.uuid)
    assert (await resumed.finish(digest_bytes(data))).digest == digest_bytes(data)


async def test_wrong_size_is_refused(source: Source) -> None:
    layers = source.registry.repository(source.name("app")).layers
    upload = await layers.upload()
    await upload.write_at(0, b"twelve bytes")
    with pytest.raises(DigestMismatch):
        await upload.finish(digest_bytes(b"twelve bytes"), size=11)
    assert not await layers.exists(digest_bytes(b"twelve bytes"))
    assert await layers.uploads() == [upload.uuid]  # it stays, and finishes when right
    assert (await upload.finish(digest_bytes(b"twelve bytes"), size=12)).size == 12


async def test_cancel(source: Source) -> None:
    """rm uploads/x: the upload goes, whether it is the writer's or a resumed one."""
    layers = source.registry.repository(source.name("app")).layers
    writing = await layers.upload()
    await writing.write_at(0, b"some bytes")
    closed = await layers.upload()
    await closed.write_at(0, b"other bytes")
    await closed.close()
    assert sorted(await layers.uploads()) == sorted([writing.uuid, closed.uuid])

    await writing.cancel()
    await (await layers.resume(closed.uuid)).cancel()
    assert await layers.uploads() == []
    for uuid in (writing.uuid, closed.uuid):
        with pytest.raises(UnknownUpload):
            await layers.resume(uuid)
    assert not await layers.exists(digest_bytes(b"some bytes"))


async def test_write_below_the_end(source: Source) -> None:
    layers = source.registry.repository(source.name("app")).layers
    data = blob(100_000, seed=3)
    upload = await layers.upload()
    await write_pieces(upload, data)
    if source.can("write_below_the_end"):
        await upload.write_at(10, b"XXXXX")
        data = data[:10] + b"XXXXX" + data[15:]
    else:  # CANNOT[kind]["write_below_the_end"]: refused, nothing changes
        with pytest.raises(InvalidOffset):
            await upload.write_at(10, b"XXXXX")
    assert upload.size == len(data)
    assert (await upload.finish(digest_bytes(data))).digest == digest_bytes(data)


async def test_truncate_restarts_the_upload(source: Source) -> None:
    """open(O_TRUNC) on an upload: it starts again under the same name."""
    layers = source.registry.repository(source.name("app")).layers
    upload = await layers.upload(label="again")
    await upload.write_at(0, b"first try")
    await upload.truncate(0)
    assert upload.size == 0
    await upload.write_at(0, b"second")
    assert (await upload.finish(digest_bytes(b"second"))).size == 6


async def test_truncate_cuts(source: Source) -> None:
    layers = source.registry.repository(source.name("app")).layers
    data = blob(10_000, seed=6)
    upload = await layers.upload()
    await upload.write_at(0, data)
    with pytest.raises(InvalidOffset):
        await upload.truncate(len(data) + 1)
    if source.can("cut"):
        await upload.truncate(4000)
        data = data[:4000]
    else:  # REMOTE_CANNOT["cut"]: refused, nothing changes
        with pytest.raises(InvalidOffset):
            await upload.truncate(4000)
    assert upload.size == len(data)
    assert (await upload.finish(digest_bytes(data))).size == len(data)


async def test_truncate_keeps_the_upload_id(source: Source) -> None:
    """The mount's node holds the uuid: after O_TRUNC the upload is the same one, for this
    view and for a remounted one, which resumes it at 0."""
    name = source.name("app")
    layers = source.registry.repository(name).layers
    upload = await layers.upload(label="part")
    uuid = upload.uuid
    await upload.write_at(0, b"first try")
    await upload.flush()
    await upload.truncate(0)
    assert upload.uuid == uuid
    assert await layers.uploads() == [uuid]
    await upload.write_at(0, b"second")
    await upload.close()

    other = source.reopen().repository(name).layers
    assert (await other.label(uuid), (await other.upload_info(uuid)).size) == ("part", 6)
    resumed = await other.resume(uuid)
    await resumed.truncate(0)
    await resumed.write_at(0, b"third")
    assert (await resumed.finish(digest_bytes(b"third"))).size == 5
    assert await other.uploads() == []


async def test_read_upload_back(source: Source) -> None:
    layers = source.registry.repository(source.name("app")).layers
    upload = await layers.upload()
    await upload.write_at(0, b"so far")
    await upload.close()
    reader = await layers.read_upload(upload.uuid)
    try:
        if source.can("read_upload"):
            assert bytes(await reader.read_at(0, 100)) == b"so far"
        else:  # REMOTE_CANNOT["read_upload"]: an error (EIO through a mount), never empty
            with pytest.raises(StorageError, match="cannot read an upload back"):
                await reader.read_at(0, 100)
            assert bytes(await reader.read_at(6, 100)) == b""  # past its end: its end
    finally:
        await reader.aclose()


async def test_upload_labels(source: Source) -> None:
    layers = source.registry.repository(source.name("app")).layers
    named = await layers.upload(label="layer.tar")
    unnamed = await layers.upload()
    assert await layers.label(named.uuid) == "layer.tar"
    assert await layers.label(unnamed.uuid) is None
    await layers.set_label(unnamed.uuid, "config.json")
    assert await layers.label(unnamed.uuid) == "config.json"
    info = await layers.upload_info(named.uuid)
    assert (info.uuid, info.size) == (named.uuid, 0)
    for upload in (named, unnamed):
        await upload.close()


async def test_label_of_a_cancelled_upload_is_none(source: Source) -> None:
    layers = source.registry.repository(source.name("app")).layers
    upload = await layers.upload(label="layer.tar")
    await upload.cancel()
    assert await layers.label(upload.uuid) is None
    assert await layers.label(NO_UUID) is None


async def test_layers_list_and_unlink(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    kept, gone = await push(repo, b"kept"), await push(repo, b"gone")
    assert sorted(await repo.layers.list()) == sorted([kept, gone])
    await repo.layers.unlink(gone)
    with pytest.raises(UnknownLayer):
        await repo.layers.stat(gone)
    assert not await repo.layers.exists(gone)
    assert await repo.layers.exists(kept)
    with pytest.raises(UnknownLayer):
        await repo.layers.unlink(NOWHERE)


async def test_unlinked_layer_leaves_the_listing(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    digest = await push(repo, b"gone")
    await repo.layers.unlink(digest)
    assert await repo.layers.list() == []


async def test_layers_listed_by_another_view(source: Source) -> None:
    """A remounted daemon lists the repository's blobs; the remote source only those a
    tagged manifest names (REMOTE_CANNOT["list_untagged"])."""
    name = source.name("app")
    repo = source.registry.repository(name)
    manifest, blobs = await push_image(repo)
    loose = await push(repo, b"named by no manifest")
    other = source.reopen().repository(name)
    if source.can("list_untagged"):
        assert sorted(await other.layers.list()) == sorted([*blobs, loose])
    else:
        assert await other.layers.list() == []
    await repo.tags.put("v1", await repo.manifests.put(manifest))
    listed = sorted(await other.layers.list())
    assert listed == sorted([*blobs, loose] if source.can("list_untagged") else blobs)


# --------------------------------------------------------------------------- manifests, tags


async def test_manifest_put_get(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    manifest, _ = await push_image(repo)
    digest = await repo.manifests.put(manifest)
    assert digest == digest_bytes(manifest)
    got = await source.reopen().repository(repo.name).manifests.get(digest)
    assert (got.digest, got.media_type, got.data) == (digest, OCI_MANIFEST, manifest)
    assert (await repo.manifests.stat(digest)).size == len(manifest)
    assert await repo.manifests.exists(digest)


async def test_manifest_naming_a_missing_blob_is_refused(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    manifest, blobs = await push_image(repo)
    broken = manifest.replace(str(blobs[1]).encode(), str(NOWHERE).encode())
    with pytest.raises(InvalidManifest):
        await repo.manifests.put(broken)
    assert not await repo.manifests.exists(digest_bytes(broken))


async def test_index_needs_its_children(source: Source) -> None:
    """A multi-arch index is stored once its child manifests are, and its tag makes the
    children's blobs listed (walked through the index on the remote source)."""
    name = source.name("multi")
    repo = source.registry.repository(name)
    child, blobs = await push_image(repo)
    entry = {"mediaType": OCI_MANIFEST, "digest": str(digest_bytes(child)), "size": len(child)}
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]})
    with pytest.raises(InvalidManifest):
        await repo.manifests.put(index.encode())
    await repo.manifests.put(child)
    digest = await repo.manifests.put(index.encode())
    await repo.tags.put("v1", digest)
    got = await repo.manifests.get(await repo.tags.get("v1"))
    assert (got.digest, got.media_type, got.data) == (digest, OCI_INDEX, index.encode())
    assert sorted(await source.reopen().repository(name).layers.list()) == sorted(blobs)


async def test_manifests_list(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    manifest, _ = await push_image(repo)
    digest = await repo.manifests.put(manifest)
    # REMOTE_CANNOT["list_untagged"]: an untagged manifest is not listed there.
    assert await repo.manifests.list() == ([digest] if source.can("list_untagged") else [])
    await repo.tags.put("v1", digest)
    assert await repo.manifests.list() == [digest]


async def test_tags(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    first = await repo.manifests.put((await push_image(repo, seed=1))[0])
    second = await repo.manifests.put((await push_image(repo, seed=2))[0])
    await repo.tags.put("v1", first)
    await repo.tags.put("latest", first)
    assert sorted(await repo.tags.list()) == ["latest", "v1"]
    assert await repo.tags.get("v1") == first

    await repo.tags.put("latest", second)  # a retag moves it
    assert await repo.tags.get("latest") == second
    assert await source.reopen().repository(repo.name).tags.get("latest") == second

    with pytest.raises(InvalidName):
        await repo.tags.get("-not-a-tag")


async def test_tag_delete(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    digest = await repo_with_tag(repo)
    await repo.tags.put("latest", digest)
    if not source.can("delete_tag"):  # REMOTE_CANNOT["delete_tag"]: refused, tag stays
        with pytest.raises(PermissionError):
            await repo.tags.delete("v1")
        assert sorted(await repo.tags.list()) == ["latest", "v1"]
        return
    await repo.tags.delete("v1")
    assert await repo.tags.list() == ["latest"]
    with pytest.raises(UnknownTag):
        await repo.tags.get("v1")
    with pytest.raises(UnknownTag):
        await repo.tags.delete("v1")
    assert await repo.manifests.exists(digest)  # untagging keeps the manifest


async def test_manifest_delete_takes_its_tags(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    doomed = await repo.manifests.put((await push_image(repo, seed=1))[0])
    kept = await repo.manifests.put((await push_image(repo, seed=2))[0])
    for tag, digest in (("v1", doomed), ("also", doomed), ("other", kept)):
        await repo.tags.put(tag, digest)

    await repo.manifests.delete(doomed)
    assert await repo.tags.list() == ["other"]
    for tag in ("v1", "also"):
        with pytest.raises(UnknownTag):
            await repo.tags.get(tag)
    with pytest.raises(UnknownManifest):
        await repo.manifests.get(doomed)
    with pytest.raises(UnknownManifest):
        await repo.manifests.delete(doomed)
    assert await repo.tags.get("other") == kept
    # REMOTE_CANNOT["delete_tag"]: refused there, whether the tag is there or not.
    with pytest.raises(UnknownTag if source.can("delete_tag") else PermissionError):
        await repo.tags.delete("v1")


async def test_manifest_delete_names_the_tags_that_went(source: Source) -> None:
    """tree.remove forgets the cached tags delete() returns: `rm manifests/<d>` must not
    leave `tags/v1` showing a manifest that is gone."""
    repo = source.registry.repository(source.name("app"))
    digest = await repo_with_tag(repo)
    await repo.tags.put("v2", digest)
    await repo.tags.put("other", await repo.manifests.put((await push_image(repo, seed=3))[0]))
    assert sorted(await repo.manifests.delete(digest)) == ["v1", "v2"]
    assert await repo.tags.list() == ["other"]


async def test_unknown_things(source: Source) -> None:
    repo = source.registry.repository(source.name("app"))
    await push(repo, b"something, so the repository exists")
    with pytest.raises(UnknownLayer):
        await repo.layers.stat(NOWHERE)
    with pytest.raises(UnknownLayer):
        await repo.layers.fetch(NOWHERE)
    assert not await repo.layers.exists(NOWHERE)
    with pytest.raises(UnknownUpload):
        await repo.layers.resume(NO_UUID)
    with pytest.raises(UnknownUpload):
        await repo.layers.upload_info(NO_UUID)
    with pytest.raises(UnknownTag):
        await repo.tags.get("nope")
    with pytest.raises(UnknownManifest):
        await repo.manifests.get(NOWHERE)
    with pytest.raises(UnknownManifest):
        await repo.manifests.delete(NOWHERE)
    assert not await repo.manifests.exists(NOWHERE)
    nowhere = source.registry.repository(source.name("never/pushed"))
    assert await nowhere.tags.list() == []
    with pytest.raises(UnknownTag):
        await nowhere.tags.get("latest")
    with pytest.raises(InvalidName):
        source.registry.repository("Not/A/Name")


async def test_times_are_nanoseconds_up_to_now(source: Source) -> None:
    """What stat(2) shows: an mtime in nanoseconds (not seconds: a 1970 date), never in the
    future; the remote source says the mount's start, as it cannot say when."""
    repo = source.registry.repository(source.name("app"))
    layer = await push(repo, b"a layer")
    digest = await repo_with_tag(repo)
    upload = await repo.layers.upload()
    since_2020 = 1_577_836_800 * 10**9
    times = [
        (await repo.layers.stat(layer)).mtime_ns,
        (await repo.manifests.stat(digest)).mtime_ns,
        await repo.tags.mtime_ns("v1"),
        (await repo.layers.upload_info(upload.uuid)).started_ns,
    ]
    now = time.time_ns()
    assert all(since_2020 < t <= now for t in times), times
    await upload.close()


# --------------------------------------------------------------------------- catalog


async def test_catalog(source: Source) -> None:
    registry, prefix = source.registry, source.prefix
    made = source.name("made/by/mkdir")
    await registry.create_repository(made)
    await push(registry.repository(source.name("pushed")), b"a layer")

    catalog = registry.catalog
    assert prefix in await catalog.children()
    assert sorted(await catalog.children(prefix)) == ["made", "pushed"]
    assert await catalog.children(source.name("made/by")) == ["mkdir"]
    assert await catalog.is_repository(made)
    assert await catalog.is_repository(source.name("pushed"))
    assert not await catalog.is_repository(source.name("made"))
    assert await catalog.exists(source.name("made"))
    assert not await catalog.exists(source.name("nothing"))
    assert {made, source.name("pushed")} <= set(await catalog.repositories())
    # Paginated (`_catalog?n=&last=`): what follows `made` is the other name under prefix.
    assert await catalog.repositories(n=1, last=made) == [source.name("pushed")]


async def test_repository_holding_only_an_upload(source: Source) -> None:
    """An interrupted first push: its uploads must be reachable, yet it is no repository
    for the registry's catalog."""
    name = source.name("first/push")
    await (await source.registry.repository(name).layers.upload()).close()
    catalog = source.registry.catalog
    assert await catalog.is_repository(name, with_uploads=True)
    assert not await catalog.is_repository(name)
    assert await catalog.children(source.name("first")) == ["push"]
    assert name not in await catalog.repositories()
    await push(source.registry.repository(name), b"a layer")  # now it is one
    assert await catalog.is_repository(name)
    assert name in await catalog.repositories()


async def test_remove_repository(source: Source) -> None:
    registry = source.registry
    empty, full = source.name("empty"), source.name("full")
    await registry.create_repository(empty)
    await registry.create_repository(full)
    await repo_with_tag(registry.repository(full))

    await registry.remove_repository(empty)
    assert not await registry.catalog.is_repository(empty)
    assert await registry.catalog.children(source.prefix) == ["full"]
    with pytest.raises(NotEmpty):
        await registry.remove_repository(full)


async def test_an_emptied_repository_is_removed(source: Source) -> None:
    """What `rm -r` through a mount leaves (the manifest and its tag deleted, every layer
    unlinked: on a storage root, empty directories only) is removed by rmdir; the blobs
    stay. In a bucket it is gone with its last key already (S3 keeps no directory)."""
    name = source.name("emptied")
    repo = source.registry.repository(name)
    digest = await repo_with_tag(repo)
    layers = await repo.layers.list()
    await repo.manifests.delete(digest)
    for layer in layers:
        with pytest.raises(NotEmpty):  # a layer link is something
            await source.registry.remove_repository(name)
        await repo.layers.unlink(layer)
    if not source.can("remove_repository"):
        with pytest.raises(NotEmpty):
            await source.registry.remove_repository(name)
        return
    if source.kind == "s3":
        with pytest.raises(UnknownRepository):
            await source.registry.remove_repository(name)
    else:
        await source.registry.remove_repository(name)
    assert not await source.registry.catalog.is_repository(name)
    for layer in layers:
        assert (await source.registry.blobs.stat(layer)).digest == layer


async def test_rmdir_looks_through_a_bounded_number_of_empty_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a storage root the registry's DELETE leaves an empty directory per digest; one
    holding more entries than EMPTIED_ENTRIES_MAX is taken for full, so a hostile tree of a
    million empty directories is not walked whole."""
    registry = Registry(FilesystemDriver(tmp_path))
    await registry.create_repository("org/app")
    repo = tmp_path / "docker/registry/v2/repositories/org/app"
    for i in range(3):
        (repo / "_layers/sha256" / f"{i:064x}").mkdir(parents=True)
        (repo / "_manifests/revisions/sha256" / f"{i:064x}").mkdir(parents=True)
    monkeypatch.setattr(storage.registry, "EMPTIED_ENTRIES_MAX", 6)
    with pytest.raises(NotEmpty):
        await registry.remove_repository("org/app")
    monkeypatch.setattr(storage.registry, "EMPTIED_ENTRIES_MAX", 100)
    (repo / "_manifests/revisions/sha256" / f"{1:064x}" / "link").write_bytes(b"x")
    with pytest.raises(NotEmpty):  # a file anywhere is something
        await registry.remove_repository("org/app")
    (repo / "_manifests/revisions/sha256" / f"{1:064x}" / "link").unlink()
    await registry.remove_repository("org/app")
    assert not repo.exists()


async def test_repository_holding_a_layer_is_not_removed(source: Source) -> None:
    name = source.name("layer/only")
    await source.registry.create_repository(name)
    await push(source.registry.repository(name), b"a layer")
    with pytest.raises(NotEmpty):
        await source.registry.remove_repository(name)


async def test_remove_unknown_repository(source: Source) -> None:
    with pytest.raises(UnknownRepository):
        await source.registry.remove_repository(source.name("never"))
