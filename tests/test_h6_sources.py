"""The storage root's and the bucket's side of the sources' contract (review s23, H6):
what rmdir of a repository counts as something."""

from __future__ import annotations

import uuid as uuids

import pytest
from support.s3 import MotoServer

from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.drivers.s3 import S3Driver
from storage.errors import NotEmpty
from storage.paths import HashState, UploadsDir, path_for
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
