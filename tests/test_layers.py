"""The seeds' LayerService scenarios, plus resume, overwrite and hash-state behaviour."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tarfile
import threading
import time

import pytest
import trio
from support.oci import empty_image

from storage.digests import Digest, Sha256State, digest_bytes
from storage.drivers import FilesystemDriver, PathNotFound
from storage.errors import (
    CorruptEntry,
    DigestMismatch,
    InvalidOffset,
    UnknownLayer,
    UnknownUpload,
    UnsafeEntry,
)
from storage.paths import (
    BlobData,
    BlobDir,
    HashState,
    HashStatesDir,
    LayerLink,
    UploadData,
    UploadStartedAt,
    path_for,
)
from storage.registry import Registry

pytestmark = pytest.mark.storage


def random_tarball(size: int = 200_000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        payload = os.urandom(size)
        info = tarfile.TarInfo("random.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


async def test_simple_layer_upload(registry):
    layers = registry.repository("foo/bar").layers
    upload = await layers.upload()
    await upload.cancel()
    with pytest.raises(UnknownUpload):
        await layers.resume(upload.uuid)

    data = random_tarball()
    digest = digest_bytes(data)
    upload = await layers.upload()
    await upload.write(data)
    assert upload.seek(0, os.SEEK_END) == len(data)
    assert upload.seek(-100, os.SEEK_CUR) == len(data) - 100
    upload.seek(0, os.SEEK_END)
    await upload.close()

    upload = await layers.resume(upload.uuid)
    assert upload.size == len(data)
    info = await upload.finish(digest)
    assert (info.digest, info.size) == (digest, len(data))
    with pytest.raises(UnknownUpload):
        await layers.resume(upload.uuid)
    assert await layers.exists(digest)

    async with await layers.fetch(digest) as reader:
        assert reader.length == len(data)
        assert digest_bytes(await reader.read()) == digest


async def test_simple_layer_read(registry):
    layers = registry.repository("foo/bar").layers
    data = random_tarball(50_000)
    digest = digest_bytes(data)
    with pytest.raises(UnknownLayer):
        await layers.fetch(digest)
    upload = await layers.upload()
    await upload.write(data)
    await upload.finish(digest)

    reader = await layers.fetch(digest)
    assert await reader.read() == data
    assert reader.seek(0) == 0
    assert await reader.read(10) == data[:10]
    assert reader.seek(-5, os.SEEK_END) == len(data) - 5
    assert await reader.read() == data[-5:]
    assert reader.seek(-10, os.SEEK_CUR) == len(data) - 10
    assert await reader.read(4) == data[-10:-6]
    with pytest.raises(InvalidOffset):
        reader.seek(-1)
    assert reader.created_ns > 0
    await reader.aclose()


async def test_mismatch_keeps_the_upload(registry):
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    await upload.write(b"some content")
    wrong = digest_bytes(b"other content")
    with pytest.raises(DigestMismatch) as err:
        await upload.finish(wrong)
    assert str(wrong) in str(err.value) and str(digest_bytes(b"some content")) in str(err.value)
    assert not await registry.blobs.exists(wrong)
    await upload.close()
    resumed = await layers.resume(upload.uuid)
    assert resumed.size == len(b"some content")
    await resumed.finish(digest_bytes(b"some content"))


async def test_finish_deduplicates_existing_blob(registry):
    data = b"shared layer"
    digest = digest_bytes(data)
    for name in ("one", "two"):
        layers = registry.repository(name).layers
        upload = await layers.upload()
        await upload.write(data)
        await upload.finish(digest)
        assert await layers.exists(digest)
    assert await registry.driver.get_content(path_for(BlobData(digest))) == data


async def test_overwrite_below_end_rehashes(registry, monkeypatch):
    monkeypatch.setattr("storage.uploads.CHECKPOINT", 1000)
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    data = bytearray(os.urandom(5000))
    states = path_for(HashStatesDir("foo", upload.uuid))
    await upload.write(bytes(data))
    assert await registry.driver.list(states) == ["0"]  # the one at 5000 is in the background
    # Below the end: the checkpoint at 5000 is saved first, then deleted by the rewind.
    await upload.write_at(2500, b"X" * 100)
    assert await registry.driver.list(states) == ["0", "2600"]  # a checkpoint of the new bytes
    data[2500:2600] = b"X" * 100
    assert upload.size == 5000
    with pytest.raises(InvalidOffset):
        await upload.write_at(5001, b"gap")
    await upload.write_at(5000, b"tail")
    data += b"tail"
    await upload.close()
    upload = await layers.resume(upload.uuid)
    assert await upload.digest() == digest_bytes(bytes(data))
    await upload.finish(digest_bytes(bytes(data)))


async def test_close_saves_state_and_resume_does_not_reread(registry):
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    head = os.urandom(100_000)
    await upload.write(head)
    await upload.close()
    driver = registry.driver
    offsets = await driver.list(path_for(HashStatesDir("foo", upload.uuid)))
    assert offsets == ["0", "100000"]
    saved = await driver.get_content(path_for(HashState("foo", upload.uuid, 100_000)))
    assert Sha256State.unmarshal(saved).size == 100_000

    # Scribble over the stored head: a resume that re-read it would get a wrong digest.
    writer = await driver.writer(path_for(UploadData("foo", upload.uuid)))
    await writer.write_at(0, b"\0" * 1000)
    await writer.aclose()
    resumed = await layers.resume(upload.uuid)
    assert resumed.hashed_size == 100_000
    await resumed.write(b"tail")
    await resumed.finish(digest_bytes(head + b"tail"))


async def test_resume_falls_back_below_a_bad_state(registry):
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    data = os.urandom(10_000)
    await upload.write(data)
    await upload.close()
    await registry.driver.put_content(path_for(HashState("foo", upload.uuid, 10_000)), b"junk")
    resumed = await layers.resume(upload.uuid)
    assert resumed.hashed_size == 0
    await resumed.finish(digest_bytes(data))


@pytest.mark.parametrize("uuid", ["", "../../x", "nope", "0D0C5E8F-57A1-4A5C-9D0E-6F1C2B3A4D5E"])
async def test_resume_refuses_bad_ids(registry, uuid):
    with pytest.raises(UnknownUpload):
        await registry.repository("foo").layers.resume(uuid)


async def test_upload_without_startedat_is_unknown(registry):
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    await upload.close()
    await registry.driver.delete(path_for(UploadStartedAt("foo", upload.uuid)))
    with pytest.raises(UnknownUpload):
        await layers.resume(upload.uuid)


async def test_bad_startedat_is_a_corrupt_entry(registry):
    layers = registry.repository("foo").layers
    good = await layers.upload()
    bad = await layers.upload()
    await registry.driver.put_content(path_for(UploadStartedAt("foo", bad.uuid)), b"yesterday")
    with pytest.raises(CorruptEntry, match="startedat"):
        await layers.upload_info(bad.uuid)
    assert (await layers.upload_info(good.uuid)).size == 0
    assert sorted(await layers.uploads()) == sorted([good.uuid, bad.uuid])


async def test_link_to_a_collected_blob_is_unknown(registry):
    """Garbage collection deletes blobs and leaves the links to them: the registry answers
    404, so the layer is absent, not damaged."""
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    await upload.write(b"abc")
    digest = digest_bytes(b"abc")
    await upload.finish(digest)
    await registry.driver.delete(path_for(BlobData(digest)).rsplit("/", 1)[0])
    for call in (layers.fetch, layers.stat):
        with pytest.raises(UnknownLayer, match="blob is gone"):
            await call(digest)
    assert not await layers.exists(digest)
    assert await layers.list() == [digest]  # a name only; stat says it is not there


async def test_garbage_link_is_corrupt(registry):
    digest = digest_bytes(b"x")
    await registry.driver.put_content(path_for(LayerLink("foo", digest)), b"not a digest\n")
    with pytest.raises(CorruptEntry, match="not a digest link"):
        await registry.repository("foo").layers.stat(digest)
    assert await registry.repository("foo").layers.list() == [digest]


async def test_stats_of_a_listing_say_what_stat_says(registry, caplog):
    """A listing's layers and manifests stated at once (`stats`: a local root reads every
    link, then every blob, each in one driver call) give what `stat` gives; whatever `stat`
    would not answer plainly is None, and `stat` then says why (and logs it once, as before)."""
    repo = registry.repository("foo")
    digests = []
    for data in (b"one", b"two", b"three", b"four", b"five"):
        upload = await repo.layers.upload()
        await upload.write(data)
        digests.append(digest_bytes(data))
        await upload.finish(digests[-1])
    one, two, three, four, five = digests
    other = digest_bytes(b"unlinked")
    driver = registry.driver
    await driver.delete(path_for(BlobData(two)).rsplit("/", 1)[0])  # collected
    await driver.put_content(path_for(LayerLink("foo", three)), b"not a digest\n")
    await driver.put_content(path_for(LayerLink("foo", four)), str(one).encode())  # another
    asked = [one, two, three, four, five, other]
    stats = await repo.layers.stats(asked)
    local = isinstance(driver, FilesystemDriver)
    if local:
        assert stats == [await repo.layers.stat(one), None, None, None,
                         await repo.layers.stat(five), None]  # fmt: skip
        assert "symbolic link" not in caplog.text and "blob data is missing" not in caplog.text
    else:
        assert stats == [None] * len(asked)  # no cheaper way: asked one by one
    for digest, raised in ((two, UnknownLayer), (three, CorruptEntry), (four, CorruptEntry)):
        with pytest.raises(raised):
            await repo.layers.stat(digest)
    assert await repo.layers.stats([]) == []
    manifest = await empty_image(repo)
    stated = await repo.manifests.stats([manifest, other])
    assert stated == ([await repo.manifests.stat(manifest), None] if local else [None, None])


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
async def test_stats_of_a_listing_follow_no_symlink(tmp_path, openat2, caplog):
    """A listing's bulk stat opens each blobs/sha256/<xx> once and each blob below it one
    component at a time: a symlinked `data`, blob directory, fan-out directory or link
    directory is None there, never followed (the files outside, of other sizes, are not
    what it answers), and `stat` alone refuses each and logs it; a link naming another
    digest is None, and CorruptEntry alone, as before."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    registry = Registry(FilesystemDriver(root, openat2=openat2))
    layers = registry.repository("foo").layers
    digests = [await registry.blobs.put(b"layer %d" % n) for n in range(100)]
    for digest in digests:
        await layers.link(digest)
    by_fan_out: dict[str, list[Digest]] = {}
    for d in digests:
        by_fan_out.setdefault(d.hex[:2], []).append(d)
    alone = next(ds[0] for ds in by_fan_out.values() if len(ds) == 1)
    # Blobs whose fan-out directory the bulk call opens once for several.
    linked_data, linked_blob, linked_link, other, names_other = [
        d for ds in by_fan_out.values() if len(ds) > 1 for d in ds
    ][:5]
    local = {d: root / path_for(BlobDir(d)).lstrip("/") for d in digests}
    outside.mkdir()
    secret = b"a secret of another size"
    (outside / "data").write_bytes(secret)
    (outside / alone.hex).mkdir()
    (outside / alone.hex / "data").write_bytes(secret)
    (outside / "link").write_bytes(str(linked_link).encode())  # would pass, if followed
    (local[linked_data] / "data").unlink()
    (local[linked_data] / "data").symlink_to(outside / "data")
    shutil.rmtree(local[linked_blob])
    local[linked_blob].symlink_to(outside)
    fan_out = local[alone].parent
    shutil.rmtree(fan_out)
    fan_out.symlink_to(outside)
    link_dir = root / path_for(LayerLink("foo", linked_link)).lstrip("/")
    shutil.rmtree(link_dir.parent)
    link_dir.parent.symlink_to(outside)
    await registry.driver.put_content(path_for(LayerLink("foo", names_other)), str(other).encode())
    bad = {linked_data, linked_blob, alone, linked_link, names_other}

    stats = await layers.stats(digests)
    for digest, info in zip(digests, stats, strict=True):
        if digest in bad:
            assert info is None, digest
        else:
            assert info == await layers.stat(digest)
            assert info is not None and info.size == len(b"layer %d" % digests.index(digest))
    assert "symbolic link" not in caplog.text  # the bulk call logs nothing: `stat` does
    for digest in bad - {names_other}:
        with pytest.raises(UnsafeEntry):
            await layers.stat(digest)
    with pytest.raises(CorruptEntry, match="names"):
        await layers.stat(names_other)
    assert caplog.text.count("a symbolic link in the storage root") == len(bad) - 1
    assert (outside / "data").read_bytes() == secret  # nothing outside written


