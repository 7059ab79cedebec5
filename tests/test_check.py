"""regfs check and purge-uploads: every kind of finding, and nothing changes."""

from __future__ import annotations

import errno
import shutil
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from support.fault_server import FaultServer
from support.mounts import regfs
from support.s3 import s3_call

from storage.check import Severity, check, purge_uploads
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver, InMemoryDriver, StorageDriver
from storage.drivers.s3 import MIN_PART, S3Driver
from storage.paths import (
    BlobData,
    LayerLink,
    TagCurrentLink,
    UploadData,
    UploadStartedAt,
    path_for,
)
from storage.registry import Registry

pytestmark = pytest.mark.storage


@pytest.fixture(params=["inmemory", "filesystem", "s3"])
def driver(request, tmp_path) -> StorageDriver:
    """conftest's drivers, and S3 on moto: the check lists a bucket's whole tree at once."""
    if request.param == "s3":
        server = request.getfixturevalue("moto_server")
        return S3Driver(request.getfixturevalue("s3_bucket"), "/", client=server.client())
    return InMemoryDriver() if request.param == "inmemory" else FilesystemDriver(tmp_path / "root")


async def healthy(registry: Registry) -> dict[str, str]:
    repo = registry.repository("org/app")
    digests = {}
    for data in (b"config", b"layer"):
        upload = await repo.layers.upload()
        await upload.write(data)
        digests[data.decode()] = str(await upload.digest())
        await upload.finish(digest_bytes(data))
    return digests


async def snapshot(driver) -> list[tuple[str, bytes]]:
    return [
        (i.path, b"" if i.is_dir else await driver.get_content(i.path))
        async for i in driver.walk("/")
    ]


async def test_clean_registry_has_no_findings(registry):
    await healthy(registry)
    upload = await registry.repository("org/app").layers.upload()  # fresh: not stale
    await upload.close()
    assert await check(registry.driver, verify=True) == []


async def test_every_kind_of_finding(registry):
    driver = registry.driver
    await healthy(registry)
    layer = digest_bytes(b"layer")
    # A link to a collected blob, a garbage link, a tag to a manifest the repository lacks,
    # an upload without startedat, a stale upload, an unlinked blob, a corrupted blob.
    await driver.put_content(
        path_for(LayerLink("org/app", digest_bytes(b"gone"))), str(digest_bytes(b"gone")).encode()
    )
    await driver.put_content(path_for(LayerLink("org/app", digest_bytes(b"junk"))), b"junk")
    await driver.put_content(
        path_for(TagCurrentLink("org/app", "v1")), str(digest_bytes(b"nomanifest")).encode()
    )
    broken = await registry.repository("org/app").layers.upload()
    await broken.close()
    await driver.delete(path_for(UploadStartedAt("org/app", broken.uuid)))
    stale = await registry.repository("org/app").layers.upload()
    await stale.close()
    await driver.put_content(
        path_for(UploadStartedAt("org/app", stale.uuid)), b"2020-01-01T00:00:00Z"
    )
    await registry.blobs.put(b"orphan")
    await driver.put_content(path_for(BlobData(layer)), b"tampered")
    before = await snapshot(driver)

    findings = await check(driver, verify=True)
    kinds = {f.kind for f in findings}
    assert kinds == {
        "collected-layer-link",
        "corrupt-layer-link",
        "tag-to-missing-manifest",
        "broken-upload",
        "stale-upload",
        "unlinked-blob",
        "digest-mismatch",
    }
    assert {f.kind for f in await check(driver)} == kinds - {"digest-mismatch"}
    assert max(f.severity for f in findings) == Severity.DAMAGE
    assert await snapshot(driver) == before  # check never changes anything


async def test_purge_uploads(registry):
    layers = registry.repository("org/app").layers
    old, new = await layers.upload(), await layers.upload()
    for upload in (old, new):
        await upload.close()
    await registry.driver.put_content(
        path_for(UploadStartedAt("org/app", old.uuid)), b"2020-01-01T00:00:00Z"
    )
    dry = await purge_uploads(registry.driver, timedelta(days=7), dry_run=True)
    assert [p.uuid for p in dry] == [old.uuid]
    assert sorted(await layers.uploads()) == sorted([old.uuid, new.uuid])
    done = await purge_uploads(registry.driver, timedelta(days=7))
    assert [p.uuid for p in done] == [old.uuid]
    assert await layers.uploads() == [new.uuid]


