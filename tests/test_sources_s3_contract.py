"""Review of stop 23 (H4): the contract between regfs/ and its sources (storage/api.py), the
same operation through a storage root, an S3 bucket (moto) and a registry over HTTP, and
the S3 source against its own contract and docker-registry 2.8's (docs/s3.md).

Each test's comment says what should happen and why: the rule its fix follows. Most are the
S3 source's (`test_s3_*`); the rest (rmdir, mkdir, a tag's put, an upload's label, one
writer per remote upload, a cancelled first push) go through the other sources.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from support.fault_server import Fault, FaultServer
from support.mounts import wait_until
from support.s3 import MotoServer, store_image
from support.tools import ls

from storage.api import Upload
from storage.check import purge_uploads
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver
from storage.drivers import s3 as s3driver
from storage.drivers.s3 import S3Driver
from storage.errors import Busy, InvalidOffset, RemoteUnavailable
from storage.paths import HashStatesDir, path_for
from storage.registry import Registry, Repository
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry

pytestmark = pytest.mark.storage

ROOT = "/regroot"
MIB = 1 << 20
SLOW_DOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def s3_registry(moto: MotoServer, bucket: str, endpoint: str | None = None) -> Registry:
    """A registry on the bucket as one daemon has it (a driver of its own: two of these
    are two mounts on one bucket)."""
    return Registry(S3Driver(bucket, ROOT, client=moto.client(endpoint)))


async def discard(upload: Upload) -> None:
    """Let go of an upload a failed test left open (its S3 lock's renewals, its writer)."""
    with contextlib.suppress(Exception):
        await upload.cancel()


async def state_offsets(registry: Registry, name: str, uuid: str) -> list[int]:
    try:
        names = await registry.driver.list(path_for(HashStatesDir(name, uuid)))
    except LookupError:
        return []
    return sorted(int(n) for n in names)


# --------------------------------------------------------------------------- S3 uploads


async def test_s3_read_of_an_upload_another_mount_writes_leaves_its_writer_alone(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # `cat uploads/x` on mount B while mount A writes x (two mounts on one bucket, SPEC §10)
    # reads what is there, or is refused (EBUSY), and A's upload goes on and finishes, as on a
    # storage root, where B reads the data file and A never notices. On S3 a read that
    # completes the multipart upload (materialize) takes the writer lock to do it (EBUSY while
    # a writer holds it), as the writer's own daemon does through its writer: A's next part
    # never goes to an upload S3 no longer has, nor would a registry node's mid-PATCH.
    name = "org/app"
    a, b = s3_registry(moto_server, s3_bucket), s3_registry(moto_server, s3_bucket)
    data = blob(300_000, seed=1)
    upload = await a.repository(name).layers.upload()
    try:
        await upload.write_at(0, data[:100_000])
        await upload.flush()
        try:
            reader = await b.repository(name).layers.read_upload(upload.uuid)
        except Busy:
            pass  # refused: S3 cannot read a multipart upload without completing it
        else:
            try:
                await reader.read_at(0, 10)
            finally:
                await reader.aclose()
        await upload.write_at(100_000, data[100_000:])
        assert (await upload.finish(digest_bytes(data))).size == len(data)
    finally:
        await discard(upload)


async def test_s3_purge_leaves_an_upload_being_written(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # As on a storage root (b218123), purge-uploads leaves an upload whose writer holds it. The
    # S3 writer holds a lock object (`<data>.regfs-lock`) renewed every 15 s, whose age a HEAD
    # tells by the server's own clock (as _Lock._try does): the purge asks it and deletes no
    # upload under its writer.
    name = "org/app"
    registry = s3_registry(moto_server, s3_bucket)
    upload = await registry.repository(name).layers.upload()
    try:
        await upload.write_at(0, b"being written")
        await upload.flush()
        purged = await purge_uploads(registry.driver, timedelta(seconds=-60))
        assert purged == []
        await upload.write_at(13, b" still")
        assert (await upload.finish(digest_bytes(b"being written still"))).size == 19
    finally:
        await discard(upload)


async def test_s3_upload_mtime_is_its_last_write(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    # An upload's mtime is its last write's time (9384e60, UploadInfo.mtime_ns), as on a storage
    # root, and on S3 with the writer open in this daemon too: the writer knows when it last
    # wrote, so every caller of upload_info in that daemon gets that time (not only the
    # writer's own handle, UploadHandle.pending_attr), never "changed just now".
    for registry in (
        Registry(FilesystemDriver(tmp_path / "root")),
        s3_registry(moto_server, s3_bucket),
    ):
        layers = registry.repository("org/app").layers
        upload = await layers.upload()
        try:
            await upload.write_at(0, b"some bytes")
            await upload.flush()
            written = time.time_ns()
            await trio.sleep(1.1)
            info = await layers.upload_info(upload.uuid)
            assert info.mtime_ns <= written, registry.driver
        finally:
            await discard(upload)


async def test_s3_refused_write_below_the_end_changes_nothing(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # SPEC §7, "a failed operation leaves the registry as it was". A write below the end of an
    # S3 upload's sealed parts is InvalidOffset (SPEC §10), and the writer is asked whether it
    # can write there before LayerUpload.write_at rewinds: every hash state stays, the one at
    # the upload's size too, which the registry (and a resume) uses, so no finish re-reads the
    # whole upload from S3.
    name = "org/app"
    registry = s3_registry(moto_server, s3_bucket)
    data = blob(17 * MIB, seed=2)
    layers = registry.repository(name).layers
    upload = await layers.upload()
    for at in range(0, len(data), MIB):
        await upload.write_at(at, data[at : at + MIB])
    await upload.close()
    before = await state_offsets(registry, name, upload.uuid)
    assert before[-1] == len(data)
    resumed = await layers.resume(upload.uuid)
    try:
        with pytest.raises(InvalidOffset):
            await resumed.write_at(0, b"X")
        assert await state_offsets(registry, name, upload.uuid) == before
    finally:
        await discard(resumed)


async def test_s3_refused_truncate_changes_nothing(moto_server: MotoServer, s3_bucket: str) -> None:
    # As the write above: the S3 writer refuses the cut (InvalidOffset) before
    # LayerUpload.truncate rewinds, so the states above the size stay.
    name = "org/app"
    registry = s3_registry(moto_server, s3_bucket)
    data = blob(17 * MIB, seed=3)
    layers = registry.repository(name).layers
    upload = await layers.upload()
    for at in range(0, len(data), MIB):
        await upload.write_at(at, data[at : at + MIB])
    await upload.close()
    before = await state_offsets(registry, name, upload.uuid)
    resumed = await layers.resume(upload.uuid)
    try:
        with pytest.raises(InvalidOffset):
            await resumed.truncate(MIB)
        assert await state_offsets(registry, name, upload.uuid) == before
    finally:
        await discard(resumed)


async def test_s3_throttled_upload_start_is_retried(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # SPEC §10, "a throttled or unreachable server is retried with backoff, then EIO for that
    # call". CreateMultipartUpload is not sent again once answered (a second upload at the key
    # would be resumed first by 2.8), but a 503 SlowDown is S3 refusing the request
    # unprocessed: sent again, it makes no second upload, so one throttle does not fail
    # `cp x uploads/` (EIO).
    with FaultServer(upstream=moto_server.url) as proxy:
        registry = s3_registry(moto_server, s3_bucket, proxy.url)
        proxy.inject(Fault(503, body=SLOW_DOWN, method="POST", path=r"/data$"), times=1)
        upload = await registry.repository("org/app").layers.upload()
        await upload.write_at(0, b"throttled once")
        assert (await upload.finish(digest_bytes(b"throttled once"))).size == 14


async def test_s3_write_below_the_end_is_einval_whatever_the_size(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # SPEC §10, "S3 appends only: uploads are written in order (a write below the end is
    # EINVAL)", whatever the size: one rule a user can predict, as the remote source's. Neither
    # an upload below 5 MiB (which the driver could read back into its tail) nor a larger one
    # (whose multipart upload a rewrite would copy) takes `dd conv=notrunc seek=0`.
    # (test_services' test_write_below_the_end lists S3 as `cannot` there too.)
    layers = s3_registry(moto_server, s3_bucket).repository("org/app").layers
    upload = await layers.upload()
    try:
        await upload.write_at(0, blob(100_000, seed=4))
        with pytest.raises(InvalidOffset):
            await upload.write_at(10, b"XXXXX")
    finally:
        await upload.cancel()


def test_s3_throttled_bucket_check_is_retried(moto_server: MotoServer, s3_bucket: str) -> None:
    # SPEC §10, "a throttled or unreachable server is retried with backoff, then EIO for that
    # call; wrong credentials or a missing bucket refuse the mount". check_bucket retries the
    # transient answers as `call` does, so a throttled S3 (or one 500) refuses neither
    # `regfs mount` nor `regfs check` nor `purge-uploads`; only 403/404 and no credentials
    # refuse at once.
    with FaultServer(upstream=moto_server.url) as proxy:
        driver = S3Driver(s3_bucket, ROOT, client=moto_server.client(proxy.url))
        proxy.inject(Fault(503, body=SLOW_DOWN, method="HEAD"), times=1)
        driver.check_bucket()


# --------------------------------------------------------------------------- beside the registry


@pytest.mark.registry
async def test_rmdir_after_the_registry_cancelled_an_upload(
    tmp_path: Path, registry_server
) -> None:
    # README, "rmdir removes one that is still empty ... an emptied repository": rmdir passes
    # over empty directories, what the registry's DELETE leaves, and over what a client's
    # cancelled upload leaves (DELETE of the upload: docker push ^C):
    # `_uploads/<id>/hashstates/sha256/0` (docs/s3.md, Pitfalls; the same on a root), an upload
    # directory without startedat that `uploads/` rightly hides and the registry's purge never
    # removes. Every section lists nothing, and rmdir succeeds.
    name = "org/app"
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    await registry.create_repository(name)
    client = registry_server.client()
    location, _ = client.start_upload(name)
    assert client.request("DELETE", location).status_code == 204
    repo = registry.repository(name)
    listed = (await repo.tags.list(), await repo.layers.list(), await repo.layers.uploads())
    assert listed == ([], [], [])
    await registry.remove_repository(name)
    assert not await registry.catalog.exists(name)


# --------------------------------------------------------------------------- through mounts


@pytest.fixture
def aws_env(moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemons' AWS chain points at moto, and at no AWS file of this machine."""
    for name, value in moto_server.environment(tmp_path).items():
        monkeypatch.setenv(name, value)


@pytest.mark.mount
def test_s3_tag_added_beside_a_mount_shows_within_the_ttl(
    aws_env: None, moto_server: MotoServer, s3_bucket: str, mount
) -> None:
    # SPEC §4: tags and listings change beside the mount (another node, the registry) and
    # show within --tag-ttl. On S3 a directory's mtime is its first key's, which a second
    # tag does not move: the listing must be read again all the same.
    registry = s3_registry(moto_server, s3_bucket)
    repo = registry.repository("org/app")
    trio.run(store_image, repo, ["v1"])
    m = mount(f"s3://{s3_bucket}{ROOT}", "-o", "tag_ttl=1")
    tags = m.path("org", "app", "tags")
    assert ls(tags) == ["v1"]
    trio.run(store_image, repo, ["v2"])
    wait_until(lambda: ls(tags) == ["v1", "v2"], 5, "the mount to list v2")


@pytest.mark.mount
@pytest.mark.parametrize(
    "kind",
    [
        "filesystem",
        "s3",
    ],
)
def test_rmdir_p_of_a_new_repository(
    kind: str, aws_env: None, s3_bucket: str, tmp_path: Path, mount
) -> None:
    # README: `mkdir -p MOUNT/org/app` makes a repository, and rmdir removes one that is
    # still empty "or an emptied namespace": `rmdir -p org/app` undoes `mkdir -p org/app`.
    # On a root the namespace org/ stays, empty, until its own rmdir. A bucket keeps no
    # empty directory (docs/s3.md): org/ went with app's marker, yet the kernel still holds
    # its entry, so `rmdir org` reaches the daemon and is ENOENT: `rmdir -p` exits 1.
    source = str(tmp_path / "root") if kind == "filesystem" else f"s3://{s3_bucket}{ROOT}"
    m = mount(source)
    subprocess.run(["mkdir", "-p", "org/app"], cwd=m.mountpoint, check=True)
    done = subprocess.run(
        ["rmdir", "-p", "org/app"], cwd=m.mountpoint, capture_output=True, text=True
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert ls(m.mountpoint) == []


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.registry
@pytest.mark.remote
async def test_remote_mkdir_lasts_as_on_other_sources(
    tmp_path: Path, module_registry_server
) -> None:
    # SPEC §6, "mkdir -p MOUNT/myorg/app creates an empty repository": on a root and on S3 it
    # lasts (a marker file) until rmdir, across remounts, and over https:// too: kept beside the
    # upload records (~/.local/state), as uploads are, so a remount shows it and a `cp` into
    # app/uploads/ after it (a script's next step) finds it.
    def opened() -> RemoteRegistry:
        return RemoteRegistry(
            RemoteClient(module_registry_server.url, timeout=10), tmp_path / "state", listing_ttl=0
        )

    first = opened()
    try:
        await first.create_repository("h4/made")
        assert await first.catalog.is_repository("h4/made", with_uploads=True)
    finally:
        await first.aclose()
    again = opened()
    try:
        assert await again.catalog.is_repository("h4/made", with_uploads=True)
    finally:
        await again.aclose()


# --------------------------------------------------------------------------- the Protocols


async def test_tag_put_needs_a_stored_manifest(tmp_path: Path) -> None:
    # storage/api.py, Tags.put "points the tag at a stored manifest": every source refuses one
    # that is not (UnknownManifest, ENOENT), as the remote source does, so a retag racing an
    # `rm manifests/<digest>` (or any library caller) leaves no tag that names nothing (which
    # `cat tags/v1` would answer ENOENT/EIO for, and the registry 404).
    repo = Registry(FilesystemDriver(tmp_path / "root")).repository("org/app")
    with pytest.raises(LookupError):
        await repo.tags.put("v1", digest_bytes(b"no such manifest"))
    assert await repo.tags.list() == []


async def test_set_label_of_an_upload_that_is_gone(tmp_path: Path) -> None:
    # As the remote source: UnknownUpload (ENOENT), and nothing written. A label written for any
    # uuid (`mv uploads/a uploads/b` racing an `rm`, or a finish, on another mount) would make a
    # directory without startedat, hidden from uploads/ but counted by rmdir (ENOTEMPTY) until
    # a purge-uploads.
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    layers = registry.repository("org/app").layers
    upload = await layers.upload()
    await upload.cancel()
    with pytest.raises(LookupError):
        await layers.set_label(upload.uuid, "renamed")
    assert list((tmp_path / "root").rglob("label")) == []


async def test_s3_failed_part_ends_the_upload_where_the_failure_began(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # README, "a failed write fails a later write or close(): the upload then ends where the
    # failure began, ready to resume", and SPEC §10, a server that stays down is EIO. On S3 the
    # bytes of a write whose part failed (after the retries) are never sealed by the appends
    # queued behind it, so the cut back to the failed write stays within the unsealed tail and
    # the caller gets the server's error, not the driver's InvalidOffset (EINVAL, "S3 can cut
    # only the unsealed tail").
    with FaultServer(upstream=moto_server.url) as proxy:
        registry = s3_registry(moto_server, s3_bucket, proxy.url)
        upload = await registry.repository("org/app").layers.upload()
        try:
            proxy.inject(Fault(503, body=SLOW_DOWN, method="PUT", path=r"/data$"), times=5)
            data = blob(18 * MIB, seed=5)
            with pytest.raises(RemoteUnavailable):
                for at in range(0, len(data), MIB):
                    await upload.write_at(at, data[at : at + MIB])
                await upload.flush()
            assert upload.size == 15 * MIB
        finally:
            await upload.cancel()


async def test_s3_failed_upload_start_leaves_no_upload(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # SPEC §7, "a failed operation leaves the registry as it was": `cp x uploads/y` that fails
    # (EIO: S3 refused CreateMultipartUpload through every retry) leaves no upload.
    # LayerUpload.start writes startedat (and the label) first, then opens the writer: when the
    # writer cannot be had, what it wrote is removed (on every source; a failure of that
    # removal is logged), so uploads/ lists no upload of 0 bytes the user never made.
    with FaultServer(upstream=moto_server.url) as proxy:
        registry = s3_registry(moto_server, s3_bucket, proxy.url)
        layers = registry.repository("org/app").layers
        proxy.inject(Fault(503, body=SLOW_DOWN, method="POST", path=r"/data$"), times=10)
        with pytest.raises(RemoteUnavailable):
            await layers.upload(label="y")
        proxy.clear()
        assert await layers.uploads() == []


async def test_s3_purge_removes_a_multipart_upload_left_alone(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # On a root, what the registry's purge or a finish cut short leave (an upload directory
    # without startedat) holds no data, and purge-uploads removes it. On S3 the registry's purge
    # deletes objects, never multipart uploads (docs/s3.md, Pitfalls), and a delete cut short
    # (or an abort refused) can leave `_uploads/<id>/data` as a multipart upload alone: an
    # upload without startedat whose only file is a multipart upload in progress is the same
    # leftover, and purge-uploads aborts it (its parts are there, its start is not) rather
    # than keep it for ever (S3 bills its parts).
    registry = s3_registry(moto_server, s3_bucket)
    layers = registry.repository("org/app").layers
    upload = await layers.upload()
    await upload.write_at(0, blob(1000, seed=6))
    await upload.close()
    s3 = moto_server.client()
    prefix = f"{ROOT.strip('/')}/docker/registry/v2/repositories/org/app/_uploads/{upload.uuid}/"
    for key in [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]]:
        s3.delete_object(Bucket=s3_bucket, Key=key)  # what the registry's purge does
    assert len(s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) == 1
    await purge_uploads(registry.driver, timedelta(hours=1))
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.mount
def test_s3_layer_collected_beside_the_mount_is_absent(
    aws_env: None, moto_server: MotoServer, s3_bucket: str, mount
) -> None:
    # README: what the registry's garbage-collect leaves (a link to a collected blob) the
    # registry answers 404 for, and the mount shows absent, not EIO: on a bucket too, where
    # the collected blob's "directory" goes with its last key.
    registry = s3_registry(moto_server, s3_bucket)
    repo = registry.repository("org/app")
    gone = blob(2000, seed=7)
    kept = blob(3000, seed=8)
    for data in (gone, kept):
        trio.run(push_blob, repo, data)
    s3 = moto_server.client()
    hexa = digest_bytes(gone).hex
    s3.delete_object(
        Bucket=s3_bucket,
        Key=f"{ROOT.strip('/')}/docker/registry/v2/blobs/sha256/{hexa[:2]}/{hexa}/data",
    )
    m = mount(f"s3://{s3_bucket}{ROOT}")
    layers = m.path("org", "app", "layers")
    assert ls(layers) == [str(digest_bytes(kept))]
    with pytest.raises(FileNotFoundError):
        (layers / str(digest_bytes(gone))).stat()
    assert (layers / str(digest_bytes(kept))).read_bytes() == kept


async def push_blob(repo: Repository, data: bytes) -> None:
    upload = await repo.layers.upload()
    await upload.write_at(0, data)
    await upload.finish(digest_bytes(data))


@pytest.mark.registry
@pytest.mark.remote
async def test_remote_one_writer_per_upload_across_mounts(
    tmp_path: Path, module_registry_server
) -> None:
    # README, "One writer per upload (EBUSY), across mounts too", as a root (flock) and S3 (the
    # lock object) hold it. Two mounts of one registry by one user share the upload records
    # (~/.local/state/regfs), so both list the same upload: a writer holds a lock on its record
    # (flock on its file, as the filesystem driver does), and a second writer is refused, so no
    # two PATCH streams clash at the registry or overwrite each other's record.
    def opened() -> RemoteRegistry:
        return RemoteRegistry(
            RemoteClient(module_registry_server.url, timeout=10), tmp_path / "state", listing_ttl=0
        )

    a, b = opened(), opened()
    try:
        upload = await a.repository("h4/one-writer").layers.upload(label="x")
        await upload.write_at(0, b"from a")
        await upload.flush()
        with pytest.raises(Busy):
            await b.repository("h4/one-writer").layers.resume(upload.uuid)
        await upload.cancel()
    finally:
        await a.aclose()
        await b.aclose()


async def test_s3_throttled_key_of_a_delete_is_retried(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    # SPEC §10, throttling is retried with backoff. S3 answers DeleteObjects 200 with an <Error>
    # per key it did not delete (SlowDown, InternalError under load): those keys are sent
    # again, so `rm layers/<digest>` (or of a tag, an upload, a finish's cleanup) is not EIO
    # where sending them again does.
    registry = s3_registry(moto_server, s3_bucket)
    layers = registry.repository("org/app").layers
    data = blob(500, seed=9)
    await push_blob(registry.repository("org/app"), data)
    key = (
        f"{ROOT.strip('/')}/docker/registry/v2/repositories/org/app/_layers/sha256/"
        f"{digest_bytes(data).hex}/link"
    )
    throttled = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Error><Key>{key}</Key><Code>SlowDown</Code>"
        "<Message>Please reduce your request rate.</Message></Error></DeleteResult>"
    ).encode()
    with FaultServer(upstream=moto_server.url) as proxy:
        behind = s3_registry(moto_server, s3_bucket, proxy.url)
        proxy.inject(Fault(200, body=throttled, method="POST", path=rf"^/{s3_bucket}/?$"), times=1)
        await behind.repository("org/app").layers.unlink(digest_bytes(data))
        assert any(s.faulted for s in proxy.seen)
    assert not await layers.exists(digest_bytes(data))


@pytest.mark.mount
def test_cancelled_first_push_leaves_no_repository(tmp_path: Path, mount) -> None:
    # As on S3 (its catalog has neither org nor org/app after the cancel: the last key went
    # with the upload) and as the registry's catalog counts: a client's first push to
    # org/app, interrupted (its upload shows in uploads/ for a resume), then `rm`'d through
    # the mount, leaves no repository, nor the namespace above it: its emptied directories go
    # with the upload, and an emptied `_uploads/` counts for no upload.
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    trio.run(start_upload, registry.repository("org/app"))
    m = mount(tmp_path / "root", "-o", "tag_ttl=0")
    (uuid,) = ls(m.path("org", "app", "uploads"))
    (m.path("org", "app", "uploads", uuid)).unlink()
    wait_until(lambda: ls(m.mountpoint) == [], 3, "org/app, and org, to go with its last upload")


async def start_upload(repo: Repository) -> None:
    """An upload as a registry client leaves one it started (and was interrupted in)."""
    upload = await repo.layers.upload()
    await upload.write_at(0, b"a first push, interrupted")
    await upload.close()


async def test_s3_writes_while_the_server_is_down_are_eio(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SPEC §10, "a throttled or unreachable server is retried with backoff, then EIO for that
    # call". Where the writer lock's renewals failed past LOCK_SAFE (S3 down or throttling), a
    # write gets the server's error (RemoteUnavailable: EIO), not Busy ("Device or resource
    # busy" would say another writer has the file, during an outage nobody else caused); Busy
    # is for a lock taken over (a 412 on renewal). The windows are shortened here (15 s / 30 s
    # in the driver).
    monkeypatch.setattr(s3driver, "LOCK_RENEW", 0.2)
    monkeypatch.setattr(s3driver, "LOCK_SAFE", 1.0)
    with FaultServer(upstream=moto_server.url) as proxy:
        registry = s3_registry(moto_server, s3_bucket, proxy.url)
        upload = await registry.repository("org/app").layers.upload()
        try:
            await upload.write_at(0, blob(MIB, seed=10))
            await upload.flush()
            proxy.inject(
                Fault(503, body=SLOW_DOWN, method="PUT", path=r"\.regfs-lock$"), times=1000
            )
            await trio.sleep(1.5)
            with pytest.raises(RemoteUnavailable):
                await upload.write_at(MIB, blob(MIB, seed=11))
                await upload.flush()
        finally:
            proxy.clear()
            await discard(upload)
