"""The `rootfs/` view on an `s3://` source (issue 16: "works on every source"): an image that
skopeo pushed through docker-registry's s3 driver into a bucket (moto) shows, through a mount
of the bucket, the tree `umoci unpack` makes of it; each layer is indexed from one GetObject
of its blob (counted through a proxy), and a second mount reuses the index."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fault_server import FaultServer
from support.images import Tree, differences, tree_of_dir, umoci_unpack
from support.mounts import Mount
from support.oci import build_image, read_oci_layout, skopeo_push
from support.registry import RegistryServer
from support.s3 import MotoServer, registry_s3_config, s3_call
from support.tools import run

pytestmark = [pytest.mark.mount, pytest.mark.registry]

ROOTDIRECTORY = "/regroot"
FILES = {
    "etc/os-release": b'ID=regfs\nNAME="regfs test"\n',
    "usr/share/data.bin": os.urandom(6 << 20),  # a layer of several of the pass's windows
    "usr/bin/run.sh": b"#!/bin/sh\necho regfs\n",
}


@pytest.fixture
def pushed(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The image `v1` in the bucket (through the registry), the daemons' AWS chain pointed
    at moto and a fresh index cache; yields the OCI layout it was built in."""
    for name, value in moto_server.environment(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    layout = tmp_path / "layout"
    build_image(layout, "v1", FILES, layers=2)
    config = registry_s3_config(moto_server, s3_bucket, ROOTDIRECTORY)
    with RegistryServer(tmp_path / "unused-root", workdir=tmp_path / "registry", s3=config) as r:
        skopeo_push(layout, "v1", r.host, "org/app")
    yield layout


def without_own_xattrs(path: Path) -> Tree:
    """The tree below `path`, its root's `user.regfs.*` xattrs (the view's own) left out."""
    tree = tree_of_dir(path)
    root = tree.records[""]
    kept = tuple((n, v) for n, v in root.xattrs if not n.startswith("user.regfs."))
    return dataclasses.replace(
        tree, records={**tree.records, "": dataclasses.replace(root, xattrs=kept)}
    )


def test_an_image_in_a_bucket_shows_what_umoci_unpacks(
    pushed: Path,
    s3_bucket: str,
    tmp_path: Path,
    mount,
    moto_server: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = tree_of_dir(umoci_unpack(pushed, "v1", tmp_path / "bundle"))
    source = f"s3://{s3_bucket}{ROOTDIRECTORY}"
    image = ("org", "app", "rootfs", "v1")
    layers = [d.split(":")[1] for d in read_oci_layout(pushed, "v1").layer_digests]
    with FaultServer(upstream=moto_server.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the first mount's calls, seen
        first: Mount = mount(source)
        run("ls", first.path(*image))  # indexes both layers from the bucket
        gets = Counter(
            layer
            for seen in proxy.seen
            for layer in layers
            if f"/{layer}/data" in seen.path and s3_call(seen) == "GetObject"
        )
        shown = without_own_xattrs(first.path(*image))
        assert differences(expected, shown) == []
        assert shown == expected
        assert first.path(*image, "etc", "os-release").read_bytes() == FILES["etc/os-release"]
        assert first.log_text().count("indexing layer") == 2
        first.stop()
    assert gets == dict.fromkeys(layers, 1)  # one GetObject per layer's pass
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)

    second: Mount = mount(source)  # the same cache: no pass again
    assert without_own_xattrs(second.path(*image)) == shown
    assert "indexing layer" not in second.log_text()
