"""The demo's sample registry holds real images: the registry serves them, skopeo pulls them."""

from __future__ import annotations

import pytest
from support.oci import run, skopeo_pull

from regfs.demo import build


@pytest.mark.registry
async def test_demo_images_pull_and_unpack(tmp_path, registry_server):
    await build(registry_server.root)
    assert registry_server.client().tags("library/hello") == ["latest", "v1"]
    image = skopeo_pull(registry_server.host, "library/hello", "latest", tmp_path / "oci")
    assert len(image.layer_digests) == 2
    run(["umoci", "unpack", "--image", f"{tmp_path / 'oci'}:latest", str(tmp_path / "bundle")])
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "app" / "hello.sh").read_bytes().startswith(b"#!/bin/sh")
    assert (rootfs / "etc" / "motd").read_text() == "Hello from a layer served by regfs.\n"
    assert (rootfs / "app" / "data.bin").stat().st_size == 4 << 20
