"""`ls tags/` in fewer, cheaper READDIRs (issue 18, stop 27): a READDIRPLUS hands the tags the
daemon holds nothing of in runs, each decided and numbered at once (`Attributes.by_name_run`,
`Directories._reply_named`), and a registry directory's st_blksize lets `ls` ask 128 KiB per
READDIR. What must not change: each name once, with the number its lookup gives, and a tag
the daemon holds (looked up, being written) goes as before, with its attributes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.mounts import Mount
from support.roots import build_root, write_tags
from support.tools import run

from regfs import fusefeatures
from regfs.attributes import DIR_BLOCK_SIZE, LISTING_BLOCK_SIZE
from regfs.inodes import InodeTable
from regfs.nodes import DirNode, SectionNode, TagNode
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.drivers import InMemoryDriver
from storage.registry import Registry

NAME = "library/demo"


@pytest.mark.storage
async def test_a_run_goes_by_name_up_to_the_first_tag_held() -> None:
    """How many of a run go by name is what `by_name` says of each in turn: all of a fresh
    listing, and up to the first tag the kernel holds an inode of, or a read-ahead will
    read, or a writer has open; a namespace's directories up to its first section."""
    options = MountOptions("inmemory:", "/mnt", tag_ttl=2.0)
    ops = Operations(Tree(Registry(InMemoryDriver()), options.tag_ttl), options)
    attributes = ops.directories.attributes
    nodes: list = [TagNode(NAME, f"t{i:03d}") for i in range(300)]
    section = SectionNode(NAME, "tags")
    runs = attributes.by_name_run(section, in_use=False)
    named = attributes.by_name(section, in_use=False)
    assert runs is not None and named is not None
    goes, template = runs
    assert goes(nodes) == 300 and template.st_size == 0  # a placeholder's
    ops.inodes.inode(nodes[123])  # the kernel holds it: it goes with its attributes
    assert goes(nodes) == 123 == next(i for i, n in enumerate(nodes) if named(n) is None)
    assert goes(nodes[123:]) == 0 and goes(nodes[124:]) == 176
    directories: list = [DirNode(f"ns/r{i}") for i in range(5)] + [SectionNode("ns", "tags")]
    dir_runs = attributes.by_name_run(DirNode("ns"), in_use=False)
    assert dir_runs is not None and dir_runs[0](directories) == 5
    assert attributes.by_name_run(DirNode("ns"), in_use=True) is None  # `ls -l` of it


@pytest.mark.storage
def test_a_listing_numbers_each_tag_as_its_lookup_will() -> None:
    """`peek_all` of a run of one repository's tags (its head joined once) gives what
    `inode` gives each alone, also in a run of two repositories, and with a number taken."""
    key = os.urandom(16)
    table = InodeTable(key)
    one = [TagNode(NAME, f"t{i:04d}") for i in range(1000)]
    two = [*one[:10], TagNode("other/repo", "t0001"), *one[10:20]]
    assert list(table.peek_all(one)) == [InodeTable(key).inode(n) for n in one]
    assert list(table.peek_all(two)) == [InodeTable(key).inode(n) for n in two]
    held = InodeTable(key)
    taken = held.inode(one[5])
    assert list(held.peek_all(one[:10])) == [InodeTable(key).inode(n) for n in one[:10]]
    assert held.peek_all(one[5:6])[0] == taken


@pytest.mark.mount
@pytest.mark.skipif(not fusefeatures.READDIRPLUS_AUTO, reason="a stock pyfuse3")
def test_ls_of_tags_takes_few_readdirs_and_shows_each_once(tmp_path: Path, mount: Callable) -> None:
    """`ls` of 3,000 tags on a fresh mount: the tags directory says 128 KiB (an image's
    directories say 4096), so its READDIRPLUS take ~800 tags each, not ~200 (the first
    hands 32: `ls -l` looks one up meanwhile); every tag once, each with the number stat
    gives it."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    names = [f"t{i:04d}" for i in range(3000)]
    write_tags(root, NAME, image["digest"], names)
    m: Mount = mount(root, "--debug")
    tags = m.path(NAME, "tags")
    assert os.stat(tags).st_blksize == LISTING_BLOCK_SIZE and DIR_BLOCK_SIZE == 4096
    before = m.log_text().count("readdir(")
    numbered = run("ls", "-i1", tags).stdout.decode().split()
    assert m.log_text().count("readdir(") - before <= 7  # 32, 3 x ~819, the end (and a dot)
    shown = dict(zip(numbered[1::2], numbered[::2], strict=True))
    assert sorted(shown) == sorted([*names, "latest"]) and len(numbered) == 2 * len(shown)
    stated = run("bash", "-c", 'cd "$1" && stat -c "%n %i" *', "-", tags).stdout.decode()
    assert dict(line.split() for line in stated.splitlines()) == shown
