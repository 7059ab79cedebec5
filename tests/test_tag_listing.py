"""What a listing of tags costs, and what it may not give up for it (issue 18).

A listing of 10,000 tags checks their names in one regex pass (`storage.names.valid_tags`)
and makes their nodes as tuples in C (`regfs.nodes.TagNode`): the names it shows, and the
nodes' equality, must stay what the per-name grammar and a dataclass gave.
"""

from __future__ import annotations

import copy
import errno
import os
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.mounts import Mount, wait_until
from support.roots import build_root, write_tags
from support.tools import errno_closing, run

from regfs.nodes import TagNode, UploadNode
from storage.names import TAG_RE, valid_tags

NAME = "library/demo"
# Names a storage root (or a registry's tags/list) may hold that are no tag, each beside
# valid ones: a newline could make one name pass as two in a one-pass check.
NOT_TAGS = (
    "a\nb",
    "a\n",
    "\n",
    "ok\n-bad",
    "",
    "-dash",
    ".hidden",
    "a b",
    "a/b",
    "..",
    "é",
    "t" * 129,
    "a\x00b",
)
TAGS = ("latest", "v1.0", "v1.0-rc_2", "_", "9", "A" * 128, "x.-")


@pytest.mark.storage
def test_valid_tags_keeps_exactly_what_the_grammar_accepts() -> None:
    for name in (*NOT_TAGS, *TAGS):
        assert valid_tags([name]) == ([name] if TAG_RE.fullmatch(name) else []), repr(name)
    mixed = [*TAGS[:3], *NOT_TAGS, *TAGS[3:], *reversed(NOT_TAGS)]
    assert valid_tags(mixed) == [n for n in mixed if TAG_RE.fullmatch(n)]
    assert valid_tags(list(TAGS)) == list(TAGS)
    assert valid_tags([]) == []


@pytest.mark.storage
def test_a_tag_node_equals_only_the_same_tag() -> None:
    """A tuple underneath: equal and hashed as a dataclass was, never equal to another kind
    (the inode table and the caches hold every kind in one dict)."""
    node = TagNode(NAME, "v1")
    assert node == TagNode(NAME, "v1") and hash(node) == hash(TagNode(NAME, "v1"))
    assert node != TagNode(NAME, "v2") and node != TagNode("other/repo", "v1")
    assert node != UploadNode(NAME, "v1") and node != (NAME, "v1")
    assert len({node, TagNode(NAME, "v1"), UploadNode(NAME, "v1")}) == 2
    assert (node.repo, node.tag) == (NAME, "v1")
    assert repr(node) == f"TagNode(repo={NAME!r}, tag='v1')"
    assert copy.copy(node) == node == pickle.loads(pickle.dumps(node))
    match node:
        case TagNode(repo, tag):
            assert (repo, tag) == (NAME, "v1")
        case _:
            raise AssertionError("no match")
    listed = TagNode.listing(NAME, ["a", "b"])
    assert listed == [("a", TagNode(NAME, "a")), ("b", TagNode(NAME, "b"))]
    assert all(type(n) is TagNode for _, n in listed)


@pytest.mark.mount
def test_ls_tags_shows_the_valid_names_and_logs_the_rest(tmp_path: Path, mount: Callable) -> None:
    """Tag directories in the storage root whose names hold a newline between valid tags
    (which a one-pass check could take for two tags) are left out of `ls tags/` with a
    warning; every valid one is listed and reads."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], ("a\nb", "v1.0\nlatest", *TAGS))
    m: Mount = mount(root)
    tags = m.path(NAME, "tags")
    assert run("ls", "-1b", tags).stdout.decode().splitlines() == sorted(TAGS)
    assert re.search(r"ignoring \d+ invalid tag names", m.log_text())
    assert (tags / "v1.0-rc_2").read_bytes() == image["manifest"]
    assert errno_closing(lambda: os.stat(tags / "a\nb")) == errno.ENOENT


@pytest.mark.mount
def test_ls_reads_no_tag_link_and_ls_l_reads_them_ahead(tmp_path: Path, mount: Callable) -> None:
    """A plain `ls tags/`, again and again past the tag TTL (`watch ls`), looks no tag up:
    the daemon reads no tag's link for it (its --debug log says when it reads tags ahead).
    The `ls -l` after it looks each tag up; its first lookup starts the read-ahead."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    names = [f"t{i:03d}" for i in range(300)]
    write_tags(root, NAME, image["digest"], names)
    m: Mount = mount(root, "--debug", "--tag-ttl", "0.05")
    tags = m.path(NAME, "tags")
    for _ in range(5):  # each past the TTL: the listing is read from storage again
        assert run("ls", tags).stdout.decode().split() == sorted([*names, "latest"])
        time.sleep(0.1)
    assert "tags ahead" not in m.log_text()
    assert len(run("ls", "-l", tags).stdout.decode().splitlines()) == len(names) + 2  # + total
    wait_until(lambda: "tags ahead" in m.log_text(), 10, "the tags read ahead")


@pytest.mark.mount
@pytest.mark.parametrize("option", [["--plain-readdir"], ["-o", "plain_readdir"]])
def test_a_plain_readdir_mount_lists_as_the_default_one(
    tmp_path: Path, mount: Callable, option: list[str]
) -> None:
    """`--plain-readdir`: the kernel asks names only after a listing's first part (regfs's
    pyfuse3 build), and `ls`, `ls -l`, `ls -i` against stat, and `find` show what a default
    mount shows of 3,000 tags and a repository's layers."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    names = [f"t{i:04d}" for i in range(3000)]
    write_tags(root, NAME, image["digest"], names)

    def shown(m: Mount) -> list[list[str]]:
        tags = m.path(NAME, "tags")
        numbered = run("ls", "-i1", tags).stdout.decode().split()
        stat_script = 'cd "$1" && stat -c "%i %n" *'
        stated = run("bash", "-c", stat_script, "-", tags).stdout.decode().split()
        assert numbered == stated  # d_ino as stat's st_ino
        return [
            run("ls", tags).stdout.decode().split(),
            [line.split()[-1] for line in run("ls", "-l", tags).stdout.decode().splitlines()],
            sorted(run("find", m.path(NAME)).stdout.decode().split()),
        ]

    default = mount(root)
    expected = [[str(p).replace(str(default.mountpoint), "") for p in part]
                for part in shown(default)]  # fmt: skip
    default.stop()
    plain = mount(root, *option)
    (pid,) = plain.pids()
    assert b"--plain-readdir" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    got = [[str(p).replace(str(plain.mountpoint), "") for p in part] for part in shown(plain)]
    assert got == expected and len(got[0]) == len(names) + 1
