"""A repository beside the registry's own DELETE, purge and cancel: what an emptied upload
area leaves, on a storage root and in memory as on S3 (whose directories are only keys);
and a failed upload start, which removes what it wrote and says so when that fails."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
from support.registry import repo_path

from storage.drivers import FilesystemDriver, InMemoryDriver, StorageDriver
from storage.errors import RemoteUnavailable
from storage.paths import RepositoryDir, UploadsDir, path_for
from storage.registry import Registry
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry
from storage.remote.uploads import UploadRecords

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


@pytest.mark.registry
@pytest.mark.remote
async def test_a_remote_upload_that_cannot_be_recorded_is_cancelled_at_the_registry(
    tmp_path: Path, module_registry_server, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    # Without a record nothing could ever name the upload the registry began (uploads/ lists
    # records): a failed record lock cancels it there (it was left to the registry's purge).
    async def no_lock(self: UploadRecords, uuid: str) -> int:
        raise OSError(errno.ENOSPC, "no space left for the record's lock")

    monkeypatch.setattr(UploadRecords, "lock", no_lock)
    client = RemoteClient(module_registry_server.url, timeout=10)
    registry = RemoteRegistry(client, tmp_path / "state", listing_ttl=0)
    try:
        with pytest.raises(OSError, match="no space"):
            await registry.repository("h4/unrecorded").layers.upload()
    finally:
        await registry.aclose()
    uploads = repo_path(module_registry_server.root, "h4/unrecorded") / "_uploads"
    assert not list(uploads.glob("*/startedat"))  # the registry's DELETE keeps hash states