async def test_cli_exit_status_and_output(tmp_path):
    root = tmp_path / "root"
    registry = Registry(FilesystemDriver(root))
    await healthy(registry)
    assert regfs("check", str(root), "--verify").returncode == 0
    await registry.blobs.put(b"orphan")
    result = regfs("check", str(root))
    assert result.returncode == 1 and "unlinked-blob" in result.stdout
    await registry.driver.put_content(path_for(BlobData(digest_bytes(b"layer"))), b"x")
    result = regfs("check", str(root), "--verify")
    assert result.returncode == 2 and "digest-mismatch" in result.stdout
    missing = regfs("check", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "nope").exists()
    bad = regfs("purge-uploads", str(root), "--older-than", "soon")
    assert bad.returncode == 2 and "bad duration" in bad.stderr
    ok = regfs("purge-uploads", str(root), "--older-than", "1h30m", "--dry-run")
    assert ok.returncode == 0 and "would delete 0 uploads" in ok.stderr


async def test_dataless_leftover_is_maintenance_and_purged(registry):
    """A create or final delete cut short leaves an upload directory with neither startedat
    nor data: no one's bytes, so check calls it maintenance and purge-uploads removes it."""
    driver = registry.driver
    layers = registry.repository("org/app").layers
    leftover = await layers.upload()
    await leftover.close()
    await driver.delete(path_for(UploadStartedAt("org/app", leftover.uuid)))
    await driver.delete(path_for(UploadData("org/app", leftover.uuid)))
    findings = await check(driver)
    assert [(f.kind, f.severity) for f in findings] == [
        ("empty-upload-leftover", Severity.MAINTENANCE)
    ]
    purged = await purge_uploads(driver, timedelta(days=7))
    assert [p.uuid for p in purged] == [leftover.uuid]
    assert await check(driver) == []


def plant_symlinks(root: Path, outside: Path, stale_uuid: str) -> dict[str, str]:
    """Issue 13's attacks on a root, by whoever can write it: a blob's data linked to a
    secret, a repository's `_uploads` linked to a directory holding a stale upload (so a
    purge that followed it would delete it), an upload's `hashstates/sha256` linked to a
    directory, and a link loop. Returns each outside file's content, to prove it untouched."""
    (outside / "uploads" / stale_uuid).mkdir(parents=True)
    (outside / "uploads" / stale_uuid / "startedat").write_bytes(b"2020-01-01T00:00:00Z")
    (outside / "uploads" / stale_uuid / "data").write_bytes(b"someone's bytes")
    (outside / "states").mkdir()
    (outside / "states" / "0").write_bytes(b"keep")
    (outside / "secret").write_bytes(b"secret")
    v2 = root / "docker" / "registry" / "v2"
    secret = digest_bytes(b"secret")
    blob = v2 / "blobs" / "sha256" / secret.hex[:2] / secret.hex
    blob.mkdir(parents=True)
    (blob / "data").symlink_to(outside / "secret")
    repos = v2 / "repositories"
    (repos / "org" / "linked" / "_layers").mkdir(parents=True)
    (repos / "org" / "linked" / "_uploads").symlink_to(outside / "uploads")
    (repos / "org" / "loop").mkdir(parents=True)
    (repos / "org" / "loop" / "_layers").symlink_to(repos / "org" / "loop" / "_layers")
    uploads = repos / "org" / "app" / "_uploads"
    upload = next(p for p in uploads.iterdir())
    shutil.rmtree(upload / "hashstates" / "sha256")
    (upload / "hashstates" / "sha256").symlink_to(outside / "states")
    return {str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()}