async def test_unlink_keeps_the_blob(registry):
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    await upload.write(b"abc")
    digest = digest_bytes(b"abc")
    await upload.finish(digest)
    await layers.unlink(digest)
    assert not await layers.exists(digest)
    assert await registry.blobs.exists(digest)
    with pytest.raises(UnknownLayer):
        await layers.unlink(digest)
    await layers.link(digest)
    assert await layers.exists(digest)


async def test_finished_upload_leaves_no_upload_dir(registry):
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    await upload.write(b"abc")
    await upload.finish(digest_bytes(b"abc"))
    assert await layers.uploads() == []
    with pytest.raises(PathNotFound):
        await registry.driver.stat(path_for(UploadData("foo", upload.uuid)))


async def test_registry_style_bogus_lower_state_is_rechecked(registry):
    """Registry 2.8 saves, for a PATCH where it had no state, a state of the new bytes alone."""
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    await upload.close()
    head, patch = os.urandom(1000), os.urandom(100)
    writer = await registry.driver.writer(path_for(UploadData("foo", upload.uuid)))
    await writer.write_at(0, head + patch)
    await writer.aclose()
    bogus = Sha256State()
    bogus.update(patch)
    await registry.driver.put_content(path_for(HashState("foo", upload.uuid, 100)), bogus.marshal())

    resumed = await layers.resume(upload.uuid)
    assert resumed.hashed_size == 100  # it starts from the bogus state…
    await resumed.finish(digest_bytes(head + patch))  # …and recovers by hashing again
    assert await layers.exists(digest_bytes(head + patch))


