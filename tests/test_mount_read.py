"""The read side through a real mount, driven by real tools in subprocesses."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver
from storage.registry import Registry

CONFIG = b'{"architecture":"amd64","os":"linux"}'


async def build_root(root, name: str = "library/demo", size: int = 3_000_000) -> dict:
    """A repository with a config, one big random layer, a manifest and tag `latest`."""
    repo = Registry(FilesystemDriver(root)).repository(name)
    blobs = {}
    for data in (CONFIG, os.urandom(size)):
        upload = await repo.layers.upload()
        await upload.write(data)
        digest = digest_bytes(data)
        await upload.finish(digest)
        blobs[str(digest)] = data
    config, layer = list(blobs)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                   "size": len(CONFIG)},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer,
                    "size": len(blobs[layer])}],
    }).encode()
    digest = await repo.manifests.put(manifest)
    await repo.tags.put("latest", digest)
    return {"blobs": blobs, "manifest": manifest, "digest": str(digest), "layer": layer}


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=60)


async def test_basic_tree_and_bytes(tmp_path, mount):
    image = await build_root(tmp_path / "root")
    m = mount(tmp_path / "root")
    repo = m.path("library", "demo")
    assert sorted(os.listdir(m.mountpoint)) == ["library"]
    assert sorted(os.listdir(repo)) == ["layers", "manifests", "tags", "uploads"]
    assert sorted(os.listdir(repo / "layers")) == sorted(image["blobs"])
    assert (repo / "tags" / "latest").read_bytes() == image["manifest"]
    assert (repo / "manifests" / image["digest"]).read_bytes() == image["manifest"]
    for digest, data in image["blobs"].items():
        out = run("sha256sum", str(repo / "layers" / digest)).stdout.decode()
        assert out.split()[0] == digest.removeprefix("sha256:")
        assert os.stat(repo / "layers" / digest).st_size == len(data)


async def test_write_paths_refused(tmp_path, mount):
    image = await build_root(tmp_path / "root", size=1000)
    m = mount(tmp_path / "root")
    layer = m.path("library", "demo", "layers", image["layer"])
    for call in (lambda: open(layer, "wb"), lambda: os.chmod(layer, 0o600),
                 lambda: os.truncate(layer, 0), lambda: os.link(layer, m.path("x"))):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == errno.EPERM
    assert "refused" in m.log_text()
