"""kill -9 of the daemon while the kernel keeps what regfs lets it keep (issue 18), through a
real mount: the listings of sections the kernel holds in its page cache (a plain `ls`, FOPEN_
CACHE_DIR), a tag write that waits for the kernel's 0.1 s attributes of manifests/ to expire
(its new manifest changes that kept listing), tags read ahead and handed with 0.1 s entries.

After each kill: every client fails at once with a dead connection (bounded waits, none
hangs), `regfs umount` of the dead mount succeeds and leaves a plain empty directory, a new
mount on it shows every tag written before the kill with its bytes, and `regfs check` finds
no damage in the storage root. The existing kill tests (tests/test_mount_listings.py,
tests/test_rootfs_mount.py) show the clients freed; these add the umount and the storage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.clients import kill_mid, listing_loop
from support.images import directory, file
from support.mounts import Mount, is_mounted, regfs
from support.oci import push_images
from support.registry import RegistryServer
from support.roots import build_root, put_layer_image, put_tagged, variants, write_tags
from support.tools import ls, run

from regfs.tree import LISTED_ENTRY_TIMEOUT
from storage.digests import digest_bytes

pytestmark = pytest.mark.mount

NAME = "library/demo"


def manifests_of(image: dict, count: int, where: Path) -> list[Path]:
    """`count` distinct manifests of build_root's image, as files."""
    where.mkdir()
    files = [where / f"w{i:03d}" for i in range(count)]
    for path, manifest in zip(files, variants(image, count), strict=True):
        path.write_bytes(manifest)
    return files


def assert_left_intact(m: Mount, look: Callable[[Mount], None], root: Path | None = None) -> None:
    """After the kill: `regfs umount` frees the mountpoint (a plain empty directory again), a
    new mount of the same source on it shows what `look` checks, and the storage root (the
    source's, or a remote registry's `root`) has no damage (`regfs check` exits 0 or 1: only
    what garbage collection or purge-uploads would remove)."""
    result = regfs("umount", str(m.mountpoint), timeout=30)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(m.mountpoint) and os.listdir(m.mountpoint) == []
    with Mount(m.source, m.mountpoint, m.log.with_suffix(".again.log")) as again:
        look(again)
    checked = regfs("check", str(root or m.source))
    assert checked.returncode in (0, 1), checked.stdout + checked.stderr