async def test_untrusted_state_still_reports_a_real_mismatch(registry):
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    await upload.write(b"x" * 300)
    await upload.close()
    await registry.driver.delete(path_for(HashState("foo", upload.uuid, 300)))
    resumed = await layers.resume(upload.uuid)
    with pytest.raises(DigestMismatch):
        await resumed.finish(digest_bytes(b"y" * 300))


async def test_create_empty_repository(registry):
    await registry.create_repository("org/empty")
    assert await registry.catalog.is_repository("org/empty")
    assert await registry.catalog.repositories() == ["org/empty"]
    assert await registry.repository("org/empty").layers.list() == []


async def test_upload_without_startedat_is_not_listed(registry):
    """What a registry 2.8 DELETE leaves: only `hashstates/sha256/0`. The registry does not
    know it as an upload; listing it would show an entry nothing can open or remove."""
    layers = registry.repository("foo").layers
    live = await layers.upload()
    ghost = await layers.upload()
    await ghost.cancel()
    await registry.driver.put_content(path_for(HashState("foo", ghost.uuid, 0)), b"x" * 108)
    assert await layers.uploads() == [live.uuid]
    with pytest.raises(UnknownUpload):
        await layers.upload_info(ghost.uuid)


async def test_mkdir_p_leaves_parents_namespaces(registry):
    await registry.create_repository("org")
    await registry.create_repository("org/app")
    assert not await registry.catalog.is_repository("org")
    assert await registry.catalog.repositories() == ["org/app"]
    # A parent with content stays a repository.
    upload = await registry.repository("org/app").layers.upload()
    await upload.finish(digest_bytes(b""))
    await registry.create_repository("org/app/sub")
    assert await registry.catalog.repositories() == ["org/app", "org/app/sub"]