async def test_symlinks_are_damage_and_never_followed(tmp_path):
    """check reports every symlink in the root as damage; check and purge-uploads follow
    none (a purge through a linked `_uploads` deleted what it pointed at)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    driver = FilesystemDriver(root)
    registry = Registry(driver)
    await healthy(registry)
    upload = await registry.repository("org/app").layers.upload()
    await upload.write(b"partial")
    await upload.close()
    stale = "01234567-89ab-4def-8123-456789abcdef"
    files = plant_symlinks(root, outside, stale)
    before = await snapshot(driver)

    findings = await check(driver, verify=True)
    links = sorted(f.path for f in findings if f.kind == "symlink")
    assert all(f.severity == Severity.DAMAGE for f in findings if f.kind == "symlink")
    secret = digest_bytes(b"secret")
    v2 = "/docker/registry/v2"
    assert links == [
        f"{v2}/blobs/sha256/{secret.hex[:2]}/{secret.hex}/data",
        f"{v2}/repositories/org/app/_uploads/{upload.uuid}/hashstates/sha256",
        f"{v2}/repositories/org/linked/_uploads",
        f"{v2}/repositories/org/loop/_layers",
    ]
    purged = await purge_uploads(driver, timedelta(hours=1))
    assert purged == []
    assert (root / links[2].lstrip("/")).is_symlink()
    assert await snapshot(driver) == before
    assert {
        str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()
    } == files

    result = regfs("check", str(root))
    assert result.returncode == 2, result
    assert result.stdout.count("damage: symlink:") == 4
    assert "Traceback" not in result.stderr
    assert regfs("purge-uploads", str(root), "--older-than", "1h").returncode == 0
    assert (outside / "uploads" / stale / "data").exists()


def test_a_crash_is_exit_2_in_one_line(tmp_path, monkeypatch, capsys):
    """Whatever check meets that it did not foresee: exit 2, one line, no traceback."""
    from regfs import cli, maintenance

    async def crash(*args: object) -> None:
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", "somewhere")

    monkeypatch.setattr(maintenance, "check", crash)
    monkeypatch.setattr(maintenance, "purge_uploads", crash)
    (tmp_path / "root").mkdir()
    assert cli.main(["check", str(tmp_path / "root")]) == 2
    assert cli.main(["purge-uploads", str(tmp_path / "root"), "--older-than", "1h"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "regfs check: OSError: [Errno 40] Too many levels of symbolic links: 'somewhere'",
        "regfs purge-uploads: OSError: [Errno 40] Too many levels of symbolic links: 'somewhere'",
    ]


async def test_purge_names_uploads_as_the_mount_shows_them(tmp_path):
    """uploads/ shows an upload by the name it was given; purge-uploads says the same name
    (and the uuid, which is what the registry knows)."""
    root = tmp_path / "root"
    registry = Registry(FilesystemDriver(root))
    layers = registry.repository("org/app").layers
    named, bare = await layers.upload(label="layer.tar"), await layers.upload()
    for upload in (named, bare):
        await upload.close()
        await registry.driver.put_content(
            path_for(UploadStartedAt("org/app", upload.uuid)), b"2020-01-01T00:00:00Z"
        )
    # A name no storage path may hold is passed over by the walk, not a crash.
    (root / "docker/registry/v2/repositories/org/odd name").mkdir()
    result = regfs("purge-uploads", str(root), "--older-than", "7d", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would delete org/app/uploads/layer.tar (upload {named.uuid}," in result.stdout
    assert f"would delete org/app/uploads/{bare.uuid} (upload {bare.uuid}," in result.stdout
    checked = regfs("check", str(root))
    assert checked.returncode < 2 and "Traceback" not in checked.stderr, checked.stderr


async def test_purge_lists_a_bucket_once(moto_server, s3_bucket):
    """`regfs purge-uploads s3://…` reads through the check's view: one listing of the whole
    tree answers the catalog, the upload directories and whether a leftover holds data;
    what is left is a GET per start time and per label a purged upload has (one given
    through a mount), and the real driver's delete of each purged upload, which aborts its
    multipart upload. No upload in progress is sized (no ListParts): a purge asks only
    which are there."""
    s3 = moto_server.client()
    registry = Registry(S3Driver(s3_bucket, "/", client=s3, chunksize=MIN_PART))
    for i in range(10):  # repositories without uploads, which a purge lists all the same
        layers = registry.repository(f"team/svc{i}").layers
        await (await layers.upload()).finish(digest_bytes(b""))
    stale, fresh = [], []
    for name in ("org/a", "org/b", "lib/c"):
        layers = registry.repository(name).layers
        done = await layers.upload()
        await done.write(name.encode())
        await done.finish(digest_bytes(name.encode()))
        for uploads in (stale, fresh):
            upload = await layers.upload(label="layer.tar" if name == "org/a" else None)
            await upload.write(b"partial")  # in progress: a multipart upload
            await upload.close()
            uploads.append(upload.uuid)
        await registry.driver.put_content(
            path_for(UploadStartedAt(name, stale[-1])), b"2020-01-01T00:00:00Z"
        )
    leftover = await registry.repository("org/a").layers.upload()
    await leftover.close()
    for path in (UploadStartedAt("org/a", leftover.uuid), UploadData("org/a", leftover.uuid)):
        await registry.driver.delete(path_for(path))
    in_progress = len(stale) + len(fresh)
    assert len(s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]) == in_progress

    with FaultServer(upstream=moto_server.url) as proxy:
        driver = S3Driver(s3_bucket, "/", client=moto_server.client(proxy.url))
        purged = await purge_uploads(driver, timedelta(days=7))
    assert sorted(p.uuid for p in purged) == sorted([*stale, leftover.uuid])
    assert sorted(p.shown for p in purged) == sorted(["layer.tar", *stale[1:], leftover.uuid])
    left = [u["Key"] for u in s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]]
    assert sorted(key.split("/")[-2] for key in left) == sorted(fresh)  # aborted, not leaked
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert not [k for k in keys if any(u in k for u in [*stale, leftover.uuid])]
    calls = Counter(s3_call(s) for s in proxy.seen)
    gone = len(purged)  # each delete: a listing of its directory and of its multipart uploads
    assert calls == {
        "ListObjects": 1 + gone,  # the whole tree once (was 25: one per directory)
        "ListMultipartUploads": 1 + gone,  # the whole tree's once (was 1 + in_progress + gone)
        "GetObject": len(stale) + len(fresh) + 1 + 1,  # start times, org/a's stale label
        "DeleteObjects": gone,
        "AbortMultipartUpload": len(stale),
        "HeadObject": gone,  # each upload to purge: is its writer lock live?
    }


class FinishedElsewhere(S3Driver):
    """The bucket as one node sees it while another finishes (or cancels) an upload right
    after this one read its start time: the upload's objects and multipart upload go."""

    gone: str = ""  # the upload's uuid

    async def _get_content(self, path: str, limit: int) -> bytes:
        data = await super()._get_content(path, limit)
        if self.gone and path.endswith(f"/{self.gone}/startedat"):
            others = S3Driver(self.bucket, self.rootdirectory, client=self.client)
            await others.delete(path.rpartition("/")[0])
        return data


async def test_purge_goes_on_past_an_upload_finished_meanwhile(moto_server, s3_bucket):
    """An upload finished or cancelled elsewhere between the purge's read of its start time
    and its delete is gone already: the purge says so in its log, leaves it out of what it
    purged, and goes on with the others."""
    driver = FinishedElsewhere(s3_bucket, "/", client=moto_server.client(), chunksize=MIN_PART)
    layers = Registry(driver).repository("org/app").layers
    stale = []
    for _ in range(2):
        upload = await layers.upload()
        await upload.write(b"partial")
        await upload.close()
        await driver.put_content(
            path_for(UploadStartedAt("org/app", upload.uuid)), b"2020-01-01T00:00:00Z"
        )
        stale.append(upload.uuid)
    driver.gone = stale[0]
    purged = await purge_uploads(driver, timedelta(days=7))
    assert [p.uuid for p in purged] == [stale[1]]
    s3 = moto_server.client()
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
