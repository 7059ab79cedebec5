"""The daemon's inode table, seen from outside (`getfattr -n user.regfs.inodes` on the root):
what the kernel lets go the daemon lets go too, and what the kernel holds it keeps.

Every entry handed with a lookup (LOOKUP, READDIRPLUS, one by one or in bulk, CREATE, MKDIR,
a rename's) is counted once, and FORGET takes the kernel's count back: one counted twice
would stay after the kernel dropped it (memory that grows with every walk, and a stale
number); one not counted would be dropped while the kernel still uses it (ESTALE). Dropping
the kernel's dentries and inodes (`drop_caches`) sends FORGET for all it does not hold.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest
import trio
from support.images import directory, file, hardlink, symlink
from support.inodes import forgotten, held
from support.mounts import Mount
from support.roots import build_root, put_layer_image, write_tags
from support.tools import run

pytestmark = pytest.mark.mount

NAME = "library/counted"


async def build(root: Path, name: str) -> None:
    """A repository with 300 tags and a layer, and an image of nested directories, hard
    links and a symlink for rootfs/."""
    image = await build_root(root, name, 20_000)
    write_tags(root, name, image["digest"], [f"t{i:03d}" for i in range(300)])
    entries = [directory("."), *(directory(f"d{i}") for i in range(30))]
    entries += [file(f"d{i}/f{j}", f"{i} {j}\n".encode()) for i in range(30) for j in range(20)]
    entries += [hardlink("d0/linked", "d1/f1"), symlink("d2/up", "../d3/f3")]
    await put_layer_image(root, name, "img", entries)


@pytest.fixture(
    params=["local", pytest.param("remote", marks=[pytest.mark.registry, pytest.mark.remote])]
)
def counted(request: pytest.FixtureRequest, tmp_path: Path, mount) -> tuple[Mount, Path]:
    """A mount of the repository (a storage root, or the real registry over HTTP) and the
    repository's path in it."""
    if request.param == "local":
        trio.run(build, tmp_path / "root", NAME)
        m = mount(tmp_path / "root")
        return m, m.path(NAME)
    server = request.getfixturevalue("module_registry_server")
    name = f"{NAME}-{next(_names)}"
    trio.run(build, server.root, name)
    m = request.getfixturevalue("remote_mount")()
    return m, m.path(name)


_names = itertools.count()


def test_what_the_kernel_forgets_the_daemon_forgets(counted: tuple[Mount, Path]) -> None:
    """Walks, stats, reads and writes of every kind of entry raise the count; once the kernel
    drops its caches the daemon holds the root alone again."""
    m, repo = counted
    assert held(m) == 1
    run("find", m.mountpoint)
    run("ls", "-lR", repo / "tags", repo / "layers", repo / "manifests")
    run("find", repo / "rootfs" / "img", "-type", "f", "-exec", "cat", "{}", "+")
    run("ls", "-lR", repo / "rootfs" / "img")
    run("du", "-sb", repo / "rootfs" / "img")
    upload = repo / "uploads" / "blob"
    upload.write_bytes(b"not a layer yet\n")
    run("mv", upload, repo / "uploads" / "renamed")
    run("rm", repo / "uploads" / "renamed")
    run("cp", repo / "tags" / "t000", repo / "tags" / "copied")
    walked = held(m)
    assert walked > 300 + 600, walked  # the tags and the image's files were counted
    forgotten(m, 1)


def test_what_the_kernel_holds_the_daemon_keeps(tmp_path: Path, mount) -> None:
    """A file held open, and the directories above it that the kernel pins, survive the
    kernel dropping everything else: its inode still answers (no ESTALE), and the count
    goes back to the root alone once it is closed."""
    trio.run(build, tmp_path / "root", NAME)
    m: Mount = mount(tmp_path / "root")
    deep = m.path(NAME, "rootfs", "img", "d7", "f7")
    run("find", m.path(NAME, "rootfs", "img"))
    # A reader that holds the file open while the kernel drops its caches around it.
    with subprocess.Popen(
        ["sh", "-c", 'exec 3< "$1"; echo open; read line; cat <&3', "sh", str(deep)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as reader:
        assert reader.stdin is not None and reader.stdout is not None
        assert reader.stdout.readline() == b"open\n"
        # The file, d7, img, rootfs, the repository's two names and the root: pinned.
        forgotten(m, 7)
        assert held(m) == 7
        reader.stdin.write(b"go\n")
        reader.stdin.close()
        out = reader.stdout.read()
        assert reader.wait(timeout=30) == 0
    assert out == b"7 7\n"
    assert os.stat(deep).st_size == 4  # looked up again after the drop
    forgotten(m, 1)


def test_a_listing_given_up_leaves_no_inode(tmp_path: Path, mount) -> None:
    """A reader that stops after its first entries (a `scandir` left early, `ls | head` of a
    tool that reads lazily) leaves nothing numbered: entries prepared for a reply that the
    kernel's buffer did not take are no inodes of the kernel's."""
    trio.run(build, tmp_path / "root", NAME)
    m: Mount = mount(tmp_path / "root")
    tags, image = m.path(NAME, "tags"), m.path(NAME, "rootfs", "img")
    run("ls", "-l", tags)  # their attributes held: handed in runs
    run("find", image)
    forgotten(m, 1)
    for listed in (tags, m.path(NAME, "layers"), image, image / "d0"):
        with os.scandir(listed) as listing:
            next(listing)
    forgotten(m, 1)