async def test_hash_states_never_outlive_their_data(registry, monkeypatch):
    """A state at the data's size is trusted without reading the data: each one must be
    saved after a sync that began once the data it covers was written, and data is synced
    before it becomes a blob. Checkpoints sync in the background, so writes may go on
    between a sync and its state."""
    monkeypatch.setattr("storage.uploads.CHECKPOINT", 1000)
    events: list[tuple[str, int]] = []  # (what, how far the data reaches or the state's offset)
    driver = registry.driver
    real_writer, real_put, real_move = driver._writer, driver._put_content, driver._move

    async def writer(path):
        w = await real_writer(path)
        real_sync, real_write = w.sync_blocking, w.write_at

        def sync_blocking():
            events.append(("sync-begin", w.size))
            real_sync()
            events.append(("sync-end", w.size))

        async def write_at(offset, data):
            await real_write(offset, data)
            events.append(("write", offset + len(data)))

        w.sync_blocking, w.write_at = sync_blocking, write_at
        return w

    async def put_content(path, data):
        offset = int(path.rsplit("/", 1)[1]) if "/hashstates/" in path else -1
        events.append(("state" if offset >= 0 else "put", offset))
        await real_put(path, data)

    async def move(source, dest):
        events.append(("move", -1))
        await real_move(source, dest)

    monkeypatch.setattr(driver, "_writer", writer)
    monkeypatch.setattr(driver, "_put_content", put_content)
    monkeypatch.setattr(driver, "_move", move)
    upload = await registry.repository("foo").layers.upload()
    for _ in range(5):
        await upload.write(os.urandom(700))
    await upload.close()
    upload = await registry.repository("foo").layers.resume(upload.uuid)
    data = await upload.digest()
    await upload.finish(data)
    for i, (event, offset) in enumerate(events):
        if event not in ("state", "move"):
            continue
        # The write that made the data reach the state's offset (for a move: the last one).
        needed = (
            next(
                (j for j, (e, end) in enumerate(events[:i]) if e == "write" and end >= offset),
                -1,
            )
            if event == "state"
            else max((j for j, (e, _) in enumerate(events[:i]) if e == "write"), default=-1)
        )
        began = [j for j, (e, _) in enumerate(events[:i]) if e == "sync-begin" and j > needed]
        ended = [j for j, (e, _) in enumerate(events[:i]) if e == "sync-end" and j > needed]
        assert began and ended, f"{event} {offset} at {i} before a sync of its data: {events}"
    assert sum(e == "state" for e, _ in events) >= 3 and ("move", -1) in events


