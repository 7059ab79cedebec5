"""Everyday tools on a mount, round two (stop 26, d): a layer written with its own bytes,
`rm -r` of many namespaces, and a repository backed up and restored with cp, tar, rsync.
Each run with the real tool on a real mount."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest
from support.images import file
from support.mounts import Mount
from support.oci import image_manifest
from support.registry import OCI_INDEX, OCI_MANIFEST
from support.roots import add_repositories, build_root, link_blobs, put_layer_image, put_tagged
from support.tools import digest_of, errno_of, ls, run
from support.uploads import write_file

from storage.drivers import FilesystemDriver
from storage.registry import Registry

pytestmark = pytest.mark.mount

NAME = "library/demo"
MIB = 1 << 20


@pytest.fixture
async def image(tmp_path: Path) -> dict:
    return await build_root(tmp_path / "root", size=3 * MIB + 5)


@pytest.fixture
def mounted(tmp_path: Path, image: dict, mount) -> Mount:
    return mount(tmp_path / "root")


# ------------------------------------------------- a layer's writer and the page cache


async def test_a_shared_writable_map_of_a_layer_is_refused_and_readers_see_its_bytes(
    tmp_path, image, mounted
):
    # A store into a shared map of a finished upload's name opened O_RDWR went into the page
    # cache that every reader of the layer is served from (keep_cache) and stayed there when its
    # write-back was refused (EPERM at msync): `sha256sum layers/<digest>` then disagreed
    # with its name. A layer's writer goes around the page cache (direct_io), so the kernel
    # refuses the shared map (ENODEV); a private map is the process's own copy.
    layers = mounted.path(*NAME.split("/"), "layers")
    # A linked layer is EPERM to open for writing (SPEC: writing to layers/).
    assert errno_of(lambda: os.open(layers / image["layer"], os.O_RDWR)) == errno.EPERM
    data = os.urandom(MIB)  # a just-finished upload's name, which is the layer it became
    name = mounted.path(*NAME.split("/"), "uploads", digest_of(data))
    run("cp", write_file(tmp_path / "blob", data), name)
    assert name.read_bytes() == data
    fd = os.open(name, os.O_RDWR)
    try:
        shared = mmap.MAP_SHARED
        writable = mmap.PROT_READ | mmap.PROT_WRITE
        assert errno_of(lambda: mmap.mmap(fd, len(data), shared, writable)) == errno.ENODEV
        private = mmap.mmap(fd, len(data), mmap.MAP_PRIVATE, writable)
        private[:4] = b"XXXX"
        private.close()
    finally:
        os.close(fd)
    assert name.read_bytes() == data
    assert (layers / digest_of(data)).read_bytes() == data


# ------------------------------------------------------------- rm -r of many namespaces


def namespaces_root(root: Path, count: int) -> list[str]:
    """`count` namespaces nsNNN, each holding one repository nsNNN/r00000."""
    names = [f"ns{i:03d}" for i in range(count)]
    for name in names:
        add_repositories(root, name, 1)
    return names


def test_rm_r_of_many_single_repository_namespaces_waits_once(tmp_path, mount):
    # Each rmdir that empties a namespace waited 0.1 s for the kernel's listing of the root
    # to expire (Tree._namespaces_emptied): 23 s for `rm -r MNT/*` of 200. The kernel reads
    # that listing again anyway after the namespace's own rmdir, which `rm -r` sends next:
    # only a listing it read after the last rmdir or mkdir it saw there is waited for, so
    # the first namespace waits, and the old build took 40 x 0.1 s here at the least.
    names = namespaces_root(tmp_path / "root", 40)
    m = mount(tmp_path / "root")
    assert ls(m.mountpoint) == names  # the kernel keeps the root's listing
    began = time.monotonic()
    removed = subprocess.run(["bash", "-c", f'rm -r "{m.mountpoint}"/*'], capture_output=True)
    took = time.monotonic() - began
    assert (removed.returncode, removed.stderr) == (0, b"")
    assert ls(m.mountpoint) == []
    assert took < 40 * 0.1, took


def test_ls_right_after_rm_r_of_a_repository_shows_its_namespace_gone(tmp_path, mount):
    # What the wait is for: `rm -r MNT/ns/r` empties ns, and the kernel, told only of ns's
    # change, would show ns in the root's listing it keeps until the attributes it was
    # handed expire. After each `ls` (a listing read since the last rmdir the kernel saw
    # there), each `rm -r` waits, and `ls` right after is right.
    names = namespaces_root(tmp_path / "root", 6)
    m = mount(tmp_path / "root")
    for i, name in enumerate(names):
        assert ls(m.mountpoint) == names[i:]
        assert os.stat(m.mountpoint).st_nlink == 2 + len(names) - i
        run("rm", "-r", m.path(name, "r00000"))
        assert ls(m.mountpoint) == names[i + 1 :]
    # Two levels: both listings above the emptied namespaces are kept by the kernel.
    namespaces_root(tmp_path / "root", 0)
    for name in ("a/b/c/r", "a/x"):
        os.makedirs(m.path(*name.split("/")))
    assert (ls(m.mountpoint), ls(m.path("a")), ls(m.path("a", "b"))) == (["a"], ["b", "x"], ["c"])
    run("rm", "-r", m.path("a", "b", "c", "r"))
    assert (ls(m.mountpoint), ls(m.path("a"))) == (["a"], ["x"])
    run("rm", "-r", m.path("a", "x"))
    assert ls(m.mountpoint) == []


# ------------------------------------------------------- backup and restore of a repository

APP = "org/app"


async def app_root(root: Path) -> dict[str, bytes]:
    """org/app: an image `latest` of one tar layer (its rootfs/ shows etc/os-release) and a
    two-platform index `multi` whose children are untagged, in manifests/ only, and whose
    digest sorts before theirs (an archive, rsync and a listing of manifests/ meet it
    first). Its tags' bytes by tag."""
    latest = await put_layer_image(root, APP, "latest", [file("etc/os-release", b"ID=test\n")])
    repo = Registry(FilesystemDriver(root)).repository(APP)
    children = []
    for arch in ("amd64", "arm64"):
        config = json.dumps({"architecture": arch, "os": "linux"}).encode()
        layer = os.urandom(5000)
        await link_blobs(root, APP, [config, layer])
        manifest = image_manifest(config, [layer], layer_type="application/octet-stream")
        digest = await repo.manifests.put(manifest)
        platform = {"os": "linux", "architecture": arch}
        described = {"mediaType": OCI_MANIFEST, "size": len(manifest), "platform": platform}
        children.append(described | {"digest": str(digest)})
    for n in range(1000):
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children,
                "annotations": {"org.example.n": str(n)}}  # fmt: skip
        index = json.dumps(body).encode()
        if digest_of(index) < min(child["digest"] for child in children):
            break
    await put_tagged(root, APP, "multi", index)
    return {"latest": latest, "multi": index}


