"""The storage root's and the bucket's side of the sources' contract (review s23, H6):
what rmdir of a repository counts as something."""

from __future__ import annotations

import uuid as uuids

import pytest
from support.s3 import MotoServer

from storage.check import Severity, check
from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.drivers.s3 import S3Driver
from storage.errors import NotEmpty
from storage.paths import HashState, UploadDir, UploadsDir, path_for
from storage.registry import Registry

pytestmark = pytest.mark.storage

NAME = "org/app"


@pytest.fixture(params=["inmemory", "filesystem", "s3"])
def registry(request: pytest.FixtureRequest, tmp_path) -> Registry:
    if request.param == "inmemory":
        return Registry(InMemoryDriver())
    if request.param == "filesystem":
        return Registry(FilesystemDriver(tmp_path / "root"))
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Registry(S3Driver(bucket, "/regroot", client=moto.client()))


async def test_rmdir_passes_over_what_a_cancelled_registry_upload_leaves(
    registry: Registry,
) -> None:
    """Registry 2.8's DELETE of an upload keeps its `hashstates/sha256/0`: no upload (no
    startedat), so the repository holding only that and the marker is empty."""
    await registry.create_repository(NAME)
    left = HashState(NAME, str(uuids.uuid4()), 0)
    await registry.driver.put_content(path_for(left), b"state")
    await registry.remove_repository(NAME)
    assert not await registry.catalog.exists(NAME)


async def test_rmdir_counts_an_upload_and_a_stray_file_in_uploads(registry: Registry) -> None:
    await registry.create_repository(NAME)
    upload = await registry.repository(NAME).layers.upload()
    await upload.close()  # startedat, no byte yet: still an upload, resumable
    with pytest.raises(NotEmpty):
        await registry.remove_repository(NAME)
    await (await registry.repository(NAME).layers.resume(upload.uuid)).cancel()
    await registry.driver.put_content(path_for(UploadsDir(NAME)) + "/stray", b"")
    with pytest.raises(NotEmpty):  # a file directly in _uploads/ is no upload's leftover
        await registry.remove_repository(NAME)


async def test_check_calls_an_s3_multipart_upload_left_alone_maintenance(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    """What the registry's purge leaves of an S3 upload (its objects deleted, its multipart
    upload kept) is no lost upload but a leftover purge-uploads removes (exit 1, not 2)."""
    registry = Registry(S3Driver(s3_bucket, "/regroot", client=moto_server.client()))
    upload = await registry.repository(NAME).layers.upload()
    await upload.write_at(0, b"a part")
    await upload.close()
    s3 = moto_server.client()
    prefix = f"regroot{path_for(UploadDir(NAME, upload.uuid))}/"
    for key in [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]]:
        s3.delete_object(Bucket=s3_bucket, Key=key)  # objects only, as the registry's purge
    findings = [(f.kind, f.severity) for f in await check(registry.driver)]
    assert findings == [("empty-upload-leftover", Severity.MAINTENANCE)]
