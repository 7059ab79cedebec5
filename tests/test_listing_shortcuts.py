"""Review of this session's listing shortcuts with real tools on a real mount.

- pyfuse3's `readdir_ended` (the READDIR that only learns an image directory's end is
  answered empty in C, from 256 (inode, offset) slots): readers that stop right after the
  last entry leave their slot set; readers at once; the tag re-pointed to another image
  with the same directory names and back. No reader is ever told a listing ended early.
- Names handed by name only (`Attributes.by_name`: a namespace's repositories, tags): the
  number a listing gives (d_ino: `ls -i`, `find -inum`) is the one stat gives, and
  `cp -a` / `rsync -a` of such a tree copy every entry as it reads.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.images import Entry, directory, file
from support.mounts import Mount
from support.roots import add_repositories, build_root, put_layer_image, write_tags
from support.tools import run

from regfs import fusefeatures

pytestmark = pytest.mark.mount

REPO = "review/ended"
DIRS = 12


def image(variant: int) -> list[Entry]:
    """Directories d00..d11 of the same names in every variant, each of a count of files
    (long names, so the bigger ones take several READDIR replies) that differs by variant."""
    entries: list[Entry] = []
    for d in range(DIRS):
        entries.append(directory(f"d{d:02d}"))
        count = (d * 37 + variant * 53) % 180 + variant
        entries += [file(f"d{d:02d}/{'n' * 60}{variant}-{i:04d}") for i in range(count)]
    return entries


def expected(entries: list[Entry]) -> list[str]:
    return sorted(["", *(e.name for e in entries)])


def found(top: Path) -> list[str]:
    out = run("find", top, "-printf", "%P\\n").stdout.decode().splitlines()
    return sorted(out)


def stop_after_last(path: Path) -> int:
    """Read a directory up to its last entry and close it, never asking past it (its end
    slot stays set): how many entries it had."""
    count = len(os.listdir(path))
    seen = 0
    with os.scandir(path) as entries:
        for _ in entries:
            seen += 1
            if seen == count:
                break
    return seen


def test_a_reader_is_never_told_an_image_directory_ended_early(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    assert fusefeatures.READDIR_ENDED, "this pyfuse3 has no readdir_ended: nothing reviewed"
    root = tmp_path / "root"
    variants = [image(v) for v in (1, 2)]
    manifests = [trio.run(put_layer_image, root, REPO, f"v{v}", e) for v, e in enumerate(variants)]
    trio.run(put_layer_image, root, REPO, "t", variants[0])
    m = mount(root, "--tag-ttl", "60")
    top = m.path(*REPO.split("/"), "rootfs", "t")
    tag = m.path(*REPO.split("/"), "tags", "t")
    for round_, shown in enumerate([0, 1, 0, 1]):
        if round_:
            tag.write_bytes(manifests[shown])  # returns once the kernel's entry expired
        want = expected(variants[shown])
        assert found(top) == want, round_
        # Readers that leave their end slots set, then several readers at once, both
        # before and after the kernel has the listings (the first find above).
        for d in range(DIRS):
            stop_after_last(top / f"d{d:02d}")
        finders = [
            subprocess.Popen(["find", top, "-printf", "%P\\n"], stdout=subprocess.PIPE)
            for _ in range(4)
        ]
        for finder in finders:
            out, _ = finder.communicate(timeout=60)
            assert sorted(out.decode().splitlines()) == want, round_
        for d in range(DIRS):
            names = {e.name for e in variants[shown] if e.name.startswith(f"d{d:02d}/")}
            assert {f"d{d:02d}/{n}" for n in os.listdir(top / f"d{d:02d}")} == names


def test_names_handed_by_name_show_the_inode_stat_shows(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    """A fresh mount's `ls -i` (d_ino) of a namespace and of a tags/ directory, both handed
    by name only, shows for every entry the number `stat` shows; `find -inum` finds each
    by it; `cp -a` and `rsync -a` copy every tag with the bytes `cat` reads, and `cp -a` of
    the namespace makes the tree `find` shows."""
    root = tmp_path / "root"
    built = trio.run(build_root, root, "review/names", 1000)
    tags = [f"t{i:03d}" for i in range(150)]
    write_tags(root, "review/names", built["digest"], tags)
    add_repositories(root, "many", 150)
    m = mount(root, "--tag-ttl", "60")
    for listed in (m.path("many"), m.path("review", "names", "tags")):
        by_ls = dict(
            reversed(line.split(maxsplit=1))
            for line in run("ls", "-i", "-1", listed).stdout.decode().splitlines()
        )
        by_stat = dict(
            reversed(line.split(maxsplit=1))
            for line in run("sh", "-c", 'cd "$1" && stat -c "%i %n" *', "-", listed)
            .stdout.decode()
            .splitlines()
        )
        assert len(by_ls) >= 150 and by_ls == by_stat, listed
        for name in sorted(by_ls)[::37]:
            hit = run("find", listed, "-maxdepth", "1", "-inum", by_ls[name]).stdout.decode()
            assert hit.split() == [str(listed / name)]
    copies = tmp_path / "copies"
    copies.mkdir()
    source = m.path("review", "names", "tags")
    run("cp", "-a", source, copies / "cp")
    run("rsync", "-a", f"{source}/", copies / "rsync")
    manifest = (source / tags[0]).read_bytes()
    for copy in ("cp", "rsync"):
        got = {p.name: p.read_bytes() for p in (copies / copy).iterdir()}
        assert got == dict.fromkeys(["latest", *tags], manifest), copy
    # A namespace whose repositories went by name only, copied as a tree: the same tree.
    run("cp", "-a", m.path("many"), copies / "many")
    tree = "%P %y\\n"
    shown = run("find", m.path("many"), "-printf", tree).stdout.decode().splitlines()
    copied = run("find", copies / "many", "-printf", tree).stdout.decode().splitlines()
    assert len(shown) > 150 and sorted(copied) == sorted(shown)
