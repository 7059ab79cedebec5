"""A mount beside the real registry, on the same root, while the registry deletes (issue 14).

The registry's DELETE removes only a `link` file (its digest directory stays, empty), and its
`garbage-collect` deletes blobs but not the layer links to them. The registry answers 404 for
both, so through a running mount they are absent: not listed, ENOENT, no EIO, nothing in the
log, once the tag TTL has passed or SIGHUP came. `regfs check` calls them reclaimable, not
damage; real damage stays exit 2. Everything the registry still serves reads the same.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.mounts import REGFS, Mount, hang_up
from support.oci import empty_image, image_manifest
from support.registry import (
    OCI_CONFIG,
    OCI_MANIFEST,
    REGISTRY_BIN,
    RegistryClient,
    RegistryServer,
    blob_data_path,
    repo_path,
)
from support.tools import (
    errno_closing,
    ls,
    run,
)

import storage.cache
from regfs.tree import SECTIONS, ManifestNode, TagNode, Tree
from storage.check import Severity, check
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.paths import (
    BlobData,
    BlobDir,
    LayerLink,
    RevisionLink,
    TagCurrentLink,
    TagDir,
    path_for,
)
from storage.registry import Registry

pytestmark = pytest.mark.mount

NAME = "org/app"
TTL = 1.0  # the fast mount's --tag-ttl


@dataclass(frozen=True)
class Image:
    digest: str
    manifest: bytes
    config: str
    layers: tuple[str, ...]

    @property
    def blobs(self) -> tuple[str, ...]:
        return (self.config, *self.layers)


def push_image(client: RegistryClient, tag: str, seed: int) -> Image:
    """A config and two layers over HTTP, then the manifest under `tag`."""
    config = json.dumps({"seed": seed}).encode()
    layers = [os.urandom(3000 + 100 * seed + i) for i in range(2)]
    digests = [client.push_blob(NAME, blob) for blob in (config, *layers)]
    manifest = image_manifest(config, layers)
    tagged(client, tag, manifest)
    return Image(str(digest_bytes(manifest)), manifest, digests[0], tuple(digests[1:]))


def tagged(client: RegistryClient, tag: str, manifest: bytes) -> None:
    client.put_manifest(NAME, tag, manifest)


def delete(client: RegistryClient, what: str, digest: str) -> None:
    resp = client.request("DELETE", f"/v2/{NAME}/{what}/{digest}")
    assert resp.status_code == 202, resp.text


def everyday_tools_work(m: Mount, tmp: Path) -> None:
    """`ls -lR` shows no `?` entry, `find -exec sha256sum` hashes every file to its name,
    `cp -r` copies the repository: each exits 0. rootfs/ is left out: these images' layers
    are random bytes, no tars."""
    repo = m.path(*NAME.split("/"))
    listing = run("ls", "-lR", "--ignore=rootfs", repo).stdout.decode()
    assert "?" not in listing, listing
    find = ["find", repo, "-name", "rootfs", "-prune", "-o", "-type", "f"]
    sums = run(*find, "-exec", "sha256sum", "{}", "+").stdout.decode()
    for line in sums.splitlines():
        digest, path = line.split(maxsplit=1)
        section, name = Path(path).parts[-2:]
        if section in ("layers", "manifests"):
            assert name == f"sha256:{digest}", line
    copy = tmp / f"copy-{m.mountpoint.name}-{time.monotonic_ns()}"
    copy.mkdir()
    run("cp", "-r", *(repo / section for section in SECTIONS), copy)
    assert sorted(os.listdir(copy / "layers")) == ls(repo / "layers")


def quiet_log(m: Mount) -> None:
    noisy = [line for line in m.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
    assert not noisy, "\n".join(noisy)


def registry_serves_the_mount(client: RegistryClient, m: Mount) -> None:
    """What the mount shows, the registry serves with the same bytes; and the same tags."""
    repo = m.path(*NAME.split("/"))
    assert sorted(client.tags(NAME)) == ls(repo / "tags")
    for tag in ls(repo / "tags"):
        assert client.get_manifest(NAME, tag).body == (repo / "tags" / tag).read_bytes()
    for digest in ls(repo / "manifests"):
        assert client.get_manifest(NAME, digest).body == (repo / "manifests" / digest).read_bytes()
    for digest in ls(repo / "layers"):
        assert client.get_blob(NAME, digest) == (repo / "layers" / digest).read_bytes()


def absent(m: Mount, section: str, name: str) -> None:
    """Not listed and ENOENT, whether asked by name or opened."""
    directory = m.path(*NAME.split("/"), section)
    assert name not in ls(directory)
    assert errno_closing(lambda: os.stat(directory / name)) == errno.ENOENT
    assert errno_closing(lambda: os.open(directory / name, os.O_RDONLY)) == errno.ENOENT


def regfs_check(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REGFS, "check", str(root), *args], capture_output=True, text=True, timeout=60
    )


def primed(mount, root: Path, ttl: float, tmp: Path) -> Mount:
    """A mount that has looked at everything (so its caches and the kernel's hold it all)."""
    m = mount(root, "--tag-ttl", str(ttl))
    everyday_tools_work(m, tmp)
    return m


# --------------------------------------------------------------------------- DELETE


@pytest.mark.registry
def test_deleted_over_http_is_absent_through_running_mounts(
    tmp_path, registry_server: RegistryServer, client: RegistryClient, mount
):
    root = registry_server.root
    keep = push_image(client, "keep", 1)
    gone = push_image(client, "gone", 2)
    fast = primed(mount, root, TTL, tmp_path)
    slow = primed(mount, root, 3600, tmp_path)  # only SIGHUP makes it look again
    for m in (fast, slow):
        assert gone.digest in ls(m.path(NAME, "manifests"))

    delete(client, "manifests", gone.digest)
    delete(client, "blobs", gone.layers[0])
    # What registry 2.8 leaves: the digest directories, empty; the blobs stay (for gc).
    for leftover in (
        repo_path(root, NAME) / "_manifests/revisions/sha256" / gone.digest[7:],
        repo_path(root, NAME) / "_layers/sha256" / gone.layers[0][7:],
    ):
        assert leftover.is_dir() and os.listdir(leftover) == []
    assert blob_data_path(root, gone.layers[0]).is_file()
    assert not (repo_path(root, NAME) / "_manifests/tags/gone").exists()

    hang_up(slow)
    time.sleep(TTL + 0.2)
    for m in (fast, slow):
        absent(m, "manifests", gone.digest)
        absent(m, "layers", gone.layers[0])
        absent(m, "tags", "gone")
        everyday_tools_work(m, tmp_path)
        registry_serves_the_mount(client, m)
        assert ls(m.path(NAME, "tags")) == ["keep"]
        assert ls(m.path(NAME, "layers")) == sorted({*keep.blobs, *gone.blobs} - {gone.layers[0]})
        quiet_log(m)
    assert client.get_manifest(NAME, "keep").body == keep.manifest  # nothing lost

    # Before gc, the blobs nothing links any more are gc's to remove: exit 1, no damage.
    result = regfs_check(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "damage:" not in result.stdout
    for kind in ("deleted-manifest-link", "deleted-layer-link", "unlinked-blob"):
        assert kind in result.stdout, result.stdout

    # Pushed again, the layer is back: presence moves both ways.
    client.push_blob(NAME, blob_data_path(root, gone.layers[0]).read_bytes())
    hang_up(slow)
    time.sleep(TTL + 0.2)
    for m in (fast, slow):
        assert gone.layers[0] in ls(m.path(NAME, "layers"))
        registry_serves_the_mount(client, m)
        quiet_log(m)


# --------------------------------------------------------------------------- garbage-collect


@pytest.mark.registry
@pytest.mark.parametrize("untagged", [False, True], ids=["gc", "gc-delete-untagged"])
def test_garbage_collected_is_absent_through_a_running_mount(
    tmp_path, registry_server: RegistryServer, client: RegistryClient, mount, untagged: bool
):
    root = registry_server.root
    keep = push_image(client, "keep", 1)
    old = push_image(client, "old", 2)
    loose = push_image(client, "moving", 3)
    tagged(client, "moving", keep.manifest)  # `loose` is left untagged
    delete(client, "manifests", old.digest)
    m = primed(mount, root, 3600, tmp_path)
    served = {d: client.get_blob(NAME, d) for d in keep.blobs}

    registry_server.stop()  # garbage-collect wants the registry stopped (or read-only)
    flags = ["--delete-untagged"] if untagged else []
    gc = subprocess.run(
        [REGISTRY_BIN, "garbage-collect", str(registry_server.config_path), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gc.returncode == 0, gc.stdout + gc.stderr
    registry_server.start()
    client = registry_server.client()  # its port again, or another if that one was taken
    # What registry 2.8 leaves: the collected blobs' directories are gone, the layer links
    # to them stay; --delete-untagged removes the untagged revision's directory whole.
    collected = [*old.blobs, *(loose.blobs if untagged else ())]
    for digest in collected:
        assert not blob_data_path(root, digest).parent.exists()
        assert (repo_path(root, NAME) / "_layers/sha256" / digest[7:] / "link").is_file()
    loose_revision = repo_path(root, NAME) / "_manifests/revisions/sha256" / loose.digest[7:]
    assert loose_revision.exists() != untagged

    hang_up(m)
    for digest in collected:
        absent(m, "layers", digest)
    absent(m, "manifests", old.digest)
    if untagged:
        absent(m, "manifests", loose.digest)
    everyday_tools_work(m, tmp_path)
    registry_serves_the_mount(client, m)
    assert ls(m.path(NAME, "layers")) == sorted({*keep.blobs, *loose.blobs} - set(collected))
    quiet_log(m)
    assert client.get_manifest(NAME, "keep").body == keep.manifest  # nothing lost
    assert {d: client.get_blob(NAME, d) for d in keep.blobs} == served

    # Nothing any tool of the registry would remove is left: exit 0, reclaimable only.
    result = regfs_check(root, "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("reclaimable: ") for line in lines), result.stdout
    assert "collected-layer-link" in result.stdout and "deleted-manifest-link" in result.stdout

    # Real damage on the same root is still exit 2: a truncated blob, a garbage link.
    data = blob_data_path(root, keep.layers[0])
    data.write_bytes(data.read_bytes()[:100])
    (repo_path(root, NAME) / "_layers/sha256" / keep.layers[1][7:] / "link").write_bytes(b"junk")
    result = regfs_check(root, "--verify")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "digest-mismatch" in result.stdout and "corrupt-layer-link" in result.stdout


# --------------------------------------------------------------------------- regfs check


async def test_check_reclaimable_apart_from_damage(tmp_path):
    """Registry leftovers are reclaimable (exit 0); damage beside them is still exit 2."""
    root = tmp_path / "root"
    registry = Registry(FilesystemDriver(root))
    repo = registry.repository(NAME)
    digests = []
    for data in (b"deleted", b"collected", b"garbage", b"wrong bytes", b"truncated", b"lost"):
        upload = await repo.layers.upload()
        await upload.write(data)
        await upload.finish(digest_bytes(data))
        digests.append(digest_bytes(data))
    deleted, collected, garbage, wrong, truncated, lost = digests
    config = {"mediaType": OCI_CONFIG, "digest": str(deleted), "size": len(b"deleted")}
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []}
    manifest = await repo.manifests.put(json.dumps(body).encode())
    driver = registry.driver
    await driver.delete(path_for(LayerLink(NAME, deleted)))  # the registry's DELETE
    await driver.delete(path_for(RevisionLink(NAME, manifest)))
    await driver.delete(path_for(BlobDir(collected)))  # garbage-collect
    assert sorted((f.kind, f.severity, f.path) for f in await check(driver, verify=True)) == [
        ("collected-layer-link", Severity.RECLAIMABLE, path_for(LayerLink(NAME, collected))),
        ("deleted-layer-link", Severity.RECLAIMABLE, path_for(LayerLink(NAME, deleted))),
        ("deleted-manifest-link", Severity.RECLAIMABLE, path_for(RevisionLink(NAME, manifest))),
        ("unlinked-blob", Severity.MAINTENANCE, str(min(deleted, manifest, key=str))),
        ("unlinked-blob", Severity.MAINTENANCE, str(max(deleted, manifest, key=str))),
    ]
    await driver.delete(path_for(BlobDir(deleted)))  # gc then collects what DELETE left
    await driver.delete(path_for(BlobDir(manifest)))
    result = regfs_check(root, "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("reclaimable: ") == 3

    await driver.put_content(path_for(LayerLink(NAME, garbage)), b"not a digest")
    await driver.put_content(path_for(BlobData(wrong)), b"other bytes")
    await driver.put_content(path_for(BlobData(truncated)), b"trunc")
    await driver.delete(path_for(BlobData(lost)))  # its directory stays: not gc's doing
    # A tag left naming it (the registry deletes a manifest's tags with it; Tags.put refuses
    # a manifest not stored): its link written as such.
    await driver.put_content(path_for(TagCurrentLink(NAME, "deleted")), str(manifest).encode())
    found = {f.kind: f.severity for f in await check(driver, verify=True)}
    assert found == {
        "tag-to-missing-manifest": Severity.DAMAGE,
        "deleted-layer-link": Severity.RECLAIMABLE,
        "deleted-manifest-link": Severity.RECLAIMABLE,
        "collected-layer-link": Severity.RECLAIMABLE,
        "corrupt-layer-link": Severity.DAMAGE,
        "unlinked-blob": Severity.MAINTENANCE,  # the blob the garbage link stood for
        "dangling-layer-link": Severity.DAMAGE,
        "digest-mismatch": Severity.DAMAGE,
    }
    result = regfs_check(root, "--verify")
    assert result.returncode == 2, result.stdout
    assert result.stdout.count("digest-mismatch") == 2  # the wrong bytes, the truncated blob


# --------------------------------------------------------------------------- the daemon's caches


async def test_tag_cached_after_its_manifest_is_no_warning(monkeypatch, caplog):
    """The tree caches a tag's target and the manifest's attributes apart, each for tag_ttl.
    When the registry deletes a manifest (and its tags) in between, the manifest's entry can
    expire while the tag's has not: the tag is read again and is simply gone, not damage."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(storage.cache, "time", SimpleNamespace(monotonic=lambda: clock.now))
    registry = Registry(InMemoryDriver())
    repo = registry.repository(NAME)
    digest = await empty_image(repo)
    await repo.tags.put("v1", digest)
    tree = Tree(registry, tag_ttl=10)
    await tree.attr(ManifestNode(NAME, digest))  # `ls -l manifests/`
    clock.now += 5
    await tree.attr(TagNode(NAME, "v1"))  # `ls -l tags/`: the tag is cached from now on
    await registry.driver.delete(path_for(RevisionLink(NAME, digest)))  # the registry's DELETE
    await registry.driver.delete(path_for(TagDir(NAME, "v1")))
    clock.now += 7  # the manifest's entry has expired, the tag's has not
    with caplog.at_level(logging.WARNING):
        for call in (tree.attr, tree.open, tree.xattrs):
            with pytest.raises(LookupError):
                await call(TagNode(NAME, "v1"))
    assert not caplog.records, caplog.text
