"""What a remote source keeps beside its upload records (UploadRecords): the lock of an
upload's one writer across mounts, held while an Upload is open, its file gone once it is
let go (closed, finished, cancelled, not found); and the repositories mkdir made."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.registry import RegistryServer

from storage.digests import digest_bytes
from storage.errors import Busy, UnknownUpload
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry
from storage.remote.uploads import UploadRecords

UUID = "0f6d3a8e-6a37-4c43-9a52-2f1c8f7e5b10"


def opened(url: str, state: Path) -> RemoteRegistry:
    """One mount's source: two of these on one state directory are two mounts of one user."""
    return RemoteRegistry(RemoteClient(url, timeout=10), state, listing_ttl=0)


@pytest.mark.registry
@pytest.mark.remote
async def test_a_closed_upload_resumes_on_another_mount_and_finishes(
    tmp_path: Path, module_registry_server: RegistryServer
) -> None:
    a = opened(module_registry_server.url, tmp_path / "state")
    b = opened(module_registry_server.url, tmp_path / "state")
    try:
        upload = await a.repository("h6/lock").layers.upload(label="x")
        await upload.write_at(0, b"from a, ")
        await upload.close()
        assert [p.name for p in a.records.directory.iterdir()] == [f"{upload.uuid}.json"]
        resumed = await b.repository("h6/lock").layers.resume(upload.uuid)
        await resumed.write_at(8, b"then b")
        assert (await resumed.finish(digest_bytes(b"from a, then b"))).size == 14
        assert sorted(p.name for p in b.records.directory.iterdir()) == []
        with pytest.raises(UnknownUpload):
            await a.repository("h6/lock").layers.resume(upload.uuid)
        assert sorted(p.name for p in a.records.directory.iterdir()) == []
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.registry
@pytest.mark.remote
async def test_a_cancelled_upload_leaves_no_lock_file(
    tmp_path: Path, module_registry_server: RegistryServer
) -> None:
    a = opened(module_registry_server.url, tmp_path / "state")
    try:
        upload = await a.repository("h6/lock").layers.upload()
        assert sorted(p.name for p in a.records.directory.iterdir()) == [
            f"{upload.uuid}.json",
            f"{upload.uuid}.lock",
        ]
        await upload.cancel()
        assert list(a.records.directory.iterdir()) == []
    finally:
        await a.aclose()


@pytest.mark.storage
async def test_a_writer_that_waited_holds_the_lock_the_next_one_meets(tmp_path: Path) -> None:
    """The first writer's unlock removes the file the second was waiting on: the second
    must then hold the lock a third finds (not a lock on a removed file), so the third is
    Busy, and once the second lets go, no lock file is left."""
    records = UploadRecords(tmp_path / "records")
    first = await records.lock(UUID)
    second: list[int] = []

    async def wait_for_it() -> None:
        second.append(await records.lock(UUID))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_it)
        await trio.sleep(0.2)
        assert second == []
        records.unlock(UUID, first)
    with pytest.raises(Busy):
        await records.lock(UUID)
    records.unlock(UUID, second[0])
    assert list(records.directory.iterdir()) == []
    records.close()


@pytest.mark.registry
@pytest.mark.remote
async def test_a_made_repository_lasts_until_rmdir_and_is_seen_by_another_mount(
    tmp_path: Path, module_registry_server: RegistryServer
) -> None:
    """mkdir over https:// is kept beside the upload records: another mount of the user
    (or the next one) finds it, and its rmdir removes it for both."""
    a = opened(module_registry_server.url, tmp_path / "state")
    b = opened(module_registry_server.url, tmp_path / "state")
    try:
        await a.create_repository("h6/made")
        assert await b.catalog.is_repository("h6/made")
        await b.remove_repository("h6/made")
        assert not await a.catalog.is_repository("h6/made")
        assert a.created == b.created == frozenset()
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.registry
@pytest.mark.remote
async def test_a_rename_while_the_upload_is_open_stays(
    tmp_path: Path, module_registry_server: RegistryServer
) -> None:
    """`mv uploads/a uploads/b` while a's writer is open (set_label beside the Upload): the
    writer's next save of its record keeps the new name, not the one it opened with."""
    a = opened(module_registry_server.url, tmp_path / "state")
    try:
        layers = a.repository("h6/renamed").layers
        upload = await layers.upload(label="a")
        await upload.write_at(0, b"before ")
        await layers.set_label(upload.uuid, "b")
        await upload.write_at(7, b"after")
        await upload.flush()
        assert await layers.label(upload.uuid) == "b"
        await upload.cancel()
    finally:
        await a.aclose()
