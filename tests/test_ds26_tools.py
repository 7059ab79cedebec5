"""Everyday tools on a mount, round two (stop 26, d): a layer written with its own bytes,
`rm -r` of many namespaces, and a repository backed up and restored with cp, tar, rsync.
Each run with the real tool on a real mount."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from support.mounts import Mount
from support.roots import add_repositories, build_root
from support.tools import errno_of, ls, run
from support.uploads import write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"
MIB = 1 << 20


@pytest.fixture
async def image(tmp_path: Path) -> dict:
    return await build_root(tmp_path / "root", size=3 * MIB + 5)


@pytest.fixture
def mounted(tmp_path: Path, image: dict, mount) -> Mount:
    return mount(tmp_path / "root")


# ------------------------------------------------------- a linked layer, its own bytes again


@pytest.mark.parametrize("skip", [0, 1])
async def test_dd_conv_notrunc_of_a_layers_own_bytes_exits_0(tmp_path, image, mounted, skip):
    # ext4: `dd conv=notrunc` of the bytes a file holds rewrites them and exits 0. A linked
    # layer was EPERM at the open, while a just-finished upload's name (the same layer)
    # took them (`FinishedWriter`): both take their own bytes now, and nothing changes.
    layer = mounted.path(*NAME.split("/"), "layers", image["layer"])
    data = image["blobs"][image["layer"]]
    blob = write_file(tmp_path / "blob", data)
    before = sorted(p for p in (tmp_path / "root").rglob("*"))
    result = run("dd", f"if={blob}", f"of={layer}", "bs=1M", "conv=notrunc", "status=none",
                 f"skip={skip}", f"seek={skip}", check=False)  # fmt: skip
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert layer.read_bytes() == data
    assert sorted(p for p in (tmp_path / "root").rglob("*")) == before


async def test_rsync_inplace_of_a_layers_own_bytes_exits_0(tmp_path, image, mounted):
    # `rsync -a --inplace` (the way rsync writes where a temporary name is refused) of a
    # backup over a repository that holds the layer already: its bytes, its mode; the mtime
    # it sets is the storage's to keep.
    layers = mounted.path(*NAME.split("/"), "layers")
    data = image["blobs"][image["layer"]]
    backup = tmp_path / "backup"
    backup.mkdir()
    write_file(backup / image["layer"], data)
    os.utime(backup / image["layer"], (1, 1))
    for extra in ([], ["--no-whole-file"]):
        result = subprocess.run(
            ["rsync", "-a", "--inplace", *extra, f"{backup}/", f"{layers}/"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (result.returncode, result.stderr) == (0, ""), extra
    assert (layers / image["layer"]).read_bytes() == data


async def test_a_write_that_would_change_a_linked_layer_is_eperm_and_logged(
    tmp_path, image, mounted
):
    layer = mounted.path(*NAME.split("/"), "layers", image["layer"])
    data = image["blobs"][image["layer"]]
    assert layer.read_bytes() == data  # its pages are in the kernel's cache
    other = write_file(tmp_path / "other", os.urandom(4096))
    result = run("dd", f"if={other}", f"of={layer}", "conv=notrunc", "status=none", check=False)
    assert result.returncode == 1 and "Operation not permitted" in result.stderr.decode()
    assert run("bash", "-c", f'echo more >> "{layer}"', check=False).returncode != 0
    assert errno_of(lambda: os.open(layer, os.O_WRONLY | os.O_TRUNC)) == errno.EPERM
    with open(layer, "r+b") as f:
        f.seek(4096)
        f.write(data[4096:8192])  # its own
        f.flush()
        assert errno_of(lambda: os.pwrite(f.fileno(), b"x", 0)) == errno.EPERM
        assert errno_of(lambda: os.ftruncate(f.fileno(), 10)) == errno.EPERM
    assert layer.read_bytes() == data  # the kernel kept none of the refused bytes
    refused = [line for line in mounted.log_text().splitlines() if "never changes" in line]
    assert len(refused) == 4, refused  # dd, >>, pwrite, ftruncate
    assert f"layers/{image['layer']} of {NAME} ({len(data)} bytes) never changes" in refused[0]


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
