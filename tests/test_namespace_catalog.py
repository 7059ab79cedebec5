"""A namespace lists what the registry's `_catalog` counts for the state the registry's own
DELETE, upload purge and garbage-collect leave (h3, stop 25): a repository, or a namespace
with one below it. Against the real docker-registry 2.8, on a storage root and on S3 (moto),
where the mount must show the same (S3 keeps no empty directory)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from support.mounts import Mount, regfs
from support.registry import OCI_CONFIG, OCI_MANIFEST, RegistryServer
from support.s3 import MotoServer, registry_s3_config
from support.tools import digest_of, errno_of, ls

from storage.drivers import FilesystemDriver
from storage.paths import RepositoryDir, UploadsDir, UploadStartedAt, path_for
from storage.registry import Registry

PREFIX = "/regroot"


@dataclass
class Store:
    """A running registry and the source a mount (or `regfs purge-uploads`) names for the
    same storage."""

    registry: RegistryServer
    source: str

    def garbage_collect(self) -> None:
        """`docker-registry garbage-collect --delete-untagged` on the registry's config."""
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # as it serves
        done = subprocess.run(
            ["docker-registry", "garbage-collect", "--delete-untagged",
             str(self.registry.config_path)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


@pytest.fixture(params=["root", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    if request.param == "root":
        with RegistryServer(tmp_path / "root", workdir=tmp_path / "registry") as server:
            yield Store(server, str(tmp_path / "root"))
        return
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    for name, value in moto.environment(tmp_path).items():  # the daemons' AWS chain
        monkeypatch.setenv(name, value)
    config = registry_s3_config(moto, bucket, PREFIX)
    with RegistryServer(tmp_path / "unused", workdir=tmp_path / "registry", s3=config) as server:
        yield Store(server, f"s3://{bucket}{PREFIX}")


def push_image(server: RegistryServer, name: str) -> str:
    """A config, a layer and a manifest tagged v1 through the registry's API; the digest."""
    client = server.client()
    config = client.push_blob(name, b"{}")
    layer = client.push_blob(name, os.urandom(1000))
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
         "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 2},
         "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer,
                     "size": 1000}]}
    ).encode()  # fmt: skip
    client.put_manifest(name, "v1", manifest)
    return digest_of(manifest)


def top_level(catalog: list[str]) -> list[str]:
    """What `ls MOUNT` shows for the registry's `_catalog`: each name's first component."""
    return sorted({name.split("/")[0] for name in catalog})


@pytest.mark.mount
@pytest.mark.registry
def test_the_registrys_delete_and_gc_leave_namespaces_as_its_catalog_counts_them(
    store: Store, mount: Callable[..., Mount]
) -> None:
    # A first push the registry began and its client cancelled (DELETE of the upload leaves
    # `_uploads/<id>/hashstates/sha256/0`): no repository in `_catalog`, so `org` and
    # `org/app` are not in the mount either (were: both listed, `app` an empty directory).
    # A repository whose only manifest the registry deleted, then garbage-collected with
    # --delete-untagged, keeps its `_layers`: `_catalog` and the mount both keep it.
    client = store.registry.client()
    location, _ = client.start_upload("org/app")
    location = client.patch_chunk(location, os.urandom(100), 0)
    assert client.request("DELETE", location).status_code == 204
    digest = push_image(store.registry, "kept/app")
    assert client.request("DELETE", f"/v2/kept/app/manifests/{digest}").status_code == 202
    store.garbage_collect()
    catalog = client.catalog()
    assert catalog == ["kept/app"]
    m = mount(store.source)
    assert ls(m.mountpoint) == top_level(catalog) == ["kept"]
    assert ls(m.path("kept")) == ["app"]
    assert ls(m.path("kept", "app", "tags")) == ls(m.path("kept", "app", "manifests")) == []
    for gone in (m.path("org"), m.path("org", "app")):
        assert errno_of(lambda gone=gone: os.stat(gone)) == errno.ENOENT, gone
    assert [p.name for p in m.mountpoint.iterdir()] == ["kept"]  # find, du: the same walk


