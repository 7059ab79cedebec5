"""regfs check and purge-uploads: every kind of finding, and nothing changes."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from storage.check import Severity, check, purge_uploads
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver
from storage.paths import (
    BlobData,
    LayerLink,
    TagCurrentLink,
    UploadData,
    UploadStartedAt,
    path_for,
)
from storage.registry import Registry

REGFS = str(Path(sys.executable).parent / "regfs")


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
    # A link to a missing blob, a garbage link, a tag to a manifest the repository lacks,
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
        "dangling-layer-link",
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


def regfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REGFS, *args], capture_output=True, text=True, timeout=60)


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
    assert missing.returncode == 2 and "not a directory" in missing.stderr
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
