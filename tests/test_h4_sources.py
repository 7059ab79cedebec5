"""A repository beside the registry's own DELETE, purge and cancel: what an emptied upload
area leaves, on a storage root and in memory as on S3 (whose directories are only keys);
and a failed upload start, which removes what it wrote and says so when that fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from storage.drivers import FilesystemDriver, InMemoryDriver, StorageDriver
from storage.errors import RemoteUnavailable
from storage.paths import RepositoryDir, UploadsDir, path_for
from storage.registry import Registry

pytestmark = pytest.mark.storage


@pytest.fixture(params=["inmemory", "filesystem"])
def driver(request, tmp_path: Path) -> StorageDriver:
    if request.param == "inmemory":
        return InMemoryDriver()
    return FilesystemDriver(tmp_path / "root")


async def test_an_emptied_uploads_directory_holds_no_upload(driver: StorageDriver) -> None:
    # The registry's purger and its finish delete `_uploads/<uuid>` and leave `_uploads/`:
    # on S3 no such directory exists, so no source may count it as "holds uploads".
    registry = Registry(driver)
    upload = await registry.repository("org/app").layers.upload()
    assert await registry.catalog.is_repository("org/app", with_uploads=True)
    await driver.delete(path_for(RepositoryDir("org/app")) + "/_uploads/" + upload.uuid)
    assert await driver.list(path_for(UploadsDir("org/app"))) == []
    assert not await registry.catalog.is_repository("org/app", with_uploads=True)


async def test_a_cancelled_only_upload_takes_its_repository_along(driver: StorageDriver) -> None:
    registry = Registry(driver)
    upload = await registry.repository("org/app").layers.upload()
    await upload.write_at(0, b"interrupted")
    await upload.cancel()
    assert await registry.catalog.children("org") == []
    assert await driver.list(path_for(RepositoryDir("org"))) == []  # the namespace stays


async def test_a_cancel_leaves_a_repository_holding_more(driver: StorageDriver) -> None:
    registry = Registry(driver)
    await registry.create_repository("org/app")  # its `_layers` marker
    upload = await registry.repository("org/app").layers.upload()
    await upload.cancel()
    assert await registry.catalog.is_repository("org/app")
    assert await registry.catalog.children("org") == ["app"]


async def test_remove_empty_removes_only_an_empty_directory(driver: StorageDriver) -> None:
    await driver.put_content("/a/b/file", b"x")
    assert not await driver.remove_empty("/a/b")
    assert not await driver.remove_empty("/a/b/file")
    assert not await driver.remove_empty("/a/absent")
    await driver.delete("/a/b/file")
    assert await driver.remove_empty("/a/b")
    assert await driver.list("/a") == []
    await driver.delete("/a")


class _FailingStart(InMemoryDriver):
    """A store that takes startedat, then fails the data's writer and every delete (an S3
    that went away in the middle of a start)."""

    async def _writer(self, path: str):
        raise RemoteUnavailable("writer: the store went away")

    async def _delete(self, path: str) -> None:
        raise RemoteUnavailable("delete: the store went away")


async def test_a_failed_start_whose_cleanup_fails_says_so(caplog) -> None:
    registry = Registry(_FailingStart())
    with (
        caplog.at_level(logging.WARNING, logger="storage.uploads"),
        pytest.raises(RemoteUnavailable, match="writer"),
    ):
        await registry.repository("org/app").layers.upload()
    (record,) = [r for r in caplog.records if r.name == "storage.uploads"]
    assert "removing what it wrote failed too" in record.getMessage()
    assert "delete: the store went away" in record.getMessage()