async def test_appends_go_on_while_a_checkpoint_syncs(registry, monkeypatch):
    """A checkpoint's sync runs in the background: appends do not wait for the disk, and
    its state is saved only once the sync is done, by a later write or by close."""
    monkeypatch.setattr("storage.uploads.CHECKPOINT", 1000)
    hold, release = threading.Event(), threading.Event()
    real_writer = registry.driver._writer

    async def writer(path):
        w = await real_writer(path)
        real_sync = w.sync_blocking

        def sync_blocking():
            if hold.is_set():
                assert release.wait(10)
            real_sync()

        w.sync_blocking = sync_blocking
        return w

    monkeypatch.setattr(registry.driver, "_writer", writer)
    upload = await registry.repository("foo").layers.upload()
    hold.set()
    data = os.urandom(7000)
    with trio.fail_after(5):  # a write waiting for the held sync would hang here
        for start in range(0, len(data), 700):
            await upload.write(data[start : start + 700])
    states = path_for(HashStatesDir("foo", upload.uuid))
    assert await registry.driver.list(states) == ["0"]  # nothing vouched for before its sync
    release.set()
    await upload.close()
    assert await registry.driver.list(states) == ["0", "1400", "7000"]
    resumed = await registry.repository("foo").layers.resume(upload.uuid)
    await resumed.finish(digest_bytes(data))


async def test_a_failed_append_cuts_the_data_back_and_fails_a_later_call(registry, monkeypatch):
    """Appends are written on a worker, so a failed one (a full disk) is reported by a later
    call; the data is cut back to where it failed, no hash state vouches for more, and the
    upload resumes from there."""
    monkeypatch.setattr("storage.uploads.CHECKPOINT", 1500)
    fail_at: list[int] = [3000]
    real_writer = registry.driver._writer

    async def writer(path):
        w = await real_writer(path)
        real_write = w.write_at_blocking

        def write_at_blocking(offset, data):
            if offset in fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(offset, data)

        w.write_at_blocking = write_at_blocking
        return w

    monkeypatch.setattr(registry.driver, "_writer", writer)
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    chunks = [os.urandom(1000) for _ in range(6)]
    with pytest.raises(OSError) as err:
        for i, chunk in enumerate(chunks):
            await upload.write_at(i * 1000, chunk)
        await upload.flush()
    assert err.value.errno == errno.ENOSPC
    assert upload.size == 3000
    states = await registry.driver.list(path_for(HashStatesDir("foo", upload.uuid)))
    assert max(int(s) for s in states) <= 3000, states
    await upload.close()
    fail_at.clear()
    resumed = await layers.resume(upload.uuid)
    assert resumed.size == 3000
    await resumed.write_at(3000, b"".join(chunks[3:]))
    await resumed.finish(digest_bytes(b"".join(chunks)))
    async with await layers.fetch(digest_bytes(b"".join(chunks))) as reader:
        assert await reader.read() == b"".join(chunks)


async def test_a_wrong_state_at_the_data_size_does_not_block_the_right_digest(registry):
    """A well-formed but wrong state exactly at the data's size (damage, or a registry bug)
    is used for speed, and its wrong digest is checked by hashing the data from zero."""
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    data = os.urandom(3000)
    await upload.write(data)
    await upload.close()
    wrong = Sha256State()
    wrong.update(os.urandom(3000))
    await registry.driver.put_content(
        path_for(HashState("foo", upload.uuid, 3000)), wrong.marshal()
    )
    resumed = await layers.resume(upload.uuid)
    assert resumed.hashed_size == 3000
    await resumed.finish(digest_bytes(data))
    assert await layers.exists(digest_bytes(data))


async def test_a_reused_write_buffer_does_not_change_the_hash(registry, monkeypatch):
    """Appends are hashed after write_at returns: a caller's buffer must be copied."""
    update = Sha256State.update

    def slow_update(self, data):  # the worker hashes only after the caller reused its buffer
        time.sleep(0.05)
        update(self, data)

    monkeypatch.setattr(Sha256State, "update", slow_update)
    layers = registry.repository("foo").layers
    upload = await layers.upload()
    buffer = bytearray(b"a" * 1000)
    await upload.write(buffer)
    buffer[:] = b"b" * 1000
    await upload.write(buffer)
    await upload.finish(digest_bytes(b"a" * 1000 + b"b" * 1000))
