"""What a remote mount cannot do, as its README section says, against registry 2.8: delete
a tag alone (a manifest goes with its tags), read an upload back."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.mounts import Mount
from support.oci import image_manifest
from support.registry import RegistryServer

from storage.digests import digest_bytes
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry

pytestmark = [pytest.mark.mount, pytest.mark.registry, pytest.mark.remote]


async def tagged(url: str, state: Path) -> None:
    registry = RemoteRegistry(RemoteClient(url, timeout=10), state, listing_ttl=0)
    repo = registry.repository("h6/limits")
    blobs = [b'{"os":"linux"}', b"a layer"]
    try:
        for data in blobs:
            upload = await repo.layers.upload()
            await upload.write_at(0, data)
            await upload.finish(digest_bytes(data))
        await repo.tags.put("v1", await repo.manifests.put(image_manifest(blobs[0], blobs[1:])))
    finally:
        await registry.aclose()


def test_rm_of_a_tag_is_eperm_and_reading_an_upload_is_eio(
    remote_mount: Callable[..., Mount], module_registry_server: RegistryServer, tmp_path: Path
) -> None:
    trio.run(tagged, module_registry_server.url, tmp_path / "other-state")
    m = remote_mount()
    repo = m.path("h6", "limits")
    rm = subprocess.run(["rm", repo / "tags" / "v1"], capture_output=True, text=True)
    assert (rm.returncode, "Operation not permitted" in rm.stderr) == (1, True), rm.stderr
    assert (repo / "tags" / "v1").exists()
    (manifest,) = [p.name for p in (repo / "manifests").iterdir()]
    subprocess.run(["rm", repo / "manifests" / manifest], check=True)  # and its tags
    assert list((repo / "tags").iterdir()) == []
    (repo / "uploads" / "x").write_bytes(b"sent to the registry")
    cat = subprocess.run(["cat", repo / "uploads" / "x"], capture_output=True, text=True)
    assert (cat.returncode, "Input/output error" in cat.stderr) == (1, True), cat.stderr
