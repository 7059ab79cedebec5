"""`ls` of a namespace (issue 18): its repositories go to the kernel by name and type only,
so a plain `ls` of 10,000 stats none of them (the daemon's time was a stat and an entry per
repository: ~190 ms of CPU, now ~35); `ls -l`, which looks up what its first chunk gave,
gets the rest with their attributes (regfs/attributes.py `by_name`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.clients import calls_after
from support.mounts import Mount, kernel_inodes
from support.roots import add_repositories, build_root
from support.tools import ls, run

from regfs.directories import FIRST_PLACEHOLDERS

pytestmark = pytest.mark.mount

COUNT = 300


def test_ls_of_a_namespace_makes_no_inode_and_shows_the_numbers_stat_shows(
    tmp_path: Path, mount: Callable
) -> None:
    """A plain `ls` leaves no inode in the kernel per repository (`kernel_inodes`; before,
    each came with its attributes, kept for the tag TTL); `find` goes down into each (their
    type is a directory's) and the number a listing gives (d_ino) is the one stat shows."""
    root = tmp_path / "root"
    trio.run(build_root, root, "library/demo", 1000)
    names = add_repositories(root, "many", COUNT)
    m: Mount = mount(root, "--tag-ttl", "60")
    namespace = m.path("many")
    assert ls(namespace) == names
    numbers = {entry.name: entry.inode() for entry in os.scandir(namespace)}
    assert kernel_inodes(m, numbers.values()) == 0
    found = run("find", namespace, "-mindepth", "2", "-maxdepth", "2", "-name", "tags")
    assert len(found.stdout.splitlines()) == COUNT
    assert kernel_inodes(m, numbers.values()) == COUNT  # the control: find looked each up
    for name in (names[0], names[-1]):
        assert numbers[name] == os.stat(namespace / name).st_ino, name


def test_ls_l_of_a_namespace_looks_up_only_its_first_chunk(tmp_path: Path, mount: Callable) -> None:
    """A fresh `ls -l` stats the entries of the first READDIR (by name only: a LOOKUP each);
    every later chunk comes with the attributes, so no LOOKUP per repository (before the
    first lookup switched them, 300 LOOKUPs)."""
    root = tmp_path / "root"
    trio.run(build_root, root, "library/demo", 1000)
    add_repositories(root, "many", COUNT)
    m: Mount = mount(root, "--debug", "--tag-ttl", "60")
    namespace = m.path("many")
    run("stat", namespace)
    start = len(m.log_text())
    lines = run("ls", "-l", namespace).stdout.decode().splitlines()[1:]  # after `total`
    assert len(lines) == COUNT and all(line.startswith("d") for line in lines), lines[:3]
    calls = calls_after(m, start, namespace)
    assert calls["lookup in parent"] <= FIRST_PLACEHOLDERS, calls
    assert calls["readdir"] >= 2, calls  # the first chunk, then the rest
