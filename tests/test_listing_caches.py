"""Every cache a listing fills shows a tag's change when issue 18 says it must, through the
tools that meet each: `ls -l` (attributes: the tags' kept attributes and the kernel's 0.1 s
entries), `cat` (content: the tags' kept targets) and `ls` (names: the listing the kernel
keeps in its page cache). Here the tags are the ones `ls -l` had the daemon read ahead, and
the manifests' attributes the ones it keeps (a tag's attributes last as long as its
manifest's), which the other listing tests do not single out.

- Through the mount: seen at once, however long the TTL.
- Beside the mount (the registry or another node): within --tag-ttl (plus the kernel's
  0.1 s), while the tools keep asking.
- SIGHUP: at once (the kernel's 0.1 s), however long the TTL; before it the daemon's caches
  still answer, which shows they were in play.
A remote mount (`https://`-style source, the real registry) keeps the registry's tags/list
and the resolved targets instead (docs/concurrency.md, Remote mounts): behind it within
twice --tag-ttl, and at SIGHUP, through the same three tools.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.mounts import Mount, hang_up, wait_until
from support.oci import push_images
from support.registry import RegistryServer
from support.roots import build_root, put_tagged, variants, write_tags
from support.tools import errno_closing, ls, run

from regfs.tree import LISTED_ENTRY_TIMEOUT
from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver
from storage.registry import Registry

pytestmark = pytest.mark.mount

NAME = "library/demo"
TAGS = [f"t{i:03d}" for i in range(50)]
MOVED, DELETED = TAGS[-1], TAGS[-2]  # read ahead, never the first tag looked up


class Repo:
    """A root of 50 tags on one image plus `latest`, and its changes made beside the mount
    (through storage/, as the registry would)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.image = trio.run(build_root, root, NAME, 1000)
        write_tags(root, NAME, self.image["digest"], TAGS)
        self.other, self.third = variants(self.image, 2)

    def retag(self, tag: str, manifest: bytes) -> None:
        trio.run(put_tagged, self.root, NAME, tag, manifest)

    def untag(self, tag: str) -> None:
        trio.run(Registry(FilesystemDriver(self.root)).repository(NAME).tags.delete, tag)

    def delete_manifest(self, digest: str) -> list[str]:
        repo = Registry(FilesystemDriver(self.root)).repository(NAME)
        return trio.run(repo.manifests.delete, Digest.parse(digest))


def sizes(tags: Path) -> dict[str, int]:
    """What `ls -l` shows: each tag's size."""
    lines = run("ls", "-l", tags).stdout.decode().splitlines()[1:]
    return {line.split()[-1]: int(line.split()[4]) for line in lines}


def warm(m: Mount, tags: Path) -> None:
    """`ls -l` twice (the first has the daemon read the tags ahead, the second lists them
    with their attributes), `cat` of the tag that will move, `ls`: every cache filled."""
    start = len(m.log_text())
    assert sizes(tags) == sizes(tags)
    wait_until(lambda: "tags read ahead" in m.log_text()[start:], 10, "the tags read ahead")
    run("cat", tags / MOVED)
    ls(tags)


def test_a_tag_changed_beside_the_mount_shows_within_the_ttl(
    tmp_path: Path, mount: Callable
) -> None:
    """The registry moves a read-ahead tag, deletes another and adds one while `ls -l`, `cat`
    and `ls` keep asking: all three show every change within --tag-ttl (1 s) plus the
    kernel's 0.1 s and a slow machine's margin, never later however often they ask."""
    repo = Repo(tmp_path / "root")
    m: Mount = mount(repo.root, "--debug", "--tag-ttl", "1")
    tags = m.path(NAME, "tags")
    warm(m, tags)

    repo.retag(MOVED, repo.other)
    repo.untag(DELETED)
    repo.retag("new", repo.image["manifest"])
    changed = time.monotonic()

    def all_seen() -> bool:
        shown = sizes(tags)
        moved = shown.get(MOVED) == len(repo.other) and DELETED not in shown and "new" in shown
        read = (tags / MOVED).read_bytes() == repo.other
        names = set(ls(tags))
        return moved and read and DELETED not in names and "new" in names

    wait_until(all_seen, 10, "ls -l, cat and ls to show the changes")
    assert time.monotonic() - changed < 1 + LISTED_ENTRY_TIMEOUT + 0.9