def contents(repo: Path) -> dict[str, dict[str, bytes]]:
    return {
        section: {name: (repo / section / name).read_bytes() for name in ls(repo / section)}
        for section in ("layers", "manifests", "tags")
    }


@pytest.fixture
async def backed_up(tmp_path: Path, mount) -> tuple[Mount, Path, dict[str, bytes]]:
    """A mount of org/app, and `cp -a` of it to backup/ (exit 0)."""
    tags = await app_root(tmp_path / "root")
    m = mount(tmp_path / "root")
    backup = tmp_path / "backup"
    result = subprocess.run(["cp", "-a", f"{m.path(*APP.split('/'))}/.", f"{backup}/"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    return m, backup, tags


async def test_a_backup_out_of_the_mount_holds_the_blobs_and_no_image_files(backed_up):
    # rootfs/ lists nothing (name a tag to see its files), so `cp -a`, `tar -c` and `rsync
    # -a` of a repository copy its blobs and manifests and an empty rootfs/, never the
    # files of every image on top.
    m, backup, tags = backed_up
    app = m.path(*APP.split("/"))
    assert sorted(os.listdir(backup)) == ["layers", "manifests", "rootfs", "tags", "uploads"]
    assert os.listdir(backup / "rootfs") == os.listdir(backup / "uploads") == []
    assert contents(backup) == contents(app)
    assert {name: (backup / "tags" / name).read_bytes() for name in tags} == tags
    assert (app / "rootfs" / "latest" / "etc" / "os-release").read_bytes() == b"ID=test\n"
    names = run("bash", "-c", f'tar -C "{app}" -cf - . | tar -tf -').stdout.decode().split()
    assert [name for name in names if name.startswith("./rootfs")] == ["./rootfs/"]


async def test_a_tag_copied_before_its_blobs_is_refused_and_the_log_says_what_comes_first(
    backed_up,
):
    m, backup, _ = backed_up
    copy = m.path("org", "copy")
    copy.mkdir()
    result = subprocess.run(["cp", "-a", backup / "tags", backup / "layers", f"{copy}/"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert "failed to close" in result.stderr and "Invalid argument" in result.stderr
    assert ls(copy / "tags") == []  # never a tag whose manifest's blobs are absent
    assert ls(copy / "layers") == ls(backup / "layers")
    refused = [line for line in m.log_text().splitlines() if "org/copy:" in line]
    assert len(refused) == 2, refused
    latest, multi = sorted(refused, key=lambda line: "org/copy:multi" in line)
    assert "tag org/copy:latest not stored: config names blob sha256:" in latest
    assert "its blobs go into layers/ first (copying a repository: layers/, then" in latest
    assert "tag org/copy:multi not stored: manifests[0] names manifest sha256:" in multi
    assert "an index's manifests go into manifests/ before it is stored or tagged" in multi
    # A glob sorts: the index comes before its children.
    result = run("bash", "-c", f'cp -a "{backup}"/manifests/* "{copy}/manifests/"', check=False)
    assert result.returncode == 1
    assert len(ls(copy / "manifests")) == len(ls(backup / "manifests")) - 1
    index = [line for line in m.log_text().splitlines() if "not stored: manifests[0]" in line]
    assert len(index) == 2, index  # the tag multi, then the index itself
    assert "manifest org/copy@sha256:" in index[1]
    assert "an index's manifests go into manifests/ before it is stored or tagged" in index[1]


RECIPES = {
    # README, "Backing up and restoring a repository": the order a copy needs, given.
    "cp": """
        cd "$BACKUP"
        cp -a layers "$COPY/"
        grep -LZ '"manifests"' manifests/* | xargs -0r cp -a -t "$COPY/manifests/"
        grep -lZ '"manifests"' manifests/* | xargs -0r cp -a -t "$COPY/manifests/"
        cp -a tags "$COPY/"
    """,
    "tar": """
        cd "$APP"
        { printf '%s\\0' layers; grep -LZ '"manifests"' manifests/*
          grep -lZ '"manifests"' manifests/*; printf '%s\\0' tags; } |
          tar --null -T - -cf "$BACKUP/../app.tar"
        tar -C "$COPY" -xf "$BACKUP/../app.tar"
    """,
    "rsync": """
        cd "$BACKUP"
        grep -l '"manifests"' manifests/* > ../indexes || true
        rsync -a --inplace --exclude=/tags --exclude-from=../indexes ./ "$COPY/"
        rsync -a --inplace --ignore-existing ./ "$COPY/"
    """,
}


@pytest.mark.parametrize("tool", sorted(RECIPES))
async def test_a_repository_restored_by_the_readmes_recipe(backed_up, tool):
    m, backup, tags = backed_up
    copy = m.path("org", "copy")
    copy.mkdir()
    env = {"BACKUP": str(backup), "COPY": str(copy), "APP": str(m.path(*APP.split("/")))}
    script = "set -eo pipefail\n" + RECIPES[tool]
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            env=os.environ | env, timeout=120)  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert contents(copy) == contents(backup)
    assert {name: (copy / "tags" / name).read_bytes() for name in tags} == tags
    assert (copy / "rootfs" / "latest" / "etc" / "os-release").read_bytes() == b"ID=test\n"
    assert " not stored: " not in m.log_text()


async def test_a_repository_without_an_index_is_restored_by_cp_a_of_its_sections_in_order(
    tmp_path, mount
):
    # README: "Without an index, `cp -a backup/layers backup/manifests backup/tags ...`";
    # and a second run of it, with -n, into what holds it all already exits 0.
    await build_root(tmp_path / "root", size=100_000)
    m = mount(tmp_path / "root")
    backup = tmp_path / "backup"
    run("cp", "-a", f"{m.path(*NAME.split('/'))}/.", f"{backup}/")
    copy = m.path("org", "copy")
    copy.mkdir(parents=True)
    sections = [backup / "layers", backup / "manifests", backup / "tags"]
    for flags in ("-a", "-an"):
        result = run("cp", flags, *sections, f"{copy}/", check=False)
        assert (result.returncode, result.stderr) == (0, b""), flags
    assert contents(copy) == contents(backup)