@pytest.mark.mount
@pytest.mark.registry
def test_a_first_push_the_purge_emptied_goes_on_a_root_as_on_s3(
    store: Store, mount: Callable[..., Mount]
) -> None:
    # A first push begun through the registry shows its upload for a resume; once the
    # upload purge deleted it (`purge-uploads` does as the registry's purger: the upload's
    # directory, so a root keeps an empty `_uploads/` in `org/app`, S3 nothing), `_catalog`
    # has nothing and neither has the mount, on a root as on S3 (was: `org` on a root).
    _, uuid = store.registry.client().start_upload("org/app")
    m = mount(store.source, "--tag-ttl", "0")
    assert ls(m.mountpoint) == ["org"]
    assert ls(m.path("org", "app", "uploads")) == [uuid]
    purged = regfs("purge-uploads", "--older-than", "0s", store.source)
    assert purged.returncode == 0 and uuid in purged.stdout, purged.stderr
    assert store.registry.client().catalog() == []
    fresh = mount(store.source)
    for shown in (m, fresh):
        assert ls(shown.mountpoint) == [], shown.mountpoint
        assert errno_of(lambda shown=shown: os.stat(shown.path("org"))) == errno.ENOENT


@pytest.mark.storage
async def test_children_counts_what_the_catalog_counts(registry: Registry) -> None:
    """Both drivers: a namespace's children are its repositories (a live upload's too) and
    the namespaces with one below; a directory holding only what the registry's DELETE or
    purge leaves of uploads, or nothing, is none, at any depth."""
    driver = registry.driver
    repositories = ("a/app", "deep/er/still/app")
    for name in repositories:
        await registry.create_repository(name)
    live = await registry.repository("up/app").layers.upload()
    await live.write(b"x")
    await live.close()
    leftover = f"{path_for(UploadsDir('left/app'))}/{'0' * 8}-0000-0000-0000-{'0' * 12}"
    await driver.put_content(f"{leftover}/hashstates/sha256/0", b"state")  # DELETE's
    await driver.put_content(f"{path_for(UploadsDir('left/nested/app'))}/.keep", b"")  # purge's
    assert await registry.catalog.children() == ["a", "deep", "up"]
    assert await registry.catalog.children("deep/er") == ["still"]
    assert await registry.catalog.children("left") == []
    for name in ("left", "left/app", "left/nested", "left/nested/app"):
        assert not await registry.catalog.exists(name), name
    for name in (*repositories, "deep", "up/app"):
        assert await registry.catalog.exists(name), name
    # The upload's `startedat` is what makes it one, for uploads/ and for the catalog alike.
    await driver.delete(path_for(UploadStartedAt("up/app", live.uuid)))
    assert await registry.repository("up/app").layers.uploads() == []
    assert await registry.catalog.children() == ["a", "deep"]


@pytest.mark.mount
def test_an_emptied_namespace_on_a_root_is_none(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    # What `rm -r MOUNT/org/app` leaves on a root (the repository's directory goes, `org/`
    # stays empty), or any empty directory, is no namespace: `_catalog` counts none, and on
    # S3 the namespace goes with its last repository's keys.
    root = tmp_path / "root"
    trio.run(Registry(FilesystemDriver(root)).create_repository, "org/app")
    (root / path_for(RepositoryDir("empty/below")).lstrip("/")).mkdir(parents=True)
    m = mount(root)
    assert ls(m.mountpoint) == ["org"]
    assert subprocess.run(["rm", "-r", m.path("org", "app")]).returncode == 0
    assert (root / path_for(RepositoryDir("org")).lstrip("/")).is_dir()
    assert ls(m.mountpoint) == []


@pytest.mark.mount
@pytest.mark.registry
def test_rm_r_of_a_namespace_outlasting_its_entry_succeeds(
    store: Store, mount: Callable[..., Mount]
) -> None:
    # `rm -r MOUNT/many` ends with rmdir of `many`, which the kernel looks up again where
    # its entry expired meanwhile (--tag-ttl): the namespace went with its last repository
    # (on S3 with its last key, so this was ENOENT there before, and `rm` exited 1), yet it
    # is found by name for a while after the rmdir that emptied it, and its rmdir succeeds.
    m = mount(store.source, "--tag-ttl", "0.1")
    names = [f"r{i:02d}" for i in range(30)]
    for name in names:
        os.makedirs(m.path("many", name))
    os.makedirs(m.path("other", "kept"))
    assert ls(m.path("many")) == names
    removed = subprocess.run(["rm", "-r", m.path("many")], capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    assert ls(m.mountpoint) == ["other"]
    assert errno_of(lambda: os.stat(m.path("many"))) == errno.ENOENT