def test_sighup_drops_the_tags_read_ahead_and_the_kept_manifests(
    tmp_path: Path, mount: Callable
) -> None:
    """With a TTL of an hour, the registry moves a read-ahead tag, deletes another, and
    deletes a manifest (with its ten tags, read ahead too, whose attributes last as long as
    the manifest's kept ones): before SIGHUP `ls -l`, `cat` and `ls` still show the daemon's
    caches; right after it (the kernel's 0.1 s) every change."""
    repo = Repo(tmp_path / "root")
    doomed = [f"u{i}" for i in range(10)]
    for tag in doomed:
        repo.retag(tag, repo.third)
    doomed_digest = str(digest_bytes(repo.third))
    m: Mount = mount(repo.root, "--debug", "--tag-ttl", "3600")
    tags, manifests = m.path(NAME, "tags"), m.path(NAME, "manifests")
    warm(m, tags)
    before = sizes(tags)
    assert doomed_digest in ls(manifests)

    repo.retag(MOVED, repo.other)
    repo.untag(DELETED)
    assert sorted(repo.delete_manifest(doomed_digest)) == doomed
    time.sleep(2 * LISTED_ENTRY_TIMEOUT)  # the kernel's entries expired: the daemon answers
    assert sizes(tags) == before  # its caches: the tags' targets and attributes, kept
    assert (tags / MOVED).read_bytes() == repo.image["manifest"]
    assert set(ls(tags)) == set(before)  # the listing, kept by the kernel and the daemon

    hang_up(m)
    wait_until(  # at once, but for a kernel entry younger than 0.1 s
        lambda: errno_closing(lambda: os.stat(tags / DELETED)) == errno.ENOENT,
        1,
        "the kernel's entry of the deleted tag to expire",
    )
    after = sizes(tags)
    assert after[MOVED] == len(repo.other) and DELETED not in after
    assert not set(doomed) & set(after) and len(after) == len(TAGS)  # latest, one gone
    assert (tags / MOVED).read_bytes() == repo.other
    assert set(ls(tags)) == set(after)
    assert errno_closing(lambda: os.stat(tags / doomed[0])) == errno.ENOENT
    assert doomed_digest not in ls(manifests)


def test_a_tag_changed_through_the_mount_shows_at_once_in_every_tool(
    tmp_path: Path, mount: Callable
) -> None:
    """With every cache filled and a TTL of an hour, `cp` onto a read-ahead tag, `rm` of
    another and `cp` onto a new name: the very next `ls -l`, `cat` and `ls` show each."""
    repo = Repo(tmp_path / "root")
    m: Mount = mount(repo.root, "--debug", "--tag-ttl", "3600")
    tags = m.path(NAME, "tags")
    warm(m, tags)
    (tmp_path / "other.json").write_bytes(repo.other)

    run("cp", tmp_path / "other.json", tags / MOVED)
    assert sizes(tags)[MOVED] == len(repo.other)
    assert (tags / MOVED).read_bytes() == repo.other
    run("rm", tags / DELETED)
    assert DELETED not in sizes(tags) and DELETED not in ls(tags)
    run("cp", tmp_path / "other.json", tags / "new")
    assert sizes(tags)["new"] == len(repo.other) and "new" in ls(tags)
    assert (tags / "new").read_bytes() == repo.other


REMOTE_TAGS = [f"r{i:02d}" for i in range(20)]


def shows(tags: Path, moved: bytes, new: str) -> bool:
    """`ls -l`, `cat` and `ls` all show the last tag moved to `moved` and tag `new`."""
    shown = sizes(tags)
    listed = shown.get(REMOTE_TAGS[-1]) == len(moved) and new in shown
    return listed and (tags / REMOTE_TAGS[-1]).read_bytes() == moved and new in ls(tags)


@pytest.mark.registry
@pytest.mark.remote
def test_a_tag_moved_behind_a_remote_mount_shows_within_twice_the_ttl(
    remote_mount: Callable[..., Mount], module_registry_server: RegistryServer
) -> None:
    """The registry moves a resolved tag and gains one while `ls -l`, `cat` and `ls` keep
    asking: all three show both within twice --tag-ttl (1 s) and a slow machine's margin."""
    client, name = module_registry_server.client(), "caches/ttl"
    manifests = push_images(client, name, 3, REMOTE_TAGS)
    m = remote_mount("--tag-ttl", "1")
    tags = m.path(*name.split("/"), "tags")
    assert set(sizes(tags).values()) == {len(manifests[0])}  # resolved: every tag read
    assert (tags / REMOTE_TAGS[-1]).read_bytes() == manifests[0]

    client.put_manifest(name, REMOTE_TAGS[-1], manifests[1])
    client.put_manifest(name, "new", manifests[2])
    changed = time.monotonic()
    wait_until(lambda: shows(tags, manifests[1], "new"), 10, "ls -l, cat and ls to show it")
    assert time.monotonic() - changed < 2 * 1 + 1


@pytest.mark.registry
@pytest.mark.remote
def test_sighup_drops_the_resolved_tags_of_a_remote_mount(
    remote_mount: Callable[..., Mount], module_registry_server: RegistryServer
) -> None:
    """With a TTL of an hour, the registry moves a resolved tag and gains one: `ls -l`,
    `cat` and `ls` still show the mount's snapshot, and right after SIGHUP the changes."""
    client, name = module_registry_server.client(), "caches/hup"
    manifests = push_images(client, name, 3, REMOTE_TAGS)
    m = remote_mount("--tag-ttl", "3600")
    tags = m.path(*name.split("/"), "tags")
    before = sizes(tags)
    assert (tags / REMOTE_TAGS[-1]).read_bytes() == manifests[0]

    client.put_manifest(name, REMOTE_TAGS[-1], manifests[1])
    client.put_manifest(name, "new", manifests[2])
    time.sleep(2 * LISTED_ENTRY_TIMEOUT)  # the kernel's entries expired: the daemon answers
    assert sizes(tags) == before and "new" not in ls(tags)
    assert (tags / REMOTE_TAGS[-1]).read_bytes() == manifests[0]
    hang_up(m)
    wait_until(lambda: shows(tags, manifests[1], "new"), 1, "the changes right after SIGHUP")
