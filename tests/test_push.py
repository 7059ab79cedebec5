"""Pushing through the mount with shell tools, checked by the real registry and skopeo.

What `cp` and `mv` leave in storage must be what docker-registry 2.8 serves: a whole image
pushed with shell commands is pulled back by `skopeo` digest for digest and unpacked by
`umoci`; an upload a registry client started over HTTP is finished through the mount and
then served by the registry.
"""

from __future__ import annotations

import json
import os

import pytest
from support.mounts import wait_until
from support.oci import build_image, push_with_tools, run, skopeo_pull
from support.registry import OCI_MANIFEST, upload_path
from support.tools import bash, digest_of, ls
from support.uploads import new_repo, state_path, uuid_of, write_file

pytestmark = [pytest.mark.mount, pytest.mark.registry]

FILES = {
    "etc/regfs/hello.txt": b"hello from a cp push\n",
    "usr/share/regfs/data.bin": os.urandom(400_000),
    "opt/app/run.sh": b"#!/bin/sh\necho regfs\n",
    "var/lib/regfs/more.bin": os.urandom(50_000),
}


def test_push_image_with_cp_and_mv_then_skopeo_pull(tmp_path, registry_server, client, mount):
    """`mkdir -p`, then config and layers by `cp` + `mv` (some) and by `cp` to digest names
    (others), then the manifest by `cp` to tags/v1; the registry serves it as pushed."""
    layout = tmp_path / "layout"
    image = build_image(layout, "v1", FILES, layers=3)
    m = mount(registry_server.root)
    repo = new_repo(m, "myorg/app")
    push_with_tools(repo, layout, image)
    assert ls(repo / "layers") == sorted(image.blob_digests)
    assert ls(repo / "manifests") == [image.digest] and ls(repo / "tags") == ["v1"]
    assert ls(repo / "uploads") == []
    assert os.getxattr(repo / "tags" / "v1", "user.regfs.digest").decode() == image.digest
    m.stop()  # the registry reads storage alone: nothing may be left in the daemon

    assert client.catalog() == ["myorg/app"]  # mkdir -p made myorg a namespace only
    assert client.tags("myorg/app") == ["v1"]
    body, media_type, digest = client.get_manifest("myorg/app", "v1")
    assert (body, digest) == (image.manifest, image.digest)
    assert media_type == OCI_MANIFEST
    pulled = skopeo_pull(registry_server.host, "myorg/app", "v1", tmp_path / "pulled")
    assert (pulled.digest, pulled.manifest) == (image.digest, image.manifest)
    assert pulled.blob_digests == image.blob_digests
    for blob in image.blob_digests:
        assert digest_of(pulled.blob(blob)) == blob
        assert pulled.blob(blob) == image.blob(blob)
    assert json.loads(pulled.blob(pulled.config_digest))["rootfs"]["diff_ids"]

    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    run(["umoci", "unpack", *rootless, "--image", f"{tmp_path / 'pulled'}:v1", str(bundle)])
    for path, data in FILES.items():
        assert (bundle / "rootfs" / path).read_bytes() == data, path


def test_http_upload_resumed_and_finished_through_mount(tmp_path, registry_server, client, mount):
    """POST + PATCH over HTTP, then the upload shows as uploads/<uuid>, `cat rest >>` resumes
    it from the registry's own hash state and `mv` finishes it; the registry serves it.

    The repository is new: a first push interrupted before any blob finished leaves only
    `_uploads/` in it, which the registry's catalog does not count, but the mount must show.
    """
    name = "myorg/resume"
    data = os.urandom(3 * (1 << 20) + 4321)
    half = 1_234_567
    location, uuid = client.start_upload(name)
    location = client.patch_chunk(location, data[:half], 0)
    root = registry_server.root
    assert state_path(root, name, uuid, half).exists()  # the registry's saved state

    m = mount(root)
    uploads = m.path("myorg", "resume", "uploads")
    assert ls(uploads) == [uuid]
    assert os.stat(uploads / uuid).st_size == half and uuid_of(uploads / uuid) == uuid
    started = (upload_path(root, name, uuid) / "startedat").read_text()
    assert os.getxattr(uploads / uuid, "user.regfs.startedat").decode() == started

    # Zero the start of the data while resuming: only a resume from the registry's state
    # at `half` (no re-read) still reaches the original digest. Restored before the finish.
    data_file = upload_path(root, name, uuid) / "data"
    with open(data_file, "r+b") as f:
        f.write(bytes(1000))
    rest = write_file(tmp_path / "rest", data[half:])
    bash(f"cat '{rest}' >> '{uploads / uuid}'")
    assert os.stat(uploads / uuid).st_size == len(data)
    # The daemon saves the state at the end when the writer's release arrives.
    wait_until(state_path(root, name, uuid, len(data)).exists, 10, "the final hash state")
    with open(data_file, "r+b") as f:
        f.write(data[:1000])
    digest = digest_of(data)
    run(["mv", str(uploads / uuid), str(m.path("myorg", "resume", "layers", digest))])
    assert ls(uploads) == []
    assert not upload_path(root, name, uuid).exists()

    assert client.get_blob(name, digest) == data
    assert client.catalog() == [name]  # finishing linked a layer: now a repository to all
    assert client.request("GET", location).status_code == 404  # gone for the registry too
