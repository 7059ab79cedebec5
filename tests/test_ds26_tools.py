"""Everyday tools on a mount, round two (stop 26, d): a layer written with its own bytes,
`rm -r` of many namespaces, and a repository backed up and restored with cp, tar, rsync.
Each run with the real tool on a real mount."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from support.roots import add_repositories
from support.tools import ls, run

pytestmark = pytest.mark.mount

NAME = "library/demo"
MIB = 1 << 20


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