def test_kill_9_mid_kept_listings_and_a_tag_write_waiting_for_them(
    tmp_path: Path, mount: Callable
) -> None:
    """Plain `ls` of tags/ and manifests/ and `find` of the namespace again and again (the
    kernel keeps those listings) while `cp` writes tags, each with a new manifest (so each
    waits for the kernel's attributes of manifests/ to expire): kill -9 frees every client
    and leaves the mountpoint and the storage usable."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    old = {"latest", *(f"t{i:04d}" for i in range(500))}
    write_tags(root, NAME, image["digest"], sorted(old - {"latest"}))
    files = manifests_of(image, 100, tmp_path / "pushed")
    m: Mount = mount(root, "--tag-ttl", "60")
    tags, manifests = m.path(NAME, "tags"), m.path(NAME, "manifests")

    assert ls(manifests) == ls(manifests) == [image["digest"]]  # kept by the kernel
    began = time.monotonic()
    run("cp", files[0], tags / files[0].name)  # a new manifest: waits for manifests/
    assert time.monotonic() - began >= LISTED_ENTRY_TIMEOUT
    assert str(digest_bytes(files[0].read_bytes())) in ls(manifests)  # seen at once

    listed, written = tmp_path / "listed", tmp_path / "written"
    scripts = {
        "tags": listing_loop(tags, listed, ""),
        "manifests": listing_loop(manifests, listed, ""),
        "find": f'while find "{m.path("library")}" > /dev/null; do echo >> "{listed}"; done;'
        " exit 1",
        "cp": f'for f in "{files[0].parent}"/*; do cp "$f" "{tags}/${{f##*/}}" || exit 1;'
        f' echo "$f" >> "{written}"; done; while ls "{tags}" > /dev/null; do :; done; exit 1',
    }

    def under_way() -> bool:
        return listed.exists() and written.exists() and len(written.read_bytes().split()) >= 3

    kill_mid(m, scripts, under_way)
    done = [Path(line) for line in written.read_text().split()]
    assert len(done) < len(files)  # killed while the writes went on

    def look(again: Mount) -> None:
        names = set(ls(again.path(NAME, "tags")))
        assert old | {f.name for f in done} <= names, len(names)
        for pushed in done:
            assert again.path(NAME, "tags", pushed.name).read_bytes() == pushed.read_bytes()

    assert_left_intact(m, look)


def test_kill_9_mid_walks_of_images_and_a_tag_moving_below_them(
    tmp_path: Path, mount: Callable
) -> None:
    """What the kernel keeps of images (their listings, cache_readdir, a year; GETATTRs of
    their directories answered from the kept entry) and of a tag's image root (0.1 s):
    kill -9 while `find` walks one image again and again, `ls -lR` walks below a tag that
    `cp` moves between two images (each write waiting for the kernel's root entries to
    expire), and `ls -l` lists 500 tags read ahead each time (TTL 0.2 s). Every client is
    freed, the mountpoint and the storage are left usable, the tag shows one of its images."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], [f"t{i:04d}" for i in range(500)])
    dirs = [directory("."), *(directory(f"d{i}") for i in range(8))]
    shown = {}
    for tag in ("fixed", "v1", "v2"):
        files = [
            file(f"d{i}/f{j}", f"{tag} {i} {j}\n".encode()) for i in range(8) for j in range(20)
        ]
        shown[tag] = trio.run(put_layer_image, root, NAME, tag, dirs + files)
    trio.run(put_tagged, root, NAME, "moving", shown["v1"])
    (tmp_path / "v1").write_bytes(shown["v1"])
    (tmp_path / "v2").write_bytes(shown["v2"])
    m: Mount = mount(root, "--debug", "--tag-ttl", "0.2")
    tags, views = m.path(NAME, "tags"), m.path(NAME, "rootfs")
    assert len(run("find", views / "fixed").stdout.splitlines()) == 1 + 8 + 160

    listed, written = tmp_path / "listed", tmp_path / "written"
    scripts = {
        "find": f'while find "{views}/fixed" > /dev/null; do echo >> "{listed}"; done; exit 1',
        "walk": listing_loop(views / "moving", listed, "-lR"),
        "tags": listing_loop(tags, listed),
        "cp": f'while cp "{tmp_path}/v2" "{tags}/moving" && cp "{tmp_path}/v1" "{tags}/moving";'
        f' do echo >> "{written}"; done; exit 1',
    }

    def under_way() -> bool:
        moved = written.exists() and len(written.read_bytes()) >= 2
        return listed.exists() and moved and "tags ahead" in m.log_text()  # begun

    kill_mid(m, scripts, under_way)

    def look(again: Mount) -> None:
        tag = again.path(NAME, "tags", "moving").read_bytes()
        (which,) = [name for name in ("v1", "v2") if shown[name] == tag]
        image_file = again.path(NAME, "rootfs", "moving", "d7", "f19")
        assert image_file.read_bytes() == f"{which} 7 19\n".encode()
        assert len(ls(again.path(NAME, "tags"))) == 500 + 5  # latest, fixed, v1, v2, moving

    assert_left_intact(m, look)


@pytest.mark.registry
@pytest.mark.remote
def test_kill_9_mid_listing_and_push_of_a_remote_mount(
    remote_mount: Callable[..., Mount], module_registry_server: RegistryServer, tmp_path: Path
) -> None:
    """A remote mount (the real registry over HTTP): kill -9 while `ls -l` lists 100 tags
    again and again (TTL 0.2 s: each listing's tags resolved anew, 8 GETs at once on worker
    threads) and `cp` pushes tags through the mount: every client is freed, the mountpoint
    is left usable, every tag pushed before the kill is in the registry with its bytes, and
    the registry's storage has no damage."""
    client, name = module_registry_server.client(), "crashes/remote"
    old = [f"r{i:03d}" for i in range(100)]
    manifests = push_images(client, name, 6, old[:1])
    digest = client.get_manifest(name, old[0]).digest
    write_tags(module_registry_server.root, name, digest, old[1:])  # as the registry would
    files = [tmp_path / f"w{i:03d}" for i in range(1, 6)]
    for path, manifest in zip(files, manifests[1:], strict=True):
        path.write_bytes(manifest)
    m = remote_mount("--tag-ttl", "0.2")
    tags = m.path(*name.split("/"), "tags")
    listed, written = tmp_path / "listed", tmp_path / "written"
    scripts = {
        "ls": listing_loop(tags, listed),
        # then a read of a tag (direct_io: each goes to the daemon) until the mount is dead
        "cp": f'for f in "{tmp_path}"/w*; do cp "$f" "{tags}/${{f##*/}}" || exit 1;'
        f' echo "$f" >> "{written}"; done; while cat "{tags}/r000" > /dev/null; do :; done;'
        " exit 1",
    }

    def under_way() -> bool:
        return listed.exists() and written.exists() and len(written.read_bytes().split()) >= 3

    kill_mid(m, scripts, under_way)
    done = [Path(line) for line in written.read_text().split()]
    for pushed in done:
        assert client.get_manifest(name, pushed.name).body == pushed.read_bytes()

    def look(again: Mount) -> None:
        names = set(ls(again.path(*name.split("/"), "tags")))
        assert {*old, *(f.name for f in done)} <= names, len(names)

    assert_left_intact(m, look, module_registry_server.root)
